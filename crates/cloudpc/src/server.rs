//! `cloudpc server`: settings (flag > environment > file > default), the database, the first
//! administrator token, the hypervisor hosts, the gallery, the reconciler and the HTTP listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use cloudpc_control::auth::Bootstrap;
use cloudpc_control::{App, AppConfig};
use cloudpc_hypervisor::accel::{self, Accelerator, ProbeKernel};
use cloudpc_hypervisor::libvirt::LibvirtHost;
use cloudpc_hypervisor::{Capacity, HostConfig, Hypervisor};
use cloudpc_store::Store;

use crate::cli::ServerArgs;

/// Where the state lives unless a setting says otherwise (a place QEMU's user can reach).
const DEFAULT_DATA_DIR: &str = "/var/lib/cloudpc/data";

/// The settings file; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    max_image_size_gb: Option<u64>,
    qemu_img: Option<String>,
    log: Option<String>,
    gallery_dir: Option<PathBuf>,
    libvirt_uri: Option<String>,
    region: Option<String>,
    grace_period_hours: Option<f64>,
    cleanup_delay_secs: Option<u64>,
    resync_secs: Option<u64>,
    domain_prefix: Option<String>,
    console_ticket_secs: Option<u64>,
    image_boot_timeout_secs: Option<u64>,
    max_concurrent_uploads: Option<usize>,
    max_custom_images: Option<usize>,
    upload_idle_timeout_secs: Option<u64>,
    audit_retention_days: Option<u32>,
    public_url: Option<String>,
    disk_overcommit: Option<f64>,
    image_import_dirs: Option<Vec<PathBuf>>,
    web_dir: Option<PathBuf>,
    hosts: Option<Vec<FileHost>>,
    local_host: Option<bool>,
    local_sign_in: Option<bool>,
    secrets_key_file: Option<PathBuf>,
    cpu_overcommit: Option<f64>,
    memory_overcommit: Option<f64>,
    evacuate_after_mins: Option<u64>,
    max_parallel_provisioning: Option<usize>,
    network_check_interval_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHost {
    name: String,
    uri: String,
    region: String,
    vcpus: u32,
    memory_mib: u64,
    disk_gib: u64,
}

struct Settings {
    web_dir: Option<PathBuf>,
    listen: SocketAddr,
    data_dir: PathBuf,
    gallery_dir: PathBuf,
    log: String,
    hosts: Vec<HostConfig>,
    app: AppConfig,
}

/// The hidden testing flags' `NAME:NUMBER` pairs (`--inject-fault`, `--inject-delay`).
fn parse_testing_pairs(list: &[String]) -> Result<HashMap<String, u32>, String> {
    list.iter()
        .map(|f| {
            let (step, n) =
                f.split_once(':').ok_or_else(|| format!("testing flag '{f}' must look like NAME:NUMBER"))?;
            let n: u32 = n.parse().map_err(|_| format!("testing flag '{f}': {n} is not a number"))?;
            Ok((step.to_string(), n))
        })
        .collect()
}

/// What this machine can give when no capacity is configured: 4 vCPUs per core, memory less
/// 2 GiB for the host, and the free space where disks go.
pub(crate) fn local_capacity(storage: &Path) -> Capacity {
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(4 << 20);
    let disk_gib = std::process::Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(storage)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()))
        .map(|kib| kib >> 20)
        .unwrap_or(100);
    Capacity { vcpus: cores * 4, memory_mib: (mem_kib / 1024).saturating_sub(2048).max(1024), disk_gib }
}

fn settings(args: &ServerArgs) -> Result<Settings, String> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            toml::from_str::<FileSettings>(&text)
                .map_err(|e| format!("config file {} is not valid: {e}", path.display()))?
        }
        None => FileSettings::default(),
    };
    let defaults = AppConfig::default();
    // Absolute, so the state does not depend on where the server was started from.
    let data_dir = args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let data_dir = std::path::absolute(&data_dir)
        .map_err(|e| format!("cannot resolve the data directory {}: {e}", data_dir.display()))?;
    let storage_dir = data_dir.join("disks");
    let hosts = match file.hosts {
        Some(list) => list
            .into_iter()
            .map(|h| HostConfig {
                name: h.name,
                uri: h.uri,
                region: h.region,
                capacity: Capacity { vcpus: h.vcpus, memory_mib: h.memory_mib, disk_gib: h.disk_gib },
                subnet_index: 0,
            })
            .collect(),
        // A control plane only: every host joins with an agent.
        None if args.no_local_host || file.local_host == Some(false) => Vec::new(),
        None => vec![HostConfig {
            name: "local".into(),
            uri: args.libvirt_uri.clone().or(file.libvirt_uri).unwrap_or_else(|| "qemu:///system".into()),
            region: args.region.clone().or(file.region).unwrap_or_else(|| "local".into()),
            capacity: local_capacity(data_dir.parent().filter(|p| p.exists()).unwrap_or(Path::new("."))),
            subnet_index: 0,
        }],
    };
    let hours = args.grace_period_hours.or(file.grace_period_hours).unwrap_or(168.0);
    if !(0.0..=8760.0).contains(&hours) {
        return Err(format!("grace period must be between 0 and 8760 hours, not {hours}"));
    }
    let gallery_dir = args.gallery_dir.clone().or(file.gallery_dir).unwrap_or_else(|| data_dir.join("gallery"));
    Ok(Settings {
        web_dir: Some(args.web_dir.clone().or(file.web_dir).unwrap_or_else(|| PathBuf::from("web/dist"))),
        listen: args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7365))),
        gallery_dir: gallery_dir.clone(),
        log: args.log.clone().or(file.log).unwrap_or_else(|| "info".into()),
        hosts,
        app: AppConfig {
            max_image_size_gb: args.max_image_size_gb.or(file.max_image_size_gb).unwrap_or(defaults.max_image_size_gb),
            image_test_boot: !args.skip_image_test_boot,
            image_import_dirs: if args.image_import_dirs.is_empty() {
                file.image_import_dirs.unwrap_or_else(|| vec![data_dir.join("import")])
            } else {
                args.image_import_dirs.clone()
            },
            image_test_boot_timeout: args
                .image_boot_timeout_secs
                .or(file.image_boot_timeout_secs)
                .map(|s| Duration::from_secs(s.max(1)))
                .unwrap_or(defaults.image_test_boot_timeout),
            max_concurrent_uploads: args
                .max_concurrent_uploads
                .or(file.max_concurrent_uploads)
                .unwrap_or(defaults.max_concurrent_uploads)
                .max(1),
            upload_idle_timeout: args
                .upload_idle_timeout_secs
                .or(file.upload_idle_timeout_secs)
                .map(|s| Duration::from_secs(s.max(1)))
                .unwrap_or(defaults.upload_idle_timeout),
            max_custom_images: args.max_custom_images.or(file.max_custom_images).unwrap_or(defaults.max_custom_images),
            qemu_img: args.qemu_img.clone().or(file.qemu_img).unwrap_or(defaults.qemu_img),
            image_free_space_reserve: args
                .image_free_space_reserve_mib
                .map(|mib| mib << 20)
                .unwrap_or(defaults.image_free_space_reserve),
            grace_period: Duration::from_secs_f64(hours * 3600.0),
            cleanup_delay: Duration::from_secs(args.cleanup_delay_secs.or(file.cleanup_delay_secs).unwrap_or(3 * 3600)),
            idle_minute: args.idle_minute_secs.map(|s| Duration::from_secs(s.max(1))).unwrap_or(defaults.idle_minute),
            network_check_interval: Duration::from_secs(
                args.network_check_interval_secs.or(file.network_check_interval_secs).unwrap_or(6 * 3600).max(1),
            ),
            resync_interval: Duration::from_secs(args.resync_secs.or(file.resync_secs).unwrap_or(10).max(1)),
            domain_prefix: args.domain_prefix.clone().or(file.domain_prefix).unwrap_or(defaults.domain_prefix),
            storage_dir,
            image_dir: data_dir.join("images"),
            gallery_dir,
            max_parallel_provisioning: args
                .max_parallel_provisioning
                .or(file.max_parallel_provisioning)
                .unwrap_or(defaults.max_parallel_provisioning)
                .clamp(1, 1024),
            injected_faults: parse_testing_pairs(&args.inject_fault)?,
            injected_panics: parse_testing_pairs(&args.inject_panic)?,
            disk_overcommit: match args.disk_overcommit.or(file.disk_overcommit) {
                Some(r) if !(1.0..=100.0).contains(&r) => {
                    return Err(format!("--disk-overcommit must be between 1 and 100, not {r}"))
                }
                Some(r) => r,
                None => defaults.disk_overcommit,
            },
            cpu_overcommit: match args.cpu_overcommit.or(file.cpu_overcommit) {
                Some(r) if !(0.1..=64.0).contains(&r) => {
                    return Err(format!("--cpu-overcommit must be between 0.1 and 64, not {r}"))
                }
                Some(r) => r,
                None => defaults.cpu_overcommit,
            },
            evacuate_after: args
                .evacuate_after_mins
                .or(file.evacuate_after_mins)
                .filter(|m| *m > 0)
                .map(|m| Duration::from_secs(m * 60)),
            memory_overcommit: match args.memory_overcommit.or(file.memory_overcommit) {
                Some(r) if !(0.1..=4.0).contains(&r) => {
                    return Err(format!("--memory-overcommit must be between 0.1 and 4, not {r}"))
                }
                Some(r) => r,
                None => defaults.memory_overcommit,
            },
            public_url: match args.public_url.clone().or(file.public_url) {
                Some(u) => Some(check_public_url(&u)?),
                None => None,
            },
            audit_retention_days: match args.audit_retention_days.or(file.audit_retention_days) {
                Some(0) => return Err("the audit retention must be at least 1 day".into()),
                Some(d) => d,
                None => defaults.audit_retention_days,
            },
            injected_delays: parse_testing_pairs(&args.inject_delay)?
                .into_iter()
                .map(|(point, ms)| (point, Duration::from_millis(u64::from(ms))))
                .collect(),
            console_ticket_ttl: Duration::from_secs(
                args.console_ticket_secs.or(file.console_ticket_secs).unwrap_or(30).max(1),
            ),
            local_sign_in: !args.no_local_sign_in && file.local_sign_in != Some(false),
            secrets_key_file: args
                .secrets_key_file
                .clone()
                .or(file.secrets_key_file)
                .unwrap_or_else(|| data_dir.join("secrets.key")),
        },
        data_dir,
    })
}

/// `--public-url`: a scheme and an authority only (`https://cloudpc.contoso.com`), without a
/// trailing slash.
fn check_public_url(u: &str) -> Result<String, String> {
    let bad = || format!("--public-url '{u}' must look like https://host[:port] (no path)");
    let (scheme, rest) = u.split_once("://").ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let host_ok = !rest.is_empty()
        && rest.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        && !rest.starts_with(':');
    if !(scheme == "https" || scheme == "http") || !host_ok {
        return Err(bad());
    }
    Ok(format!("{scheme}://{rest}"))
}

fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Opens PostgreSQL when a database URL is given, else SQLite in the data directory. The URL
/// carries a password, so messages name only its host part.
async fn open_store(dir: &Path, database_url: Option<&str>) -> Result<Arc<dyn Store>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    let db = dir.join("cloudpc.db");
    let what = match database_url {
        Some(url) => format!("PostgreSQL database at {}", url.rsplit_once('@').map(|(_, h)| h).unwrap_or("(URL)")),
        None => format!("database {}", db.display()),
    };
    cloudpc_store::open(database_url, &db).await.map_err(|e| {
        let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
        format!("cannot open {what}: {e}{cause}")
    })
}

/// Finds a kernel and initramfs in the gallery to probe KVM with.
fn probe_kernel(gallery: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut dirs: Vec<_> = std::fs::read_dir(gallery).ok()?.flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs.into_iter().find_map(|d| {
        let (k, i) = (d.join("vmlinuz"), d.join("initrd.img"));
        (k.exists() && i.exists()).then_some((k, i))
    })
}

/// The accelerator, probed once per boot of the machine (the answer is kept in /run).
pub(crate) async fn accelerator(gallery: &Path) -> Accelerator {
    let cache = Path::new("/run/cloudpc/accelerator");
    if let Ok(text) = std::fs::read_to_string(cache) {
        match text.trim() {
            "kvm" => return Accelerator::Kvm,
            "tcg" => return Accelerator::Tcg,
            _ => {}
        }
    }
    let kernel = probe_kernel(gallery);
    let (accel, why) = accel::probe(
        "qemu-system-x86_64",
        kernel.as_ref().map(|(k, i)| ProbeKernel { kernel: k, initrd: i }),
        Duration::from_secs(8),
    )
    .await;
    tracing::info!(accelerator = ?accel, "{why}");
    if kernel.is_some() {
        let _ = std::fs::create_dir_all("/run/cloudpc");
        let _ = std::fs::write(cache, if accel == Accelerator::Kvm { "kvm" } else { "tcg" });
    }
    accel
}

pub async fn run(args: ServerArgs) -> ExitCode {
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

async fn serve(args: ServerArgs) -> Result<(), String> {
    let s = settings(&args)?;
    init_logging(&s.log);
    let store = open_store(&s.data_dir, args.database_url.as_deref()).await?;
    tracing::info!(database = store.backend(), "state store open");
    for dir in [&s.app.storage_dir, &s.app.image_dir] {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    // QEMU on this machine must reach the disks and images, else every VM would fail later.
    if s.hosts.iter().any(|h| h.uri == "qemu:///system") {
        let gallery = s.gallery_dir.exists().then_some(s.gallery_dir.as_path());
        let dirs: Vec<&Path> = [Some(s.app.storage_dir.as_path()), Some(s.app.image_dir.as_path()), gallery]
            .into_iter()
            .flatten()
            .collect();
        crate::preflight::check_qemu_can_reach(&dirs, "/etc/libvirt/qemu.conf")?;
    }
    // The default import directory exists, so an operator sees where to put files.
    if args.image_import_dirs.is_empty() {
        let _ = std::fs::create_dir_all(s.data_dir.join("import"));
    }
    let accel = accelerator(&s.gallery_dir).await;
    let mut hosts: Vec<Arc<dyn Hypervisor>> = Vec::new();
    for h in s.hosts.clone() {
        let name = h.name.clone();
        match LibvirtHost::open(h, accel, &s.app.qemu_img) {
            Ok(host) => hosts.push(Arc::new(host)),
            // A host that is down must not keep the control plane from starting.
            Err(e) => {
                tracing::warn!(host = %name, error = %e, "hypervisor host unavailable; Cloud PCs wait for capacity")
            }
        }
    }
    let app = App::new(store, s.app, hosts);
    app.start_hosts().await.map_err(|e| format!("cannot set up the hypervisor hosts: {e}"))?;
    match app.bootstrap_admin_token(args.admin_token.as_deref()).await.map_err(|e| e.to_string())? {
        // Printed to stdout once, never logged: logs are often shipped elsewhere.
        Bootstrap::Created(secret) => {
            println!("Administrator token (shown this once; store it safely, e.g. export CLOUDPC_TOKEN=...):\n{secret}")
        }
        Bootstrap::FromEnvironment => tracing::info!("administrator token from CLOUDPC_ADMIN_TOKEN is registered"),
        Bootstrap::Existing => {}
    }
    let n = app.register_gallery().await.map_err(|e| e.to_string())?;
    tracing::info!(images = n, dir = %s.gallery_dir.display(), "gallery loaded");
    app.resume_image_validation().await.map_err(|e| e.to_string())?;
    let demo = if args.demo { app.set_up_demo().await.map_err(|e| format!("demo set-up failed: {e}"))? } else { None };
    app.start_replica_tasks();
    tokio::spawn(app.clone().run_reconciler());
    tokio::spawn(app.clone().run_host_monitor());
    tokio::spawn(app.clone().run_drains());
    tokio::spawn(app.clone().run_network_check_schedule());
    let pruner = app.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = pruner.prune_audit_log().await {
                tracing::warn!(error = %e, "could not delete expired audit events");
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
    let listener =
        tokio::net::TcpListener::bind(s.listen).await.map_err(|e| format!("cannot listen on {}: {e}", s.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if let Some(d) = demo {
        // Printed once, like the administrator token.
        println!(
            "Demo set up: {}.\nSign in at http://{addr}/ as {} with password {}",
            d.summary, d.user_principal_name, d.password
        );
    }
    println!("cloudpc listening on http://{addr}");
    tracing::info!(%addr, data_dir = %s.data_dir.display(), "cloudpc server started");
    let web = s.web_dir.filter(|d| d.join("index.html").exists());
    if web.is_none() {
        tracing::info!("no built portal found (run npm run build in web/); the API works without it");
    }
    let service = cloudpc_api::router(app, web).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(shutdown()).await.map_err(|e| format!("server failed: {e}"))
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
