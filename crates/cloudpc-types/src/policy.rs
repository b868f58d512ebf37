//! Provisioning policies: which image, network and settings a Cloud PC gets, and for which groups.
//!
//! Shaped like Graph's `cloudPcProvisioningPolicy` and `cloudPcProvisioningPolicyAssignment`.
//! The naming template rules follow Windows 365: 5–15 characters of letters, digits and hyphens
//! after expansion, `%RAND:y%` required with y ≥ 5, `%USERNAME:x%` optional.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self, ValidationError};
use crate::ODataType;

/// Where the image of a policy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ImageType {
    Gallery,
    Custom,
}

/// Graph's `cloudPcProvisioningType`; it cannot change once a policy exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningType {
    Dedicated,
    Shared,
    SharedByUser,
    SharedByEntraGroup,
}

/// How the Cloud PC joins the directory. Hybrid join needs an on-premises network connection,
/// which cloudpc does not have yet, so only `azureADJoin` is accepted for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum DomainJoinType {
    #[serde(rename = "azureADJoin")]
    AzureAdJoin,
    #[serde(rename = "hybridAzureADJoin")]
    HybridAzureAdJoin,
}

/// One way of joining, with the hosted network's region ("automatic" lets cloudpc choose).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainJoinConfiguration {
    pub domain_join_type: DomainJoinType,
    #[serde(default = "automatic")]
    pub region_name: String,
    #[serde(default)]
    pub region_group: Option<String>,
    #[serde(default)]
    pub on_premises_connection_id: Option<String>,
}

fn automatic() -> String {
    "automatic".into()
}

/// Windows settings of the Cloud PC; cloudpc uses the locale for the guest's language.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowsSetting {
    pub locale: String,
}

impl Default for WindowsSetting {
    fn default() -> Self {
        Self { locale: "en-US".into() }
    }
}

/// A provisioning policy as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningPolicy {
    /// The stored row's version, for compare-and-swap writes; not part of the Graph body.
    #[serde(skip)]
    pub row_version: u64,
    pub id: Uuid,
    pub display_name: String,
    pub description: String,
    pub image_id: String,
    /// Filled from the image at read time.
    pub image_display_name: String,
    pub image_type: ImageType,
    pub cloud_pc_naming_template: Option<String>,
    pub enable_single_sign_on: bool,
    pub local_admin_enabled: bool,
    pub provisioning_type: ProvisioningType,
    pub domain_join_configurations: Vec<DomainJoinConfiguration>,
    pub windows_setting: WindowsSetting,
    pub managed_by: String,
    pub grace_period_in_hours: Option<u32>,
    /// cloudpc extension: the Cloud PC's time zone (IANA name); the guest's default when absent.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// cloudpc extension: a running Cloud PC whose console has been closed this many minutes is
    /// hibernated (its memory saved to disk, its RAM freed); opening it resumes it. Off when absent.
    #[serde(default)]
    pub hibernate_after_minutes: Option<u32>,
    /// cloudpc extension: booted, unassigned Cloud PCs kept ready for each license with free
    /// seats, so a newly entitled user gets one in seconds. 0 (the default) keeps none.
    #[serde(default)]
    pub warm_pool_size: u32,
    pub created_date_time: DateTime<Utc>,
    pub last_modified_date_time: DateTime<Utc>,
    /// Present when asked for with `$expand=assignments`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignments: Option<Vec<PolicyAssignment>>,
}

/// Body of `POST provisioningPolicies`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisioningPolicyCreate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub display_name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub image_id: String,
    #[serde(default)]
    pub image_display_name: Option<String>,
    pub image_type: ImageType,
    #[serde(default)]
    pub cloud_pc_naming_template: Option<String>,
    #[serde(default)]
    pub enable_single_sign_on: Option<bool>,
    #[serde(default)]
    pub local_admin_enabled: Option<bool>,
    #[serde(default)]
    pub provisioning_type: Option<ProvisioningType>,
    #[serde(default)]
    pub domain_join_configurations: Option<Vec<DomainJoinConfiguration>>,
    #[serde(default)]
    pub windows_setting: Option<WindowsSetting>,
    #[serde(default)]
    pub grace_period_in_hours: Option<u32>,
    #[serde(default)]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub hibernate_after_minutes: Option<u32>,
    #[serde(default)]
    pub warm_pool_size: Option<u32>,
}

/// Body of `PATCH provisioningPolicies/{id}`: absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisioningPolicyUpdate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub image_id: Option<String>,
    pub image_display_name: Option<String>,
    pub image_type: Option<ImageType>,
    pub cloud_pc_naming_template: Option<String>,
    pub enable_single_sign_on: Option<bool>,
    pub local_admin_enabled: Option<bool>,
    pub provisioning_type: Option<ProvisioningType>,
    pub domain_join_configurations: Option<Vec<DomainJoinConfiguration>>,
    pub windows_setting: Option<WindowsSetting>,
    pub grace_period_in_hours: Option<u32>,
    pub time_zone: Option<String>,
    /// 0 turns hibernation off.
    pub hibernate_after_minutes: Option<u32>,
    pub warm_pool_size: Option<u32>,
}

/// Graph's assignment target: a group, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignmentTarget {
    #[serde(rename = "@odata.type", default = "group_target_type")]
    pub odata_type: String,
    pub group_id: Uuid,
}

fn group_target_type() -> String {
    "#microsoft.graph.cloudPcManagementGroupAssignmentTarget".into()
}

/// One group a policy targets. `id` is `{policyId}_{groupId}` as in Graph; `assignedDateTime`
/// (a cloudpc extension) orders policies for first-assigned-wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAssignment {
    pub id: String,
    pub target: AssignmentTarget,
    pub assigned_date_time: DateTime<Utc>,
}

/// One entry of the `assign` action's body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignmentInput {
    #[serde(default)]
    pub id: Option<String>,
    pub target: AssignmentTarget,
}

/// Body of `POST provisioningPolicies/{id}/assign`: the complete, ordered list of targets.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignRequest {
    pub assignments: Vec<AssignmentInput>,
}

/// A naming template, parsed: literal parts and the two placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamingTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Username(usize),
    Rand(usize),
}

const TEMPLATE_FIELD: &str = "cloudPcNamingTemplate";
/// A Cloud PC name (a NetBIOS computer name) has at most 15 characters.
const MAX_NAME_LEN: usize = 15;
/// Longer than any valid template (15 characters of name plus two placeholders' markup).
const MAX_TEMPLATE_LEN: usize = 64;

impl NamingTemplate {
    /// Parses and checks a template so that every expansion is a valid Cloud PC name.
    pub fn parse(template: &str) -> Result<Self, ValidationError> {
        let err = |m: String| ValidationError::new(TEMPLATE_FIELD, m);
        // Bounded before anything is parsed: every width below is then small, and no sum or
        // allocation can grow with hostile numbers.
        if template.len() > MAX_TEMPLATE_LEN {
            return Err(err(format!("is {} characters long; at most {MAX_TEMPLATE_LEN} are allowed", template.len())));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('%') {
                let end = after
                    .find('%')
                    .ok_or_else(|| err("has a '%' that starts a placeholder but never ends it".into()))?;
                let token = &after[..end];
                let (name, count) = token.split_once(':').ok_or_else(|| {
                    err(format!("has placeholder %{token}% without a length; use %USERNAME:x% or %RAND:y%"))
                })?;
                let n: usize =
                    count.parse().map_err(|_| err(format!("placeholder %{token}% needs a whole number after ':'")))?;
                if n > MAX_NAME_LEN {
                    return Err(err(format!(
                        "placeholder %{token}% is wider than a Cloud PC name ({MAX_NAME_LEN} characters)"
                    )));
                }
                match name.to_ascii_uppercase().as_str() {
                    "USERNAME" if n >= 1 => parts.push(TemplatePart::Username(n)),
                    "USERNAME" => return Err(err("%USERNAME:x% needs x of at least 1".into())),
                    "RAND" if n >= 5 => parts.push(TemplatePart::Rand(n)),
                    "RAND" => return Err(err(format!("%RAND:y% needs y of at least 5, not {n}"))),
                    _ => {
                        return Err(err(format!(
                            "has unknown placeholder %{token}%; only %USERNAME:x% and %RAND:y% exist"
                        )))
                    }
                }
                rest = &after[end + 1..];
            } else {
                let end = rest.find('%').unwrap_or(rest.len());
                let lit = &rest[..end];
                if let Some(c) = lit.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
                    return Err(err(format!("contains '{c}'; only letters, digits and hyphens are allowed")));
                }
                parts.push(TemplatePart::Literal(lit.to_string()));
                rest = &rest[end..];
            }
        }
        let count = |f: fn(&TemplatePart) -> bool| parts.iter().filter(|p| f(p)).count();
        match count(|p| matches!(p, TemplatePart::Rand(_))) {
            0 => return Err(err("must contain %RAND:y% (y of at least 5)".into())),
            1 => {}
            _ => return Err(err("may contain %RAND:y% only once".into())),
        }
        if count(|p| matches!(p, TemplatePart::Username(_))) > 1 {
            return Err(err("may contain %USERNAME:x% only once".into()));
        }
        let max_len = parts
            .iter()
            .map(|p| match p {
                TemplatePart::Literal(s) => s.len(),
                TemplatePart::Username(n) | TemplatePart::Rand(n) => *n,
            })
            .fold(0usize, usize::saturating_add);
        if max_len > MAX_NAME_LEN {
            return Err(err(format!("expands to up to {max_len} characters; a Cloud PC name has 5 to 15")));
        }
        let has_letter = parts.iter().any(|p| match p {
            TemplatePart::Literal(s) => s.chars().any(|c| c.is_ascii_alphabetic()),
            TemplatePart::Username(_) => true,
            TemplatePart::Rand(_) => false,
        });
        if !has_letter {
            // %RAND% gives digits; a name of digits only is not a valid computer name.
            return Err(err("needs a letter or %USERNAME:x%, since a name of digits only is not allowed".into()));
        }
        Ok(Self { parts })
    }

    /// Expands the template for a user; `random` supplies the characters for `%RAND:y%`.
    pub fn expand(&self, username: &str, random: &mut dyn FnMut() -> char) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Literal(s) => out.push_str(s),
                TemplatePart::Username(n) => {
                    out.extend(username.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(*n))
                }
                TemplatePart::Rand(n) => out.extend((0..*n).map(|_| random())),
            }
        }
        out
    }
}

/// Checks a policy name, description and template (the rules that need no database).
pub fn validate_fields(display_name: &str, description: &str, template: Option<&str>) -> Result<(), ValidationError> {
    validate::policy_name(display_name)?;
    validate::description("description", description, 1024)?;
    if let Some(t) = template {
        NamingTemplate::parse(t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_naming_template_valid_forms_accepted() {
        for ok in ["CPC-%RAND:5%", "%USERNAME:5%-%RAND:5%", "cpc%username:4%%rand:7%", "A%RAND:14%"] {
            assert!(NamingTemplate::parse(ok).is_ok(), "{ok} should be accepted");
        }
    }

    #[test]
    fn test_naming_template_rules_refused() {
        let cases = [
            ("CPC-%USERNAME:4%", "must contain %RAND"),
            ("CPC-%RAND:4%", "at least 5"),
            ("CPC-%RAND:5%-%RAND:5%", "only once"),
            ("LONGPREFIX-%RAND:5%", "up to 16"),
            ("%USERNAME:6%-%RAND:9%", "up to 16"),
            ("CPC_%RAND:5%", "contains '_'"),
            ("CPC-%RAND%", "without a length"),
            ("CPC-%FOO:5%", "unknown placeholder"),
            ("CPC-%RAND:5", "never ends"),
            ("%RAND:5%", "digits only"),
            ("A%RAND:x%", "whole number"),
            ("%USERNAME:13835058055282163712%%RAND:4611686018427387904%", "wider than a Cloud PC name"),
            ("%RAND:99999999999999999999999%", "whole number"),
            ("A%RAND:4611686018427387904%", "wider than a Cloud PC name"),
            ("%RAND:18446744073709551614%ab", "wider than a Cloud PC name"),
            ("%USERNAME:9%%RAND:9%", "up to 18"),
        ];
        let long = format!("A{}%RAND:5%", "-".repeat(100));
        let err = NamingTemplate::parse(&long).unwrap_err();
        assert!(err.to_string().contains("at most 64"), "{err}");
        for (template, expected) in cases {
            let err = NamingTemplate::parse(template).unwrap_err();
            assert_eq!(err.field, "cloudPcNamingTemplate");
            assert!(err.message.contains(expected), "{template}: {}", err.message);
        }
    }

    #[test]
    fn test_naming_template_expand_truncates_username() {
        let t = NamingTemplate::parse("%USERNAME:4%-%RAND:5%").unwrap();
        let mut n = 0u8;
        let name = t.expand("adele.vance", &mut || {
            n += 1;
            (b'0' + n) as char
        });
        assert_eq!(name, "adel-12345");
    }
}
