//! `cloudpc server`: settings (flag > environment > file > default), the database, the first
//! administrator token, and the HTTP listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde::Deserialize;

use cloudpc_control::auth::Bootstrap;
use cloudpc_control::{App, AppConfig};
use cloudpc_store::SqliteStore;

use crate::cli::ServerArgs;

/// The settings file; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    max_image_size_gb: Option<u64>,
    qemu_img: Option<String>,
    log: Option<String>,
}

struct Settings {
    listen: SocketAddr,
    data_dir: PathBuf,
    log: String,
    app: AppConfig,
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
    Ok(Settings {
        listen: args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7365))),
        data_dir: args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("cloudpc-data")),
        log: args.log.clone().or(file.log).unwrap_or_else(|| "info".into()),
        app: AppConfig {
            max_image_size_gb: args.max_image_size_gb.or(file.max_image_size_gb).unwrap_or(defaults.max_image_size_gb),
            qemu_img: args.qemu_img.clone().or(file.qemu_img).unwrap_or(defaults.qemu_img),
        },
    })
}

fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

async fn open_store(dir: &Path) -> Result<SqliteStore, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    let db = dir.join("cloudpc.db");
    SqliteStore::open(&db).await.map_err(|e| {
        let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
        format!("cannot open database {}: {e}{cause}", db.display())
    })
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
    let store = open_store(&s.data_dir).await?;
    let app = App::new(Arc::new(store), s.app);
    match app.bootstrap_admin_token(args.admin_token.as_deref()).await.map_err(|e| e.to_string())? {
        // Printed to stdout once, never logged: logs are often shipped elsewhere.
        Bootstrap::Created(secret) => {
            println!("Administrator token (shown this once; store it safely, e.g. export CLOUDPC_TOKEN=...):\n{secret}")
        }
        Bootstrap::FromEnvironment => tracing::info!("administrator token from CLOUDPC_ADMIN_TOKEN is registered"),
        Bootstrap::Existing => {}
    }
    app.resume_image_validation().await.map_err(|e| e.to_string())?;
    let listener =
        tokio::net::TcpListener::bind(s.listen).await.map_err(|e| format!("cannot listen on {}: {e}", s.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("cloudpc listening on http://{addr}");
    tracing::info!(%addr, data_dir = %s.data_dir.display(), "cloudpc server started");
    let service = cloudpc_api::router(app).into_make_service_with_connect_info::<SocketAddr>();
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
