//! The app layer's error: one variant per kind of refusal, mapped to HTTP only at the edge.

use cloudpc_store::StoreError;
use cloudpc_types::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; the message names the field.
    #[error("{0}")]
    Invalid(ValidationError),
    #[error("{kind} '{id}' does not exist")]
    NotFound { kind: &'static str, id: String },
    /// The request is well-formed but would break a rule about existing state.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("too many failed sign-ins; try again in {retry_after} seconds")]
    TooManyAttempts { retry_after: u64 },
    /// A caller is over a rate limit (`what` says which); the same request may succeed later.
    #[error("{what}; try again in {retry_after} seconds")]
    RateLimited { what: String, retry_after: u64 },
    /// The service is at a limit of concurrent work; the same request may succeed later.
    #[error("{0}")]
    Busy(String),
    /// The request body is larger than the rule allows.
    #[error("{0}")]
    TooLarge(String),
    /// The host lacks the disk space the request needs.
    #[error("{0}")]
    InsufficientStorage(String),
    /// Something failed inside cloudpc; the caller sees only that it did.
    #[error("an internal error occurred")]
    Internal(#[source] StoreError),
    /// A file operation on the server's host failed; logged, not shown.
    #[error("an internal error occurred")]
    HostIo(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid(ValidationError::new(field, message))
    }
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        Error::Invalid(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind, id } => Error::NotFound { kind, id },
            StoreError::Conflict(_) | StoreError::SeatsExceeded { .. } => Error::Conflict(e.to_string()),
            other => Error::Internal(other),
        }
    }
}

/// Turns "the thing a field refers to does not exist" into a 400 that names the field, since the
/// URL itself was fine.
pub(crate) fn reference(field: &str) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::NotFound { kind, id } => Error::invalid(field, format!("refers to {kind} '{id}', which does not exist")),
        other => other,
    }
}
