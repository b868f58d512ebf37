//! The integration tests: one binary; every test starts the real `cloudpc` server on port 0 with
//! its own data directory, and talks to it over HTTP (or through the real CLI).

mod ad_support;
mod support;
mod vm_support;

mod auth;
mod bad_input;
mod cli;
mod directory;
mod disk_space;
mod guest_steps;
mod hardening;
mod hosts;
mod hypervisor;
mod identity;
mod image_import;
mod images;
mod licensing;
mod networks;
mod odata;
mod openapi;
mod policies;
mod readme;
mod replicas;
mod server;
mod setup_script;
mod vm;
