//! The app layer: every rule of cloudpc that is not about HTTP or SQL lives here.
//!
//! Requests arrive from the API (or the CLI through the API) as typed inputs with the [`Actor`]
//! who made them; each method checks the rules, builds the new state and its audit event, and hands
//! both to the [`Store`] in one write. Background work (image validation for now; the reconciler
//! and provisioning workflows later) also runs here, as the `cloudpc` system actor.

pub mod audit;
pub mod auth;
pub mod bounded;
pub mod cloud_pcs;
pub mod console;
pub mod demo;
pub mod directory;
pub mod error;
pub mod gallery;
pub mod hosts;
pub mod identity;
pub mod images;
pub mod licensing;
pub mod limits;
pub mod moves;
pub mod network_checks;
pub mod networks;
pub mod oidc;
pub mod policies;
pub mod pool;
pub mod portal;
pub mod power;
pub mod provisioning;
pub mod reconciler;
pub mod replicas;
pub mod scim;
pub(crate) mod supervise;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use cloudpc_hypervisor::Hypervisor;
use cloudpc_store::Store;

pub use audit::Actor;
pub use cloudpc_store::{FieldEquals, Listing};
pub use error::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the app layer that an operator may change.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Largest virtual disk size accepted for a custom image, in GiB.
    pub max_image_size_gb: u64,
    /// Whether a custom image must pass a test boot in a throwaway VM. Off only in tests of other
    /// features, which use blank qcow2 files as images.
    pub image_test_boot: bool,
    /// How long the test boot waits for the image's guest agent.
    pub image_test_boot_timeout: Duration,
    /// How many image uploads may stream at once; more are refused (429) rather than queued, so
    /// a burst of uploads cannot tie up the disk and the connections.
    pub max_concurrent_uploads: usize,
    /// An upload that sends nothing for this long is dropped, so a stalled client cannot keep one
    /// of the upload places forever.
    pub upload_idle_timeout: Duration,
    /// How many custom images may exist (versions do not count); Windows 365 allows 20.
    pub max_custom_images: usize,
    /// Directories on the server's host that `sourceImageResourceId` paths may name. An API
    /// administrator is not the host's root: without this, they could import any qcow2 disk on
    /// the host (another service's VM, say) and boot it.
    pub image_import_dirs: Vec<PathBuf>,
    /// The `qemu-img` program used to inspect imported images.
    pub qemu_img: String,
    /// Bytes an image upload, staged copy or base copy must leave free on the image file system:
    /// running it full would stop every Cloud PC whose overlay lives there.
    pub image_free_space_reserve: u64,
    /// Grace period before a Cloud PC that lost its license or targeting is deprovisioned,
    /// unless its policy says otherwise.
    pub grace_period: Duration,
    /// Delay between a final failure or a deprovision and the clean-up of what is left.
    pub cleanup_delay: Duration,
    /// Testing only: how long one minute of a policy's `hibernateAfterMinutes` lasts.
    pub idle_minute: Duration,
    /// How often the reconciler rescans everything even without a change event.
    pub resync_interval: Duration,
    /// Prefix of every libvirt domain cloudpc makes, so it can tell its own VMs apart.
    pub domain_prefix: String,
    /// Where Cloud PC disks (overlays) and console logs live.
    pub storage_dir: PathBuf,
    /// Where cloudpc keeps its own copy of each custom image, the base of its Cloud PCs' overlays.
    pub image_dir: PathBuf,
    /// The gallery: one directory per image build, registered at start.
    pub gallery_dir: PathBuf,
    /// How many Cloud PCs may be provisioned at the same time.
    pub max_parallel_provisioning: usize,
    /// Testing only: make the named step fail this many times ("step" → count).
    pub injected_faults: HashMap<String, u32>,
    /// Testing only: pause at a named point ("startGeneration") to widen a race window.
    pub injected_delays: HashMap<String, Duration>,
    /// The address users reach cloudpc at (`https://…` behind a TLS proxy): session cookies are
    /// then Secure with the `__Host-` prefix. `None`: as the request arrived.
    pub public_url: Option<String>,
    /// Virtual disk a host may promise per GiB it has (disks are thin qcow2 overlays that grow
    /// as guests write). 1.0 reserves every license's full size.
    pub disk_overcommit: f64,
    /// vCPUs a host may promise per vCPU it reports (hosts report 4 per core already).
    pub cpu_overcommit: f64,
    /// Memory a host may promise per MiB it reports.
    pub memory_overcommit: f64,
    /// Evacuate a host unreachable for this long (its Cloud PCs are recreated elsewhere, their
    /// data lost); `None`: only when an admin asks.
    pub evacuate_after: Option<Duration>,
    /// Audit events are kept this many days (Intune keeps its audit logs a year).
    pub audit_retention_days: u32,
    /// Testing only: panic N times at a named point (a step name or `startGeneration`).
    pub injected_panics: HashMap<String, u32>,
    /// How long a console ticket may wait to be used.
    pub console_ticket_ttl: Duration,
    /// Whether directory users may sign in with a cloudpc password (off when every sign-in goes
    /// through the organisation's identity provider).
    pub local_sign_in: bool,
    /// The key file that seals secrets kept in the database (network connections' domain
    /// passwords); made on first use. Replicas must share it.
    pub secrets_key_file: PathBuf,
    /// How often every network connection's health checks run again.
    pub network_check_interval: Duration,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            max_image_size_gb: 256,
            image_test_boot: true,
            image_test_boot_timeout: Duration::from_secs(120),
            max_concurrent_uploads: 4,
            max_custom_images: 20,
            upload_idle_timeout: Duration::from_secs(60),
            image_import_dirs: vec![PathBuf::from("cloudpc-data/import")],
            qemu_img: "qemu-img".into(),
            image_free_space_reserve: 2 << 30,
            grace_period: Duration::from_secs(7 * 24 * 3600),
            cleanup_delay: Duration::from_secs(3 * 3600),
            idle_minute: Duration::from_secs(60),
            resync_interval: Duration::from_secs(10),
            domain_prefix: "cloudpc-".into(),
            storage_dir: PathBuf::from("cloudpc-data/disks"),
            image_dir: PathBuf::from("cloudpc-data/images"),
            gallery_dir: PathBuf::from("cloudpc-data/gallery"),
            max_parallel_provisioning: 4,
            injected_faults: HashMap::new(),
            injected_delays: HashMap::new(),
            injected_panics: HashMap::new(),
            audit_retention_days: 365,
            disk_overcommit: 4.0,
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            evacuate_after: None,
            public_url: None,
            console_ticket_ttl: Duration::from_secs(30),
            local_sign_in: true,
            secrets_key_file: PathBuf::from("cloudpc-data/secrets.key"),
            network_check_interval: Duration::from_secs(6 * 3600),
        }
    }
}

/// The application: store, hosts and settings; cheap to clone into handlers and tasks.
#[derive(Clone)]
pub struct App {
    store: Arc<dyn Store>,
    config: Arc<AppConfig>,
    hosts: Arc<hosts::HostTable>,
    /// Wakes the reconciler when something that decides the desired Cloud PCs changed.
    changed: Arc<Notify>,
    /// Cloud PCs whose workflow task is running, so that no two run for one Cloud PC.
    running: Arc<Mutex<HashSet<Uuid>>>,
    /// This replica's name in workflow leases (random per process).
    replica: String,
    /// Whether this replica held the reconciler lease at its last try, and when that was.
    leading: Arc<Mutex<Option<(bool, std::time::Instant)>>>,
    slots: Arc<tokio::sync::Semaphore>,
    faults: Arc<Mutex<HashMap<String, u32>>>,
    panics: Arc<Mutex<HashMap<String, u32>>>,
    consoles: Arc<console::Consoles>,
    /// Sign-in attempts per client address.
    sign_in_rate: Arc<limits::KeyedLimiter>,
    /// Portal actions per user.
    portal_actions: Arc<limits::KeyedLimiter>,
    /// argon2 runs, at most a few at once.
    hash_slots: Arc<tokio::sync::Semaphore>,
    /// Serializes read-modify-write of device images (versions are checked concurrently), and
    /// keeps an image from being deleted between a Cloud PC reading it and storing its spec.
    image_updates: Arc<tokio::sync::Mutex<()>>,
    /// One permit per upload streaming now.
    uploads: Arc<tokio::sync::Semaphore>,
    /// Uploads of new images streaming now (they count against the image limit).
    new_image_uploads: Arc<std::sync::atomic::AtomicUsize>,
    /// What each running image check is doing: (image, version) → (step, since).
    #[allow(clippy::type_complexity)]
    image_check_steps: Arc<Mutex<HashMap<(Uuid, String), (&'static str, chrono::DateTime<chrono::Utc>)>>>,
    /// Image versions whose check runs in this process now (a check is also leased, for the
    /// other replicas).
    checks_running: Arc<Mutex<HashSet<(Uuid, String)>>>,
    /// Allocations in this process take turns before they take the database's allocation lock,
    /// so that waiters do not each hold a pooled connection while the holder needs one. The
    /// database lock decides between replicas; this only keeps the pool free.
    allocation_gate: Arc<tokio::sync::Mutex<()>>,
    /// Custom-image test boots take turns.
    image_boots: Arc<tokio::sync::Mutex<()>>,
    /// sha256 of base image files, by path, with the size and time they had when hashed.
    #[allow(clippy::type_complexity)]
    image_digests: Arc<Mutex<HashMap<PathBuf, (u64, std::time::SystemTime, String)>>>,
    oidc: Arc<oidc::OidcCache>,
}

impl App {
    pub fn new(store: Arc<dyn Store>, config: AppConfig, hosts: Vec<Arc<dyn Hypervisor>>) -> Self {
        let faults = config.injected_faults.clone();
        let panics = config.injected_panics.clone();
        let slots = config.max_parallel_provisioning.max(1);
        let uploads = config.max_concurrent_uploads.max(1);
        Self {
            store,
            config: Arc::new(config),
            hosts: Arc::new(hosts::HostTable::new(hosts)),
            changed: Arc::new(Notify::new()),
            running: Arc::new(Mutex::new(HashSet::new())),
            replica: format!("replica-{}", Uuid::new_v4().simple()),
            leading: Arc::new(Mutex::new(None)),
            slots: Arc::new(tokio::sync::Semaphore::new(slots)),
            faults: Arc::new(Mutex::new(faults)),
            panics: Arc::new(Mutex::new(panics)),
            consoles: Arc::new(console::Consoles::default()),
            sign_in_rate: Arc::new(limits::KeyedLimiter::new(
                portal::SIGN_IN_BURST,
                portal::SIGN_IN_EVERY,
                portal::MAX_TRACKED_ADDRESSES,
            )),
            portal_actions: Arc::new(limits::KeyedLimiter::new(
                portal::PORTAL_ACTION_BURST,
                portal::PORTAL_ACTION_EVERY,
                portal::MAX_TRACKED_ADDRESSES,
            )),
            hash_slots: Arc::new(tokio::sync::Semaphore::new(portal::MAX_CONCURRENT_HASHES)),
            image_updates: Arc::new(tokio::sync::Mutex::new(())),
            uploads: Arc::new(tokio::sync::Semaphore::new(uploads)),
            new_image_uploads: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            image_check_steps: Arc::new(Mutex::new(HashMap::new())),
            checks_running: Arc::new(Mutex::new(HashSet::new())),
            image_boots: Arc::new(tokio::sync::Mutex::new(())),
            allocation_gate: Arc::new(tokio::sync::Mutex::new(())),
            image_digests: Arc::new(Mutex::new(HashMap::new())),
            oidc: Arc::new(oidc::OidcCache::default()),
        }
    }

    pub fn config(&self) -> &AppConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}
