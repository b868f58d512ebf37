//! Request extractors that turn axum's plain-text rejections into Graph error bodies.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::Caller;

/// `Json<T>` whose failures say what was wrong with the body, naming the field.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let text = r.body_text();
    match r {
        JsonRejection::JsonDataError(_) => {
            let detail =
                text.strip_prefix("Failed to deserialize the JSON body into the target type: ").unwrap_or(&text);
            ApiError::bad_request(format!("The request body is not valid: {detail}"))
        }
        JsonRejection::JsonSyntaxError(_) => {
            let detail = text.strip_prefix("Failed to parse the request body as JSON: ").unwrap_or(&text);
            ApiError::bad_request(format!("The request body is not well-formed JSON: {detail}"))
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "The request body must be JSON, sent with Content-Type: application/json.",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("The request body is larger than the limit of {} bytes.", crate::MAX_BODY_BYTES),
        ),
        other => ApiError::new(
            other.status(),
            "BadRequest",
            format!("The request body could not be read: {}", other.body_text()),
        ),
    }
}

/// `Path<T>` whose failures (an id that is not valid UTF-8 once percent-decoded) are Graph error
/// bodies like every other answer, instead of axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(r: PathRejection) -> ApiError {
    let status = r.status();
    let text = r.body_text();
    if status.is_server_error() {
        // A route whose parameters do not fit its handler: a mistake in cloudpc, not the caller's.
        tracing::error!(error = %text, "path parameters do not fit the handler");
        return ApiError::new(status, "InternalServerError", "An internal error occurred.");
    }
    ApiError::bad_request(format!("The URL's id is not valid: {text}"))
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // The auth middleware always runs first on routes that take a Caller.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", "Authentication is required.")
        })
    }
}
