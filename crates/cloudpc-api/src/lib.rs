//! The HTTP edge of cloudpc: Graph-shaped routes under `/v1.0`, authentication, OpenAPI.
//!
//! A request passes the auth middleware (bearer token → [`Actor`], readers may only read), then a
//! thin handler that parses it, calls the app layer and shapes the answer the Graph way
//! (`@odata.context`, `value`, `@odata.nextLink`). Errors become Graph error bodies here and only
//! here.

pub mod auth;
pub mod error;
pub mod extract;
pub mod gateway;
pub mod linger;
pub mod odata;
pub mod openapi;
pub mod portal;
pub mod routes;
pub mod scim;
pub mod sign_in;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{middleware, Router};

use cloudpc_control::{Actor, App};

pub use error::ApiError;

/// Largest request body accepted; Graph resources are small, image uploads get their own route.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The whole HTTP application. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`
/// so audit events get the caller's address. `web_dir` holds the built portal (`web/dist`).
pub fn router(app: App, web_dir: Option<std::path::PathBuf>) -> Router {
    let graph = routes::graph_routes()
        .fallback(error::not_found_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), auth::require_token))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost, so that refusals by the auth layer linger too.
        .layer(middleware::from_fn(linger::drain_refused_bodies));
    let own = routes::tokens::routes()
        .merge(routes::replica::routes())
        .merge(routes::hosts::routes())
        .merge(routes::identity::routes())
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), auth::require_token))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    let portal = portal::routes(app.clone())
        .fallback(error::not_found_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(linger::drain_refused_bodies));
    let agents = routes::hosts::agent_routes()
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(64 << 10));
    let router = Router::new()
        .nest("/v1.0", graph)
        .nest("/cloudpc", own.merge(agents))
        .nest("/portal/api", portal)
        .nest("/scim/v2", scim::routes(app.clone()).layer(middleware::from_fn(linger::drain_refused_bodies)))
        .nest("/auth", sign_in::routes())
        .route("/gateway/console", get(gateway::console))
        .route("/openapi.json", get(openapi::serve))
        .route("/healthz", get(|| async { "ok" }));
    let router = match web_dir {
        // The portal is a single page: unknown paths get its index.html.
        Some(dir) => router.fallback_service(
            tower_http::services::ServeDir::new(&dir)
                .fallback(tower_http::services::ServeFile::new(dir.join("index.html"))),
        ),
        None => router.fallback(error::not_found_route),
    };
    router.with_state(app)
}

/// The caller, put into the request by the auth middleware.
#[derive(Clone)]
pub struct Caller(pub Actor);
