//! Hypervisor hosts as members of the service: the host agent and both ends of its protocol.
//!
//! Every hypervisor host runs `cloudpc host-agent`, which drives the local libvirt/QEMU and serves
//! the control plane over HTTPS with mutual TLS; no libvirt port is ever opened to the network.
//! The control plane sees an agent as one more [`cloudpc_hypervisor::Hypervisor`]
//! ([`remote::RemoteHost`]), so provisioning does not know whether a host is local or not.
//!
//! The control plane calls the agents (as oVirt's engine calls VDSM), not the other way round: the
//! control plane's replicas are many and come and go, while an agent has one address. Each call,
//! including the monitor's status poll every few seconds, renews the agent's fence: an agent
//! that hears from no control plane for longer than its lease stops its VMs ([`server`]), so a
//! desktop recreated elsewhere never runs twice.
//!
//! Trust is set up at join: an administrator's single-use token lets the new host send a
//! certificate request, which the control plane signs with its host CA (`pki`). Agent
//! certificates are for servers only and control-plane certificates for clients only, so an agent
//! cannot call another agent.

pub mod pki;
pub mod protocol;
pub mod remote;
pub mod server;
pub mod simulated;

pub use protocol::{Call, HostReport, JoinRequest, JoinResponse, VmReport};
pub use remote::RemoteHost;
