//! Errors as Graph shows them: `{"error": {"code", "message", "innerError"}}` with a fitting status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use cloudpc_control::Error;

/// An error on its way out, with the status and code Graph would use.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds after which the same request may succeed (`Retry-After`), for 429s.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Invalid(_) => Self::new(StatusCode::BAD_REQUEST, "BadRequest", message),
            Error::NotFound { .. } => Self::new(StatusCode::NOT_FOUND, "ResourceNotFound", message),
            Error::Conflict(_) => Self::new(StatusCode::CONFLICT, "Conflict", message),
            Error::Unauthenticated(_) => Self::new(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", message),
            Error::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "Authorization_RequestDenied", message),
            Error::TooManyAttempts { retry_after } | Error::RateLimited { retry_after, .. } => Self {
                retry_after: Some(retry_after),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", message)
            },
            Error::Internal(source) => {
                // The cause is logged for the operator and never shown to the caller.
                tracing::error!(error = %source, cause = ?std::error::Error::source(&source), "internal error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", message)
            }
            // Uploads take a while; a few seconds is the soonest a place may be free.
            Error::Busy(_) => {
                Self { retry_after: Some(5), ..Self::new(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", message) }
            }
            Error::TooLarge(_) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", message),
            Error::InsufficientStorage(_) => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "InsufficientStorage", message)
            }
            Error::HostIo(detail) => {
                tracing::error!(error = %detail, "internal error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", message)
            }
        }
    }
}

/// Graph's error body, `{"error": {"code", "message", "innerError"}}`: the type every error answer
/// is serialized from and the OpenAPI document's `ODataError` schema, so the two cannot differ.
#[derive(Debug, Serialize, ToSchema)]
pub struct ODataError {
    pub error: MainError,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MainError {
    /// A Graph error code, such as `BadRequest`, `ResourceNotFound` or `Conflict`.
    pub code: String,
    /// A sentence saying what was wrong, naming the field or option when there is one.
    pub message: String,
    #[serde(rename = "innerError")]
    pub inner_error: InnerError,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InnerError {
    /// When the error was answered.
    pub date: chrono::DateTime<chrono::Utc>,
    /// A fresh id for this answer, to quote when asking about it.
    #[serde(rename = "request-id")]
    pub request_id: uuid::Uuid,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ODataError {
            error: MainError {
                code: self.code.to_string(),
                message: self.message,
                inner_error: InnerError {
                    date: chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap_or_default(),
                    request_id: uuid::Uuid::new_v4(),
                },
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

pub async fn not_found_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "BadRequest", format!("Resource not found for the segment '{}'.", uri.path()))
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("{method} is not allowed on '{}'.", uri.path()),
    )
}
