//! The user portal's API under `/portal/api`: sign-in with a session cookie, and the signed-in
//! user's own Cloud PCs (status, current step, restart, rename, console ticket).
//!
//! The cookie is HttpOnly, SameSite=Strict and expires with the session. Every request that changes
//! something must also carry `X-CloudPC-Portal: 1`, a header a cross-site form cannot send.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use cloudpc_control::portal::SESSION_LIFETIME;
use cloudpc_control::{Actor, App};
use cloudpc_types::cloud_pc::RenameRequest;
use cloudpc_types::directory::SignIn;

use crate::error::ApiError;
use crate::extract::ApiJson;

const COOKIE: &str = "cloudpc_session";
/// Behind https the cookie carries the `__Host-` prefix: the browser then keeps it only if it is
/// Secure, for this host alone (no Domain) and for every path, so no sibling host can set it.
const HOST_COOKIE: &str = "__Host-cloudpc_session";

/// The session cookie's name and attributes for this server: Secure whenever the public URL is
/// https (`--public-url`), or a proxy in front says the request came over https.
fn cookie_policy(app: &App, headers: &HeaderMap) -> (&'static str, &'static str) {
    let https_public = app.config().public_url.as_deref().is_some_and(|u| u.starts_with("https://"));
    if https_public {
        (HOST_COOKIE, "; Secure")
    } else {
        (COOKIE, secure(headers))
    }
}
const CSRF_HEADER: &str = "x-cloudpc-portal";
const SIGN_IN_MAX_BODY: usize = 4096;

#[derive(Clone)]
struct PortalUser(Actor);

#[derive(Clone)]
struct ClientIp(Option<String>);

fn session_cookie(app: &App, headers: &HeaderMap) -> Option<String> {
    let (name, _) = cookie_policy(app, headers);
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

fn client_ip(req: &Request) -> Option<String> {
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string())
}

fn secure(headers: &HeaderMap) -> &'static str {
    if headers.get("x-forwarded-proto").is_some_and(|v| v == "https") {
        "; Secure"
    } else {
        ""
    }
}

/// Writes need the portal's header (CSRF); everything but sign-in needs a session.
async fn gate(State(app): State<App>, mut req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.headers().get(CSRF_HEADER).is_none_or(|v| v != "1") {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Portal requests that change something need the header X-CloudPC-Portal: 1.",
        )
        .into_response();
    }
    let ip = client_ip(&req);
    req.extensions_mut().insert(ClientIp(ip.clone()));
    if req.uri().path().ends_with("/signIn") {
        return next.run(req).await;
    }
    let Some(secret) = session_cookie(&app, req.headers()) else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Sign in first.").into_response();
    };
    match app.session_actor(&secret, ip).await {
        Ok(actor) => {
            req.extensions_mut().insert(PortalUser(actor));
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub fn routes(app: App) -> Router<App> {
    Router::new()
        // A sign-in is a name of at most 113 characters and a password of at most 256: a few KiB
        // is plenty, and nothing larger is read from an unauthenticated caller.
        .route("/signIn", post(sign_in).layer(axum::extract::DefaultBodyLimit::max(SIGN_IN_MAX_BODY)))
        .route("/signOut", post(sign_out))
        .route("/me", get(me))
        .route("/cloudPCs", get(list))
        .route("/cloudPCs/{id}", get(one))
        .route("/cloudPCs/{id}/reboot", post(reboot))
        .route("/cloudPCs/{id}/rename", post(rename))
        .route("/cloudPCs/{id}/getConsoleTicket", post(ticket))
        .layer(middleware::from_fn_with_state(app, gate))
}

type Reply = Result<Response, ApiError>;

async fn sign_in(
    State(app): State<App>,
    headers: HeaderMap,
    ip: axum::Extension<ClientIp>,
    ApiJson(body): ApiJson<SignIn>,
) -> Reply {
    let session = app.sign_in(&body.user_principal_name, &body.password, ip.0 .0.clone()).await?;
    let cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        cookie_policy(&app, &headers).0,
        session.secret,
        SESSION_LIFETIME.as_secs(),
        cookie_policy(&app, &headers).1
    );
    let mut resp = Json(serde_json::json!({
        "userPrincipalName": session.user.user_principal_name,
        "displayName": session.user.display_name,
        "expirationDateTime": session.expires,
    }))
    .into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).map_err(|e| ApiError::bad_request(e.to_string()))?);
    Ok(resp)
}

/// The `Set-Cookie` value that carries a new session.
pub(crate) fn session_set_cookie(app: &App, headers: &HeaderMap, secret: &str) -> String {
    let (name, secure) = cookie_policy(app, headers);
    format!("{name}={secret}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}", SESSION_LIFETIME.as_secs())
}

async fn sign_out(State(app): State<App>, headers: HeaderMap) -> Reply {
    if let Some(secret) = session_cookie(&app, &headers) {
        app.sign_out(&secret).await?;
    }
    let (name, secure) = cookie_policy(&app, &headers);
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let clear = format!("{name}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}");
    resp.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&clear).map_err(|e| ApiError::bad_request(e.to_string()))?);
    Ok(resp)
}

fn user(req: &axum::http::Extensions) -> Result<Actor, ApiError> {
    req.get::<PortalUser>()
        .map(|u| u.0.clone())
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Sign in first."))
}

async fn me(State(app): State<App>, req: Request) -> Reply {
    Ok(Json(app.me(&user(req.extensions())?).await?).into_response())
}

async fn list(State(app): State<App>, req: Request) -> Reply {
    Ok(Json(serde_json::json!({ "value": app.my_cloud_pcs(&user(req.extensions())?).await? })).into_response())
}

async fn one(State(app): State<App>, Path(id): Path<String>, req: Request) -> Reply {
    Ok(Json(app.my_cloud_pc(&user(req.extensions())?, &id).await?).into_response())
}

async fn reboot(State(app): State<App>, Path(id): Path<String>, req: Request) -> Reply {
    Ok(Json(app.my_reboot(&user(req.extensions())?, &id).await?).into_response())
}

async fn rename(
    State(app): State<App>,
    Path(id): Path<String>,
    ext: axum::Extension<PortalUser>,
    ApiJson(body): ApiJson<RenameRequest>,
) -> Reply {
    Ok(Json(app.my_rename(&ext.0 .0, &id, &body.display_name).await?).into_response())
}

async fn ticket(State(app): State<App>, Path(id): Path<String>, req: Request) -> Reply {
    let actor = user(req.extensions())?;
    Ok(Json(app.my_console_ticket(&actor, &id).await?).into_response())
}
