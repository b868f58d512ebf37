//! Hypervisor hosts: cloudpc's own extension (`/cloudpc/hosts`), since Windows 365 hides its
//! hosts. A host is where Cloud PCs run: the in-process host of a one-machine install, or a
//! machine whose host agent joined with a token.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self, ValidationError};

/// What a host is doing. `ready`, `maintenance` and `draining` are set by admins; `unreachable`
/// is what a read shows when the host's agent has missed three reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum HostState {
    /// Receives new Cloud PCs.
    Ready,
    /// Keeps its Cloud PCs, receives no new ones.
    Maintenance,
    /// Receives no new Cloud PCs; its Cloud PCs move to other hosts of the region.
    Draining,
    Unreachable,
}

/// vCPUs, memory and disk: a host's capacity, what its Cloud PCs take of it, and what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostResources {
    pub v_cpu_count: u64,
    #[serde(rename = "memoryInMB")]
    pub memory_in_mb: u64,
    #[serde(rename = "diskInGB")]
    pub disk_in_gb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    /// The stored row's version, for compare-and-swap writes.
    #[serde(skip)]
    pub row_version: u64,
    pub id: Uuid,
    pub display_name: String,
    pub region: String,
    pub state: HostState,
    /// The agent's address (`https://host:port`); none for the host inside a one-machine install.
    pub agent_address: Option<String>,
    /// This host's hosted network is `10.214.<n>.0/24` and up, distinct from every other host's.
    pub subnet_index: u32,
    /// `kvm`, `tcg` or `simulated`, as the agent last reported.
    pub accelerator: Option<String>,
    pub agent_version: Option<String>,
    /// What the host gives to Cloud PCs (as reported, times the overcommit ratios).
    pub capacity: HostResources,
    /// What its Cloud PCs were promised. Hibernated ones take no vCPU or RAM; their save files
    /// count against disk.
    pub used: HostResources,
    pub free: HostResources,
    pub cloud_pc_count: u64,
    /// cloudpc extension: of `cloudPcCount`, the hibernated ones (saved to disk, RAM free).
    #[serde(default)]
    pub saved_cloud_pc_count: u64,
    pub last_heartbeat_date_time: Option<DateTime<Utc>>,
    /// Why the host is in its state (unreachable since when, fenced, …).
    pub status_detail: Option<String>,
    pub created_date_time: DateTime<Utc>,
}

impl Host {
    /// A host that has not reported yet: ready, nothing placed on it.
    pub fn new(display_name: &str, region: &str, agent_address: Option<String>) -> Self {
        Self {
            row_version: 0,
            id: Uuid::new_v4(),
            display_name: display_name.to_string(),
            region: region.to_string(),
            state: HostState::Ready,
            agent_address,
            subnet_index: 0,
            accelerator: None,
            agent_version: None,
            capacity: HostResources::default(),
            used: HostResources::default(),
            free: HostResources::default(),
            cloud_pc_count: 0,
            saved_cloud_pc_count: 0,
            last_heartbeat_date_time: None,
            status_detail: None,
            created_date_time: Utc::now(),
        }
    }
}

/// `POST /cloudpc/hosts/joinTokens`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinTokenCreate {
    #[schema(pattern = "^[a-z0-9-]{1,64}$")]
    pub region: String,
    /// How long the token can be used, 1 to 1440 minutes (default 30).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1440)]
    pub valid_for_minutes: Option<f64>,
}

/// The one time a join token's secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinToken {
    pub token: String,
    pub region: String,
    pub expiration_date_time: DateTime<Utc>,
}

/// `PATCH /cloudpc/hosts/{id}`: the state an admin sets.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostUpdate {
    pub state: SettableHostState,
}

/// The states an admin sets (`unreachable` is only shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum SettableHostState {
    Ready,
    Maintenance,
    Draining,
}

impl From<SettableHostState> for HostState {
    fn from(s: SettableHostState) -> Self {
        match s {
            SettableHostState::Ready => HostState::Ready,
            SettableHostState::Maintenance => HostState::Maintenance,
            SettableHostState::Draining => HostState::Draining,
        }
    }
}

/// A region or host name: letters, digits, '-', '_' and '.', 1 to 63 characters.
pub fn validate_name(field: &'static str, value: &str) -> Result<(), ValidationError> {
    validate::display_name(field, value, 63)?;
    if value.len() > 63 || !value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(ValidationError::new(field, format!("'{value}' must be 1 to 63 letters, digits, '-', '_' or '.'")));
    }
    Ok(())
}

/// A region name, as provisioning policies name regions: 1 to 64 lowercase letters, digits and
/// hyphens ("automatic" is not a region, it lets cloudpc choose one).
pub fn validate_region(value: &str) -> Result<(), ValidationError> {
    let ok = (1..=64).contains(&value.len())
        && value != "automatic"
        && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(ValidationError::new(
            "region",
            format!("'{value}' must be 1 to 64 lowercase letters, digits and hyphens (and not 'automatic')"),
        ));
    }
    Ok(())
}
