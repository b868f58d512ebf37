//! The host agent: serves the control plane over mutual TLS and drives the local hypervisor.
//!
//! The agent keeps its VMs and files apart from anything else on the host: every domain it makes
//! carries its prefix (so several agents, or an agent and a one-machine install, can share one
//! libvirt), and every Cloud PC file lives in its own disks directory whatever path the control
//! plane names (only the file name is used). Base images are read where the control plane says
//! they are.
//!
//! Fencing: each request from a control plane renews the agent's lease. When none arrives for
//! longer than the lease, the control plane may be recreating this host's Cloud PCs elsewhere,
//! so the agent stops (destroys) its running VMs. When a control plane is heard from again, the
//! fence lifts and the control plane decides what to start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use cloudpc_hypervisor::{Capacity, Hypervisor, HypervisorError, VmSpec, VmState};

use crate::protocol::{Call, HostReport, VmReport, CONSOLE_UPGRADE, PROTOCOL, PROTOCOL_HEADER};

/// How the agent was set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    /// Put before every domain name the control plane asks for.
    pub domain_prefix: String,
    /// Where this host keeps Cloud PC disks and console logs.
    pub disks_dir: PathBuf,
    /// Where this host caches base images, by the sha256 of their content.
    pub images_dir: PathBuf,
    /// A simulated host (no VMs): it claims to have every image.
    pub simulated: bool,
    /// Longer than this without a control plane, and the agent stops its VMs.
    pub fence_after: Duration,
    pub accelerator: String,
    pub capacity: Capacity,
}

pub struct Agent {
    config: AgentConfig,
    backend: Arc<dyn Hypervisor>,
    last_contact: Mutex<Instant>,
    fenced: AtomicBool,
}

impl Agent {
    pub fn new(config: AgentConfig, backend: Arc<dyn Hypervisor>) -> Arc<Self> {
        Arc::new(Self { config, backend, last_contact: Mutex::new(Instant::now()), fenced: AtomicBool::new(false) })
    }

    fn touch(&self) {
        *self.last_contact.lock().expect("contact") = Instant::now();
        if self.fenced.swap(false, Ordering::SeqCst) {
            tracing::info!("a control plane reached the agent again; the fence is lifted");
        }
    }

    fn vm(&self, name: &str) -> String {
        format!("{}{name}", self.config.domain_prefix)
    }

    /// The host's own place for a file the control plane names: its name in the disks directory.
    fn file(&self, path: &Path) -> Result<PathBuf, HypervisorError> {
        match path.file_name() {
            Some(name) if name != ".." => Ok(self.config.disks_dir.join(name)),
            _ => Err(HypervisorError::Io(format!("'{}' names no file", path.display()))),
        }
    }

    async fn run(&self, call: Call) -> Result<serde_json::Value, HypervisorError> {
        let hv = &self.backend;
        let unit = |r: Result<(), HypervisorError>| r.map(|()| serde_json::Value::Null);
        let json = |v: serde_json::Value| Ok::<_, HypervisorError>(v);
        match call {
            Call::CreateOverlay { base, overlay, size_gib } => {
                let overlay = self.file(&overlay)?;
                hv.create_overlay(&base, &overlay, size_gib).await?;
                // A base from the image cache is named relative to the disk (../images/<sha256>),
                // so the disk still finds it after a move to another host with its own cache.
                if let (Ok(rel), false) = (base.strip_prefix(&self.config.images_dir), self.config.simulated) {
                    let relative = Path::new("../images").join(rel);
                    let out = tokio::process::Command::new("qemu-img")
                        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(&relative)
                        .arg(&overlay)
                        .output()
                        .await
                        .map_err(|e| HypervisorError::Command { program: "qemu-img".into(), message: e.to_string() })?;
                    if !out.status.success() {
                        return Err(HypervisorError::Command {
                            program: "qemu-img rebase".into(),
                            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                        });
                    }
                }
                Ok(serde_json::Value::Null)
            }
            Call::RemoveFile { path } => unit(hv.remove_file(&self.file(&path)?).await),
            Call::DefineVm { spec } => {
                let spec = VmSpec {
                    name: self.vm(&spec.name),
                    disk: self.file(&spec.disk)?,
                    console_log: self.file(&spec.console_log)?,
                    ..spec
                };
                unit(hv.define_vm(&spec).await)
            }
            Call::RemoveVm { name } => unit(hv.remove_vm(&self.vm(&name)).await),
            Call::State { name } => json(serde_json::to_value(hv.state(&self.vm(&name)).await?).unwrap_or_default()),
            Call::ListVms { prefix } => {
                let names = hv.list_vms(&self.vm(&prefix)).await?;
                let own: Vec<String> = names
                    .into_iter()
                    .filter_map(|n| n.strip_prefix(&self.config.domain_prefix).map(str::to_string))
                    .collect();
                json(serde_json::json!(own))
            }
            Call::DomainXml { name } => json(serde_json::json!(hv.domain_xml(&self.vm(&name)).await?)),
            Call::Start { name } => unit(hv.start(&self.vm(&name)).await),
            Call::PowerOff { name } => unit(hv.power_off(&self.vm(&name)).await),
            Call::Reboot { name } => unit(hv.reboot(&self.vm(&name)).await),
            Call::Save { name } => unit(hv.save(&self.vm(&name)).await),
            Call::Resume { name } => json(serde_json::to_value(hv.resume(&self.vm(&name)).await?).unwrap_or_default()),
            Call::EnsureNetwork { spec } => unit(hv.ensure_network(&spec).await),
            Call::EnsureIsolationFilter => json(serde_json::json!(hv.ensure_isolation_filter().await?)),
            Call::EnsureBlockRdpFilter => json(serde_json::json!(hv.ensure_block_rdp_filter().await?)),
            Call::AttachNic { vm, nic } => unit(hv.attach_nic(&self.vm(&vm), &nic).await),
            Call::DetachNic { vm, mac } => unit(hv.detach_nic(&self.vm(&vm), &mac).await),
            Call::SetNicFilter { vm, nic } => unit(hv.set_nic_filter(&self.vm(&vm), &nic).await),
            Call::VncPort { name } => json(serde_json::json!(hv.vnc_port(&self.vm(&name)).await?)),
            Call::Agent { vm, command, timeout_secs } => hv.agent(&self.vm(&vm), &command, timeout_secs).await,
            Call::NetworkCheck { spec } => {
                json(serde_json::to_value(hv.network_check(&spec).await?).unwrap_or_default())
            }
            Call::DisableComputer { spec, name } => json(serde_json::json!(hv.disable_computer(&spec, &name).await?)),
        }
    }

    /// This host's VMs, by the names the control plane knows them by.
    async fn vms(&self) -> Result<Vec<VmReport>, HypervisorError> {
        let mut out = Vec::new();
        for full in self.backend.list_vms(&self.config.domain_prefix).await? {
            let state = self.backend.state(&full).await.unwrap_or(VmState::Other);
            let name = full.strip_prefix(&self.config.domain_prefix).unwrap_or(&full).to_string();
            out.push(VmReport { name, state });
        }
        Ok(out)
    }

    pub async fn report(&self) -> Result<HostReport, HypervisorError> {
        Ok(HostReport {
            name: self.config.name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            accelerator: self.config.accelerator.clone(),
            capacity: self.config.capacity,
            vms: self.vms().await?,
            fenced: self.fenced.load(Ordering::SeqCst),
        })
    }

    /// Stops every running VM of this agent once no control plane has been heard from for
    /// longer than the lease. Runs for the life of the agent.
    pub async fn watch_fence(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let idle = self.last_contact.lock().expect("contact").elapsed();
            if idle <= self.config.fence_after || self.fenced.load(Ordering::SeqCst) {
                continue;
            }
            tracing::warn!(
                idle_secs = idle.as_secs(),
                "no control plane for longer than the lease: stopping this host's VMs so none runs twice"
            );
            match self.backend.list_vms(&self.config.domain_prefix).await {
                Ok(names) => {
                    let mut all_stopped = true;
                    for name in names {
                        if let Err(e) = self.backend.power_off(&name).await {
                            all_stopped = false;
                            tracing::warn!(vm = %name, error = %e, "could not stop a VM while fencing");
                        }
                    }
                    // Set only when every VM is stopped, so a failure is tried again.
                    if all_stopped {
                        self.fenced.store(true, Ordering::SeqCst);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not list VMs to fence; trying again"),
            }
        }
    }
}

fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/call", post(call))
        .route("/v1/status", get(status))
        .route("/v1/console/{name}", get(console))
        .route("/v1/files/{name}", get(export_file).put(import_file))
        .route("/v1/images/{sha256}", get(has_image).put(receive_image))
        .route("/v1/images/retain", post(retain_images))
        .layer(axum::middleware::from_fn_with_state(agent.clone(), contact))
        .with_state(agent)
}

/// Every request reaching here came with a control-plane certificate (TLS checked it): it renews
/// the fence, if it speaks this protocol.
async fn contact(State(agent): State<Arc<Agent>>, req: Request, next: axum::middleware::Next) -> Response {
    let version = req.headers().get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    if version != Some(PROTOCOL) {
        return (
            StatusCode::BAD_REQUEST,
            format!("this agent speaks protocol {PROTOCOL}; the request said {version:?}: upgrade the older side"),
        )
            .into_response();
    }
    agent.touch();
    next.run(req).await
}

async fn call(
    State(agent): State<Arc<Agent>>,
    Json(call): Json<Call>,
) -> Json<Result<serde_json::Value, HypervisorError>> {
    Json(agent.run(call).await)
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    match agent.report().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// Images younger than this are kept whatever `retain` says: the Cloud PC that asked for one may
/// not have recorded it yet.
const FRESH_IMAGE: Duration = Duration::from_secs(600);

fn image_path(agent: &Agent, sha256: &str) -> Result<PathBuf, (StatusCode, String)> {
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        return Err((StatusCode::BAD_REQUEST, format!("'{sha256}' is not a sha256 digest (64 lowercase hex digits)")));
    }
    Ok(agent.config.images_dir.join(sha256))
}

/// Whether the image is cached here, and where.
async fn has_image(State(agent): State<Arc<Agent>>, UrlPath(sha256): UrlPath<String>) -> Response {
    let path = match image_path(&agent, &sha256) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    if agent.config.simulated || path.exists() {
        Json(path).into_response()
    } else {
        (StatusCode::NOT_FOUND, format!("image {sha256} is not on this host")).into_response()
    }
}

/// An image arriving: written under a temporary name while its digest is computed, kept only
/// if the digest is the one it was sent as.
async fn receive_image(State(agent): State<Arc<Agent>>, UrlPath(sha256): UrlPath<String>, body: Body) -> Response {
    use futures_util::StreamExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let path = match image_path(&agent, &sha256) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let fail = |e: String| (StatusCode::BAD_GATEWAY, e).into_response();
    if let Err(e) = tokio::fs::create_dir_all(&agent.config.images_dir).await {
        return fail(format!("cannot create {}: {e}", agent.config.images_dir.display()));
    }
    // Unique, so two Cloud PCs fetching one image at once do not write into each other.
    let partial = path.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
    let result = async {
        let mut file = tokio::fs::File::create(&partial).await.map_err(|e| e.to_string())?;
        let mut hasher = sha2::Sha256::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("the image did not arrive whole: {e}"))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| e.to_string())?;
        }
        file.sync_all().await.map_err(|e| e.to_string())?;
        let got = format!("{:x}", hasher.finalize());
        if got != sha256 {
            return Err(format!("the image arrived with sha256 {got}, not {sha256}: refused"));
        }
        tokio::fs::rename(&partial, &path).await.map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(()) => Json(path).into_response(),
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            if e.contains("refused") {
                (StatusCode::UNPROCESSABLE_ENTITY, e).into_response()
            } else {
                fail(e)
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Retain {
    keep: Vec<String>,
}

/// Removes cached images the control plane no longer needs here (not those just copied).
async fn retain_images(State(agent): State<Arc<Agent>>, Json(r): Json<Retain>) -> Response {
    let mut removed = Vec::new();
    let Ok(mut dir) = tokio::fs::read_dir(&agent.config.images_dir).await else { return Json(removed).into_response() };
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || r.keep.contains(&name) {
            continue;
        }
        let fresh = entry.metadata().await.ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if fresh.is_none_or(|age| age < FRESH_IMAGE) {
            continue;
        }
        if tokio::fs::remove_file(entry.path()).await.is_ok() {
            tracing::info!(image = %name, "removed a cached image no Cloud PC here needs");
            removed.push(name);
        }
    }
    Json(removed).into_response()
}

/// A Cloud PC's file (its disk), streamed to the control plane for a move to another host.
async fn export_file(State(agent): State<Arc<Agent>>, UrlPath(name): UrlPath<String>) -> Response {
    let path = match agent.file(Path::new(&name)) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match agent.backend.export_file(&path).await {
        Ok(Some((reader, len))) => Response::builder()
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from_stream(tokio_util::io::ReaderStream::new(reader)))
            .unwrap_or_default(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("{name} is not on this host")).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// A Cloud PC's file arriving from another host.
async fn import_file(State(agent): State<Arc<Agent>>, UrlPath(name): UrlPath<String>, body: Body) -> Response {
    use futures_util::TryStreamExt;
    let path = match agent.file(Path::new(&name)) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let reader = tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    match agent.backend.import_file(&path, Box::new(reader)).await {
        Ok(n) => Json(n).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// Relays the VM's loopback console over the upgraded connection.
async fn console(State(agent): State<Arc<Agent>>, UrlPath(name): UrlPath<String>, mut req: Request) -> Response {
    let asked = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()) == Some(CONSOLE_UPGRADE);
    if !asked {
        return (StatusCode::BAD_REQUEST, format!("a console needs 'Upgrade: {CONSOLE_UPGRADE}'")).into_response();
    }
    let mut vnc = match agent.backend.open_console(&agent.vm(&name)).await {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(up) => {
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut up, &mut vnc).await;
            }
            Err(e) => tracing::debug!(error = %e, "console upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, CONSOLE_UPGRADE)
        .body(Body::empty())
        .unwrap_or_default()
}

/// Serves the agent on `listener` with `tls` until the process ends. `axum::serve` takes plain
/// TCP only, so the accept loop wraps each connection in TLS itself (as axum's own rustls
/// example does) and hands it to hyper with upgrades, which consoles need.
pub async fn serve(agent: Arc<Agent>, listener: TcpListener, tls: rustls::ServerConfig) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let app = router(agent.clone());
    tokio::spawn(agent.watch_fence());
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "refused a connection: TLS failed (no valid control-plane certificate?)");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulated::SimulatedHost;
    use cloudpc_hypervisor::HostConfig;
    use sha2::Digest;

    fn agent(dir: &Path) -> Arc<Agent> {
        let capacity = Capacity { vcpus: 4, memory_mib: 4096, disk_gib: 10 };
        let config =
            HostConfig { name: "hv".into(), uri: "test:///".into(), region: "r".into(), capacity, subnet_index: 1 };
        Agent::new(
            AgentConfig {
                name: "hv".into(),
                domain_prefix: "p-".into(),
                disks_dir: dir.join("disks"),
                images_dir: dir.join("images"),
                fence_after: Duration::from_secs(60),
                accelerator: "tcg".into(),
                capacity,
                simulated: false,
            },
            Arc::new(SimulatedHost::new(config, Duration::ZERO)),
        )
    }

    #[tokio::test]
    async fn test_an_image_is_kept_only_when_it_arrives_with_the_digest_it_was_sent_as() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let bytes = b"a base image".to_vec();
        let good = format!("{:x}", sha2::Sha256::digest(&bytes));
        let bad = format!("{:x}", sha2::Sha256::digest(b"something else"));
        let r = receive_image(State(a.clone()), UrlPath(bad.clone()), Body::from(bytes.clone())).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(std::fs::read_dir(dir.path().join("images")).unwrap().count(), 0, "nothing left behind");
        let r = receive_image(State(a.clone()), UrlPath("../../etc/passwd".into()), Body::from(bytes.clone())).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = receive_image(State(a.clone()), UrlPath(good.clone()), Body::from(bytes.clone())).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(std::fs::read(dir.path().join("images").join(&good)).unwrap(), bytes);
        assert_eq!(has_image(State(a.clone()), UrlPath(good)).await.status(), StatusCode::OK);
        assert_eq!(has_image(State(a), UrlPath(bad)).await.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn test_retain_removes_old_images_not_kept_and_spares_fresh_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let name = |c: char| std::iter::repeat_n(c, 64).collect::<String>();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        for (n, modified) in [(name('a'), old), (name('b'), old), (name('c'), std::time::SystemTime::now())] {
            let f = std::fs::File::create(images.join(&n)).unwrap();
            f.set_modified(modified).unwrap();
        }
        let r = retain_images(State(a), Json(Retain { keep: vec![name('a')] })).await;
        assert_eq!(r.status(), StatusCode::OK);
        let mut left: Vec<String> = std::fs::read_dir(&images)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![name('a'), name('c')], "kept, and too fresh to judge");
    }
}
