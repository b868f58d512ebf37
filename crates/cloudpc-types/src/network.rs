//! Network connections (Graph's `cloudPcOnPremisesConnection`): how Cloud PCs reach the
//! organisation's own network and which Active Directory domain they join.
//!
//! A connection names the domain, the organisational unit and the account that joins computers
//! to it (its password is write-only and sealed at rest), and cloudpc's own part: the host bridge
//! (and VLAN) in each region that leads to the organisation's network, whose DHCP and DNS the
//! Cloud PCs then use. Health checks decide whether a policy may use it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::policy::DomainJoinType;
use crate::validate::{self, ValidationError};

/// A value's name in the API's JSON (`passed`, `hybridAzureADJoin`), for messages.
pub fn wire_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// The state of a connection's health checks, as Graph names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum HealthCheckStatus {
    Pending,
    Running,
    Passed,
    Failed,
    Warning,
}

/// One health check's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub display_name: String,
    pub status: HealthCheckStatus,
    pub start_date_time: DateTime<Utc>,
    pub end_date_time: DateTime<Utc>,
    /// What was found, in a sentence.
    pub additional_details: String,
    /// What to do about a failure or warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_action: Option<String>,
    /// The host the check ran from (a cloudpc extension; checks run from every host of the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_name: Option<String>,
}

/// The last run of a connection's health checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckStatusDetail {
    pub start_date_time: DateTime<Utc>,
    pub end_date_time: Option<DateTime<Utc>>,
    pub health_checks: Vec<HealthCheck>,
}

/// Where the organisation's network reaches one host: a Linux bridge and, optionally, a VLAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostBridge {
    /// The host's name; hosts of the region not listed use the connection's `bridgeName`.
    pub host_name: String,
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,15}$")]
    pub bridge_name: String,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 4094)]
    pub vlan_id: Option<u16>,
}

/// A network connection as stored and shown. The domain password is never part of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OnPremisesConnection {
    #[serde(skip)]
    pub row_version: u64,
    pub id: Uuid,
    pub display_name: String,
    /// `hybridAzureADJoin`: join the Active Directory domain; `azureADJoin`: no domain join.
    pub connection_type: DomainJoinType,
    #[serde(default)]
    pub ad_domain_name: Option<String>,
    #[serde(default)]
    pub ad_domain_username: Option<String>,
    #[serde(default)]
    pub organizational_unit: Option<String>,
    /// Whether a domain password is kept (the password itself is never shown; a cloudpc extension).
    #[serde(default)]
    pub has_ad_domain_password: bool,
    pub health_check_status: HealthCheckStatus,
    #[serde(default)]
    pub health_check_status_detail: Option<HealthCheckStatusDetail>,
    /// Whether a provisioning policy uses it (then only its name may change).
    #[serde(default)]
    pub in_use: bool,
    /// The region whose hosts serve this network (cloudpc extension).
    pub region_name: String,
    /// The host bridge that leads to the organisation's network (cloudpc extension).
    pub bridge_name: String,
    #[serde(default)]
    pub vlan_id: Option<u16>,
    /// Hosts whose bridge is named differently.
    #[serde(default)]
    pub host_bridges: Vec<HostBridge>,
    pub created_date_time: DateTime<Utc>,
}

#[derive(Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnPremisesConnectionCreate {
    #[schema(pattern = r"^[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]{0,63}$")]
    pub display_name: String,
    #[serde(default)]
    pub connection_type: Option<DomainJoinType>,
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,63}$", max_length = 253)]
    pub ad_domain_name: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._@\\-]{1,256}$")]
    pub ad_domain_username: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,256}$")]
    pub ad_domain_password: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,1024}$")]
    pub organizational_unit: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,39}$")]
    pub region_name: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,15}$")]
    pub bridge_name: String,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 4094)]
    pub vlan_id: Option<u16>,
    #[serde(default)]
    pub host_bridges: Option<Vec<HostBridge>>,
}

impl std::fmt::Debug for OnPremisesConnectionCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnPremisesConnectionCreate")
            .field("display_name", &self.display_name)
            .field("ad_domain_name", &self.ad_domain_name)
            .field("ad_domain_password", &self.ad_domain_password.as_ref().map(|_| "(hidden)"))
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnPremisesConnectionUpdate {
    #[schema(pattern = r"^[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]{0,63}$")]
    pub display_name: Option<String>,
    /// Accepted only when it does not change (the join type of a connection is fixed).
    pub connection_type: Option<DomainJoinType>,
    #[schema(pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,63}$", max_length = 253)]
    pub ad_domain_name: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9._@\\-]{1,256}$")]
    pub ad_domain_username: Option<String>,
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,256}$")]
    pub ad_domain_password: Option<String>,
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,1024}$")]
    pub organizational_unit: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,15}$")]
    pub bridge_name: Option<String>,
    #[schema(minimum = 1, maximum = 4094)]
    pub vlan_id: Option<u16>,
    pub host_bridges: Option<Vec<HostBridge>>,
}

impl std::fmt::Debug for OnPremisesConnectionUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnPremisesConnectionUpdate")
            .field("display_name", &self.display_name)
            .field("ad_domain_password", &self.ad_domain_password.as_ref().map(|_| "(hidden)"))
            .finish_non_exhaustive()
    }
}

/// A Linux interface name: 1 to 15 of letters, digits and `_.-`.
fn bridge(field: &'static str, v: &str) -> Result<(), ValidationError> {
    if v.is_empty() || v.len() > 15 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(ValidationError::new(field, "must be a Linux interface name: 1 to 15 letters, digits and _.-"));
    }
    Ok(())
}

fn vlan(field: &'static str, v: Option<u16>) -> Result<(), ValidationError> {
    match v {
        Some(0) | Some(4095..) => Err(ValidationError::new(field, "must be a VLAN id from 1 to 4094")),
        _ => Ok(()),
    }
}

/// A DNS domain name of at least two labels (`corp.contoso.com`).
pub fn domain_name(v: &str) -> bool {
    let labels: Vec<&str> = v.split('.').collect();
    v.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels.last().is_some_and(|l| l.chars().all(|c| c.is_ascii_alphabetic()))
}

/// An organisational unit's distinguished name: `OU=…` parts, ending in the domain's `DC=` parts.
pub fn ou_matches_domain(ou: &str, domain: &str) -> bool {
    let parts: Vec<String> = ou.split(',').map(|p| p.trim().to_string()).collect();
    let dcs: Vec<String> = domain.split('.').map(|l| format!("dc={}", l.to_ascii_lowercase())).collect();
    let tail: Vec<String> = parts.iter().rev().take(dcs.len()).rev().map(|p| p.to_ascii_lowercase()).collect();
    parts.len() > dcs.len()
        && tail == dcs
        && parts[..parts.len() - dcs.len()].iter().all(|p| {
            let (k, v) = p.split_once('=').unwrap_or(("", ""));
            matches!(k.trim().to_ascii_uppercase().as_str(), "OU" | "CN") && !v.trim().is_empty()
        })
}

impl OnPremisesConnection {
    /// Checks the connection as a whole; `has_password` says whether a password is (or will be) kept.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::display_name("displayName", &self.display_name, 64)?;
        bridge("bridgeName", &self.bridge_name)?;
        vlan("vlanId", self.vlan_id)?;
        if self.host_bridges.len() > 1000 {
            return Err(ValidationError::new("hostBridges", "may list at most 1000 hosts"));
        }
        for h in &self.host_bridges {
            validate::display_name("hostBridges.hostName", &h.host_name, 64)?;
            bridge("hostBridges.bridgeName", &h.bridge_name)?;
            vlan("hostBridges.vlanId", h.vlan_id)?;
        }
        let region = &self.region_name;
        if region.is_empty()
            || region.len() > 40
            || !region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(ValidationError::new("regionName", "must be a region name: lowercase letters, digits and -"));
        }
        match self.connection_type {
            DomainJoinType::HybridAzureAdJoin => {
                let Some(domain) = self.ad_domain_name.as_deref() else {
                    return Err(ValidationError::new(
                        "adDomainName",
                        "is required to join a domain (hybridAzureADJoin)",
                    ));
                };
                if !domain_name(domain) {
                    return Err(ValidationError::new(
                        "adDomainName",
                        "must be a DNS domain name such as corp.contoso.com",
                    ));
                }
                match self.ad_domain_username.as_deref() {
                    None => return Err(ValidationError::new("adDomainUsername", "is required to join a domain")),
                    Some(u)
                        if u.is_empty()
                            || u.len() > 256
                            || !u.chars().all(|c| c.is_ascii_alphanumeric() || "._@\\-".contains(c)) =>
                    {
                        return Err(ValidationError::new(
                            "adDomainUsername",
                            "must be an account name (letters, digits and ._@\\-)",
                        ))
                    }
                    _ => {}
                }
                if !self.has_ad_domain_password {
                    return Err(ValidationError::new("adDomainPassword", "is required to join a domain"));
                }
                if let Some(ou) = self.organizational_unit.as_deref() {
                    if !ou_matches_domain(ou, domain) {
                        return Err(ValidationError::new(
                            "organizationalUnit",
                            format!(
                                "must be the distinguished name of an OU in {domain}, such as OU=CloudPCs,{}",
                                domain.split('.').map(|l| format!("DC={l}")).collect::<Vec<_>>().join(",")
                            ),
                        ));
                    }
                }
            }
            DomainJoinType::AzureAdJoin => {
                if self.ad_domain_name.is_some()
                    || self.ad_domain_username.is_some()
                    || self.has_ad_domain_password
                    || self.organizational_unit.is_some()
                {
                    return Err(ValidationError::new(
                        "connectionType",
                        "azureADJoin joins no domain: leave adDomainName, adDomainUsername, adDomainPassword and organizationalUnit out",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The bridge and VLAN that lead to this network on `host`.
    pub fn bridge_on(&self, host: &str) -> (String, Option<u16>) {
        match self.host_bridges.iter().find(|h| h.host_name == host) {
            Some(h) => (h.bridge_name.clone(), h.vlan_id),
            None => (self.bridge_name.clone(), self.vlan_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_organizational_unit_must_lie_in_the_domain() {
        assert!(ou_matches_domain("OU=CloudPCs,DC=corp,DC=contoso,DC=com", "corp.contoso.com"));
        assert!(ou_matches_domain("ou=Desks, OU=CloudPCs,dc=corp,dc=contoso,dc=com", "CORP.contoso.com"));
        assert!(!ou_matches_domain("OU=CloudPCs,DC=other,DC=com", "corp.contoso.com"));
        assert!(!ou_matches_domain("DC=corp,DC=contoso,DC=com", "corp.contoso.com"));
        assert!(!ou_matches_domain("OU=,DC=corp,DC=contoso,DC=com", "corp.contoso.com"));
        assert!(domain_name("corp.cloudpc.test"));
        assert!(!domain_name("corp"));
        assert!(!domain_name("-corp.test"));
        assert!(!domain_name("corp.test."));
    }
}
