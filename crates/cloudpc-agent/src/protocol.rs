//! What travels between the control plane and a host agent.
//!
//! One `POST /v1/call` per [`cloudpc_hypervisor::Hypervisor`] operation (the answer is the
//! operation's `Result`, errors included, as JSON), `GET /v1/status` for the monitor, and
//! `GET /v1/console/{vm}` upgraded to a raw byte stream for a console. Joining is the one call
//! the other way: the agent posts a [`JoinRequest`] to the control plane's
//! `/cloudpc/agent/join` with its token.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use cloudpc_hypervisor::netcheck::NetworkCheckSpec;
use cloudpc_hypervisor::{Capacity, NetworkSpec, NicSpec, VmSpec, VmState};

/// The protocol's version; an agent refuses calls from a control plane that speaks another.
pub const PROTOCOL: u32 = 1;
/// The header that carries [`PROTOCOL`].
pub const PROTOCOL_HEADER: &str = "cloudpc-agent-protocol";
/// The upgrade token of a console stream.
pub const CONSOLE_UPGRADE: &str = "cloudpc-console";

/// One hypervisor operation, named and shaped like the trait method it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Call {
    CreateOverlay { base: PathBuf, overlay: PathBuf, size_gib: u64 },
    RemoveFile { path: PathBuf },
    DefineVm { spec: VmSpec },
    RemoveVm { name: String },
    State { name: String },
    ListVms { prefix: String },
    DomainXml { name: String },
    Start { name: String },
    PowerOff { name: String },
    Reboot { name: String },
    Save { name: String },
    Resume { name: String },
    EnsureNetwork { spec: NetworkSpec },
    EnsureIsolationFilter,
    EnsureBlockRdpFilter,
    AttachNic { vm: String, nic: NicSpec },
    DetachNic { vm: String, mac: String },
    SetNicFilter { vm: String, nic: NicSpec },
    VncPort { name: String },
    Agent { vm: String, command: serde_json::Value, timeout_secs: i32 },
    NetworkCheck { spec: NetworkCheckSpec },
    DisableComputer { spec: NetworkCheckSpec, name: String },
}

/// One VM the agent runs for the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmReport {
    pub name: String,
    pub state: VmState,
}

/// What an agent tells the monitor about its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostReport {
    pub name: String,
    pub agent_version: String,
    /// `kvm`, `tcg`, or `simulated`.
    pub accelerator: String,
    pub capacity: Capacity,
    pub vms: Vec<VmReport>,
    /// The agent stopped its VMs because no control plane reached it for longer than its lease.
    pub fenced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    pub name: String,
    /// Where the control plane reaches the agent: `https://host:port`.
    pub address: String,
    pub certificate_request: String,
    pub capacity: Capacity,
    pub accelerator: String,
    pub agent_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinResponse {
    pub host_id: uuid::Uuid,
    pub region: String,
    /// This host's hosted networks use subnets derived from it, distinct from every other host's.
    pub subnet_index: u32,
    pub certificate: String,
    pub ca_certificate: String,
}

/// The /24 of a host's hosted network, from its subnet index (`10.214.1` for index 1, … up to
/// 2,047 hosts). Index 0 is the in-process local host, which keeps the per-region subnets.
pub fn host_subnet(index: u32) -> String {
    format!("10.{}.{}", 214 + index / 256, index % 256)
}
