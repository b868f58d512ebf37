//! Route tables, one module per area of the Graph API. Handlers stay thin: parse, call the app
//! layer, shape the answer.

pub mod cloud_pcs;
pub mod directory;
pub mod hosts;
pub mod identity;
pub mod images;
pub mod licensing;
pub mod networks;
pub mod policies;
pub mod replica;
pub mod tokens;

use axum::response::Response;
use axum::Router;

use cloudpc_control::App;

use crate::error::ApiError;

pub type Reply = Result<Response, ApiError>;

/// Everything under `/v1.0`.
pub fn graph_routes() -> Router<App> {
    Router::new()
        .merge(directory::routes())
        .merge(licensing::routes())
        .merge(images::routes())
        .merge(policies::routes())
        .merge(networks::routes())
        .merge(cloud_pcs::routes())
}

/// `204 No Content`, Graph's answer to PATCH, DELETE and actions without a result.
pub fn no_content() -> Reply {
    Ok(axum::response::IntoResponse::into_response(axum::http::StatusCode::NO_CONTENT))
}
