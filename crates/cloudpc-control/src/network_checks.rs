//! Running the health checks of network connections: on demand (`runHealthChecks`), after every
//! change that could alter their outcome, and on a schedule.
//!
//! The checks themselves run on the hosts ([`cloudpc_hypervisor::netcheck`]): a connection is
//! checked from every reachable host of its region, each with its own bridge and VLAN, because a
//! Cloud PC may land on any of them. The connection's status is the worst result of all. A run
//! is recorded as `running` first; its results are saved with a compare-and-swap on the row, so
//! a run that raced an edit of the connection is dropped (the edit starts a run of its own).
//! The scheduled runs are made by the replica holding the `network-checks` lease.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use cloudpc_hypervisor::netcheck::{CheckOutcome, CheckResult, NetworkCheckSpec};
use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::hosts::HostState;
use cloudpc_types::network::{HealthCheck, HealthCheckStatus, HealthCheckStatusDetail, OnPremisesConnection};
use cloudpc_types::policy::DomainJoinType;

use crate::audit::{Actor, Change};
use crate::networks::unseal;
use crate::{App, Error, Result};

const SCHEDULE_LEASE: &str = "network-checks";

fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_else(Utc::now)
}

fn health_check(host: &str, r: CheckResult) -> HealthCheck {
    HealthCheck {
        display_name: r.name,
        status: match r.outcome {
            CheckOutcome::Passed => HealthCheckStatus::Passed,
            CheckOutcome::Warning => HealthCheckStatus::Warning,
            CheckOutcome::Failed => HealthCheckStatus::Failed,
        },
        start_date_time: time(r.started_ms),
        end_date_time: time(r.ended_ms),
        additional_details: r.details,
        recommended_action: r.remedy,
        host_name: Some(host.to_string()),
    }
}

/// The worst of the results: any failure fails, else any warning warns.
pub(crate) fn overall(checks: &[HealthCheck]) -> HealthCheckStatus {
    if checks.is_empty() || checks.iter().any(|c| c.status == HealthCheckStatus::Failed) {
        HealthCheckStatus::Failed
    } else if checks.iter().any(|c| c.status == HealthCheckStatus::Warning) {
        HealthCheckStatus::Warning
    } else {
        HealthCheckStatus::Passed
    }
}

/// `host:port` of a URL, with the scheme's default port.
fn host_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if authority.is_empty() {
        return None;
    }
    let has_port = match authority.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => authority.contains(':'),
    };
    if has_port {
        Some(authority.to_string())
    } else {
        let port = if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 };
        Some(format!("{authority}:{port}"))
    }
}

impl App {
    /// What a host needs to check (or act on) the connection: its bridge and VLAN on that host,
    /// and the domain account with its password.
    pub(crate) async fn connection_check_spec(&self, c: &OnPremisesConnection, host: &str) -> Result<NetworkCheckSpec> {
        let password = match self.store.network_connection_password(c.id).await? {
            Some(sealed) => Some(unseal(&self.config.secrets_key_file, c.id, &sealed)?),
            None => None,
        };
        let (bridge, vlan) = match c.host_bridges.iter().find(|b| b.host_name.eq_ignore_ascii_case(host)) {
            Some(b) => (b.bridge_name.clone(), b.vlan_id),
            None => (c.bridge_name.clone(), c.vlan_id),
        };
        Ok(NetworkCheckSpec {
            bridge,
            vlan,
            domain: if c.connection_type == DomainJoinType::HybridAzureAdJoin {
                c.ad_domain_name.clone()
            } else {
                None
            },
            username: c.ad_domain_username.clone(),
            password,
            organizational_unit: c.organizational_unit.clone(),
            control_plane: self.config.public_url.as_deref().and_then(host_port),
        })
    }

    /// `runHealthChecks`: audited, then run in the background; the connection shows `running`
    /// until the results are in.
    pub async fn request_network_checks(&self, actor: &Actor, id: &str) -> Result<()> {
        let c = self.get_network_connection(id).await?;
        let audit = Change {
            component: "Network",
            activity: "RunHealthChecks OnPremisesConnection".into(),
            operation: AuditOperationType::Other,
            resource_type: "cloudPcOnPremisesConnection",
            resource_id: c.id.to_string(),
            resource_name: c.display_name.clone(),
        }
        .event_with(actor, Vec::new());
        self.store.record_audit_event(&audit).await?;
        self.spawn_network_checks(c.id);
        Ok(())
    }

    /// Runs the checks of one connection in the background.
    pub fn spawn_network_checks(&self, id: Uuid) {
        let app = self.clone();
        tokio::spawn(async move {
            match app.run_network_checks(id).await {
                Ok(_) => {}
                // Another run or an edit wrote the row meanwhile: that one's results stand.
                Err(Error::Internal(cloudpc_store::StoreError::Stale { .. })) => {
                    tracing::debug!(connection = %id, "the connection changed during its checks; the later run counts");
                }
                Err(e) => tracing::warn!(connection = %id, error = %e, "the network health checks could not run"),
            }
        });
    }

    /// Runs the checks of one connection now, from every reachable host of its region, and saves
    /// the results (unless the connection changed meanwhile).
    pub async fn run_network_checks(&self, id: Uuid) -> Result<OnPremisesConnection> {
        let mut c = self.get_network_connection(&id.to_string()).await?;
        let started = Utc::now();
        c.health_check_status = HealthCheckStatus::Running;
        c.health_check_status_detail =
            Some(HealthCheckStatusDetail { start_date_time: started, end_date_time: None, health_checks: Vec::new() });
        self.store.update_network_connection(&c, None, None).await?;
        c.row_version += 1;

        let hosts: Vec<_> = self
            .list_hosts()
            .await?
            .into_iter()
            .filter(|h| h.region == c.region_name && h.state != HostState::Unreachable)
            .collect();
        let mut checks = Vec::new();
        if hosts.is_empty() {
            let now = Utc::now();
            checks.push(HealthCheck {
                display_name: "Hosts of the region".into(),
                status: HealthCheckStatus::Failed,
                start_date_time: started,
                end_date_time: now,
                additional_details: format!("No reachable host serves the region '{}'.", c.region_name),
                recommended_action: Some(format!(
                    "Set the connection's regionName to a region that has hosts, or join a host to '{}'.",
                    c.region_name
                )),
                host_name: None,
            });
        }
        let mut runs = tokio::task::JoinSet::new();
        for h in hosts {
            let spec = self.connection_check_spec(&c, &h.display_name).await?;
            let app = self.clone();
            runs.spawn(async move {
                let name = h.display_name.clone();
                let results = match app.host(&name).await {
                    Ok(hv) => hv.network_check(&spec).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (name, started, results)
            });
        }
        while let Some(done) = runs.join_next().await {
            let (host, started, results) =
                done.map_err(|e| Error::Conflict(format!("a health check run died: {e}")))?;
            match results {
                Ok(list) => checks.extend(list.into_iter().map(|r| health_check(&host, r))),
                Err(e) => checks.push(HealthCheck {
                    display_name: "Host".into(),
                    status: HealthCheckStatus::Failed,
                    start_date_time: started,
                    end_date_time: Utc::now(),
                    additional_details: format!("The checks could not run on host '{host}': {e}"),
                    recommended_action: Some(
                        "Check that the host (or its agent) is running, then run the checks again.".into(),
                    ),
                    host_name: Some(host.clone()),
                }),
            }
        }
        // Hosts in a stable order, each host's checks in the order they ran.
        checks.sort_by(|a, b| a.host_name.cmp(&b.host_name));
        c.health_check_status = overall(&checks);
        c.health_check_status_detail = Some(HealthCheckStatusDetail {
            start_date_time: started,
            end_date_time: Some(Utc::now()),
            health_checks: checks,
        });
        self.store.update_network_connection(&c, None, None).await?;
        c.row_version += 1;
        tracing::info!(connection = %c.id, status = ?c.health_check_status, seconds = (Utc::now() - started).num_milliseconds() as f64 / 1000.0, "network health checks done");
        Ok(c)
    }

    /// Checks every connection again every `network_check_interval` (six hours by default), on
    /// one replica at a time. Shortly after start, it also runs the checks that a stopped
    /// process left `pending` or `running`.
    pub async fn run_network_check_schedule(self) {
        let every = self.config.network_check_interval;
        let mut first = true;
        loop {
            tokio::time::sleep(if first { every.min(Duration::from_secs(10)) } else { every }).await;
            if !matches!(self.store.try_lease(SCHEDULE_LEASE, self.replica(), every / 2).await, Ok(true)) {
                first = false;
                continue;
            }
            let list = match self.list_network_connections().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "could not list the network connections to check");
                    continue;
                }
            };
            let unfinished = |c: &OnPremisesConnection| {
                matches!(c.health_check_status, HealthCheckStatus::Pending | HealthCheckStatus::Running)
            };
            let resume_only = std::mem::take(&mut first);
            for c in list.into_iter().filter(|c| !resume_only || unfinished(c)) {
                if let Err(e) = self.run_network_checks(c.id).await {
                    tracing::warn!(connection = %c.id, error = %e, "scheduled network health checks failed to run");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_public_url_gives_the_address_the_checks_connect_to() {
        assert_eq!(host_port("https://cloudpc.contoso.com"), Some("cloudpc.contoso.com:443".into()));
        assert_eq!(host_port("http://10.77.0.1:8080/portal"), Some("10.77.0.1:8080".into()));
        assert_eq!(host_port("https://[fd00::1]:8443"), Some("[fd00::1]:8443".into()));
        assert_eq!(host_port("https://[fd00::1]"), Some("[fd00::1]:443".into()));
        assert_eq!(host_port("nonsense"), None);
    }

    #[test]
    fn test_overall_status_is_the_worst_check() {
        let check = |status| HealthCheck {
            display_name: "x".into(),
            status,
            start_date_time: Utc::now(),
            end_date_time: Utc::now(),
            additional_details: String::new(),
            recommended_action: None,
            host_name: None,
        };
        use HealthCheckStatus::*;
        assert_eq!(overall(&[check(Passed), check(Passed)]), Passed);
        assert_eq!(overall(&[check(Passed), check(Warning)]), Warning);
        assert_eq!(overall(&[check(Warning), check(Failed)]), Failed);
        assert_eq!(overall(&[]), Failed);
    }
}
