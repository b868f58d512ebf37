//! The app layer: every rule of cloudpc that is not about HTTP or SQL lives here.
//!
//! Requests arrive from the API (or the CLI through the API) as typed inputs with the [`Actor`]
//! who made them; each method checks the rules, builds the new state and its audit event, and hands
//! both to the [`Store`] in one write. Background work (image validation for now; the reconciler
//! and provisioning workflows later) also runs here, as the `cloudpc` system actor.

pub mod audit;
pub mod auth;
pub mod cloud_pcs;
pub mod directory;
pub mod error;
pub mod images;
pub mod licensing;
pub mod policies;

use std::sync::Arc;

use cloudpc_store::Store;

pub use audit::Actor;
pub use error::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the app layer that an operator may change.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Largest virtual disk size accepted for a custom image, in GiB.
    pub max_image_size_gb: u64,
    /// The `qemu-img` program used to inspect imported images.
    pub qemu_img: String,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self { max_image_size_gb: 256, qemu_img: "qemu-img".into() }
    }
}

/// The application: a store plus settings; cheap to clone into handlers and tasks.
#[derive(Clone)]
pub struct App {
    store: Arc<dyn Store>,
    config: Arc<AppConfig>,
}

impl App {
    pub fn new(store: Arc<dyn Store>, config: AppConfig) -> Self {
        Self { store, config: Arc::new(config) }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}
