//! The resources of cloudpc's API as Rust types, shaped like Microsoft Graph.
//!
//! Every type here is both what the store keeps and what the API shows: field names are Graph's
//! (camelCase through serde), enum values are Graph's, so a Graph user recognises them. Input types
//! (`*Create`, `*Update`) refuse unknown fields, and `validate` holds the rules that do not need the
//! database (names, naming templates); rules that do (seats, references) live in the app layer.

pub mod audit;
pub mod auth;
pub mod cloud_pc;
pub mod directory;
pub mod hosts;
pub mod identity;
pub mod images;
pub mod licensing;
pub mod network;
pub mod policy;
pub mod provisioning;
pub mod validate;

pub use validate::ValidationError;

/// Graph's `@odata.type` annotation, accepted (and ignored) on input so that Graph scripts that
/// send it keep working while every other unknown field is refused.
pub type ODataType = Option<String>;
