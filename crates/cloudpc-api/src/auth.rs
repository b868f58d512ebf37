//! The gate in front of every API route: a valid bearer token, and write access for writes.
//!
//! Readers (Cloud PC Reader) may use GET and HEAD only; anything else needs Cloud PC Administrator.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use cloudpc_control::App;

use crate::error::ApiError;
use crate::Caller;

pub async fn require_token(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(secret) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token is empty: send 'Authorization: Bearer <token>'.",
        )
        .into_response();
    };
    let actor = match app.authenticate(secret.trim(), ip).await {
        Ok(a) => a,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let reads = matches!(*req.method(), Method::GET | Method::HEAD);
    if !reads && !actor.role.can_write() {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Authorization_RequestDenied",
            format!(
                "The role {} can read but not change anything; this request needs Cloud PC Administrator.",
                actor.role.display_name()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(Caller(actor));
    next.run(req).await
}

/// For routes that even readers may not see (tokens).
pub fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.0.role.can_write() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Authorization_RequestDenied",
            "Only a Cloud PC Administrator may do this.",
        ))
    }
}
