//! `cloudpc host-agent`: sets up and runs the agent of one hypervisor host.
//!
//! The first start joins: the agent makes its key, sends a certificate request with the join
//! token, and keeps what the control plane answers (its host id, region, subnet, certificate and
//! the CA) in its data directory. Later starts read it back; the token is not needed again.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cloudpc_agent::pki;
use cloudpc_agent::protocol::{JoinRequest, JoinResponse};
use cloudpc_agent::server::{Agent, AgentConfig};
use cloudpc_agent::simulated::SimulatedHost;
use cloudpc_hypervisor::libvirt::LibvirtHost;
use cloudpc_hypervisor::{Accelerator, Capacity, HostConfig, Hypervisor};

use crate::cli::HostAgentArgs;

/// What the agent remembers of its join (`agent.json`, next to `key.pem`, `cert.pem`, `ca.pem`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Joined {
    host_id: uuid::Uuid,
    name: String,
    region: String,
    subnet_index: u32,
    control_plane: String,
    address: String,
    #[serde(default = "default_prefix")]
    domain_prefix: String,
}

fn default_prefix() -> String {
    "cloudpc-".into()
}

pub async fn run(args: HostAgentArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn machine_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".into())
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[allow(clippy::too_many_arguments)]
async fn join(
    dir: &Path,
    url: &str,
    token: &str,
    name: &str,
    address: &str,
    capacity: Capacity,
    accelerator: &str,
    domain_prefix: &str,
) -> Result<Joined, String> {
    let (csr, key) = pki::host_request(name).map_err(|e| e.to_string())?;
    let req = JoinRequest {
        token: token.to_string(),
        name: name.to_string(),
        address: address.to_string(),
        certificate_request: csr,
        capacity,
        accelerator: accelerator.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let url = url.trim_end_matches('/');
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().map_err(|e| e.to_string())?;
    let resp = http
        .post(format!("{url}/cloudpc/agent/join"))
        .json(&req)
        .send()
        .await
        .map_err(|e| format!("cannot reach the control plane at {url}: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or("no reason given").to_string();
        return Err(format!("the control plane refused to join this host ({status}): {message}"));
    }
    let answer: JoinResponse =
        resp.json().await.map_err(|e| format!("the control plane's answer is not understood: {e}"))?;
    write_private(&dir.join("key.pem"), &key)?;
    write_private(&dir.join("cert.pem"), &answer.certificate)?;
    write_private(&dir.join("ca.pem"), &answer.ca_certificate)?;
    let joined = Joined {
        host_id: answer.host_id,
        name: name.to_string(),
        region: answer.region,
        subnet_index: answer.subnet_index,
        control_plane: url.to_string(),
        address: address.to_string(),
        domain_prefix: domain_prefix.to_string(),
    };
    write_private(&dir.join("agent.json"), &serde_json::to_string_pretty(&joined).unwrap_or_default())?;
    Ok(joined)
}

async fn serve(args: HostAgentArgs) -> Result<(), String> {
    let dir = std::path::absolute(&args.data_dir).map_err(|e| e.to_string())?;
    let disks: PathBuf = dir.join("disks");
    std::fs::create_dir_all(&disks).map_err(|e| format!("cannot create {}: {e}", disks.display()))?;
    let name = args.name.clone().unwrap_or_else(machine_name);
    let measured = crate::server::local_capacity(&dir);
    let capacity = Capacity {
        vcpus: args.vcpus.unwrap_or(measured.vcpus),
        memory_mib: args.memory_mib.unwrap_or(measured.memory_mib),
        disk_gib: args.disk_gib.unwrap_or(measured.disk_gib),
    };
    let (accel, accel_name) = if args.simulate {
        (Accelerator::Tcg, "simulated".to_string())
    } else {
        let a = crate::server::accelerator(&args.gallery_dir).await;
        (a, if a == Accelerator::Kvm { "kvm" } else { "tcg" }.to_string())
    };
    let state_file = dir.join("agent.json");
    let earlier: Option<Joined> = match state_file.exists() {
        true => Some(serde_json::from_str(&read(&state_file)?).map_err(|e| format!("{}: {e}", state_file.display()))?),
        false => None,
    };
    // Port 0 picks a free port at the join (tests); afterwards the agent keeps the port it
    // registered, which is where the control plane looks for it.
    let mut listen = args.listen;
    if let (0, Some(j)) = (listen.port(), &earlier) {
        listen
            .set_port(j.address.rsplit_once(':').and_then(|(_, p)| p.trim_end_matches('/').parse().ok()).unwrap_or(0));
    }
    // Bound before joining, so that port 0 advertises the port really used.
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let joined = match (&args.join, &args.token, earlier) {
        (Some(url), Some(token), None) => {
            let address = match &args.advertise {
                Some(a) => a.clone(),
                None if addr.ip().is_unspecified() => format!("https://{}:{}", machine_name(), addr.port()),
                None => format!("https://{addr}"),
            };
            let prefix = args.domain_prefix.clone().unwrap_or_else(default_prefix);
            let j = join(&dir, url, token, &name, &address, capacity, &accel_name, &prefix).await?;
            println!("joined {} as host '{}' in region '{}'", j.control_plane, j.name, j.region);
            j
        }
        (Some(_), _, Some(_)) => {
            return Err(format!(
                "this agent joined already ({}); remove the data directory to join again",
                state_file.display()
            ))
        }
        (None, _, Some(j)) => j,
        _ => return Err("this agent has not joined a control plane: run it once with --join URL --token TOKEN".into()),
    };
    if let Some(p) = args.domain_prefix.as_deref().filter(|p| *p != joined.domain_prefix) {
        return Err(format!(
            "this agent joined with domain prefix '{}', not '{p}': its VMs are found by that prefix",
            joined.domain_prefix
        ));
    }
    let tls =
        pki::server_config(&read(&dir.join("ca.pem"))?, &read(&dir.join("cert.pem"))?, &read(&dir.join("key.pem"))?)
            .map_err(|e| e.to_string())?;
    let config = HostConfig {
        name: joined.name.clone(),
        uri: args.libvirt_uri.clone(),
        region: joined.region.clone(),
        capacity,
        subnet_index: joined.subnet_index,
    };
    let backend: Arc<dyn Hypervisor> = if args.simulate {
        Arc::new(SimulatedHost::new(config, Duration::from_millis(args.simulate_latency_ms)))
    } else {
        Arc::new(LibvirtHost::open(config, accel, "qemu-img").map_err(|e| format!("cannot open libvirt: {e}"))?)
    };
    let agent = Agent::new(
        AgentConfig {
            name: joined.name.clone(),
            domain_prefix: joined.domain_prefix.clone(),
            disks_dir: disks,
            images_dir: dir.join("images"),
            simulated: args.simulate,
            fence_after: Duration::from_secs(args.fence_after_secs.max(1)),
            accelerator: accel_name,
            capacity,
        },
        backend,
    );
    println!("cloudpc host agent '{}' listening on https://{addr} (mutual TLS)", joined.name);
    tracing::info!(host = %joined.name, region = %joined.region, %addr, "host agent started");
    tokio::select! {
        r = cloudpc_agent::server::serve(agent, listener, tls) => r.map_err(|e| format!("the agent stopped: {e}")),
        _ = shutdown() => Ok(()),
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
