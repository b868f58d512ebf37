//! `/auth`: signing in through the organisation's identity provider (OpenID Connect), for the
//! portal and the admin console. The browser goes to `/auth/oidc/{provider}/start`, is sent to the
//! provider, and comes back to `/auth/oidc/callback`; the portal then has its session cookie, the
//! console its API token (in the URL fragment, which never reaches a server or a log).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use cloudpc_control::oidc::{SignInTarget, SignedIn};
use cloudpc_control::App;

use crate::error::ApiError;

/// The cookie that binds a sign-in to the browser that started it.
const BROWSER_COOKIE: &str = "cloudpc_oidc";

fn browser_cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == BROWSER_COOKIE).then(|| v.to_string())
    })
}

pub fn routes() -> Router<App> {
    Router::new()
        .route("/signInOptions", get(options))
        .route("/oidc/callback", get(callback))
        .route("/oidc/{provider}/start", get(start))
        .route("/signOut", axum::routing::post(sign_out))
}

/// The address this server is reached at: `--public-url` if set, else this request's host.
pub(crate) fn root(app: &App, headers: &HeaderMap) -> String {
    match &app.config().public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            format!("http://{host}")
        }
    }
}

fn see_other(location: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn options(State(app): State<App>) -> Result<Response, ApiError> {
    Ok(Json(app.sign_in_options().await?).into_response())
}

/// Revokes the bearer token it is sent with (the console's sign-out after a provider sign-in).
async fn sign_out(
    State(app): State<App>,
    headers: HeaderMap,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", "Send the token to sign out.")
        })?;
    app.revoke_own_token(secret.trim(), Some(addr.ip().to_string())).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct StartQuery {
    #[serde(default)]
    target: Option<String>,
}

async fn start(
    State(app): State<App>,
    headers: HeaderMap,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Path(provider): Path<String>,
    Query(q): Query<StartQuery>,
) -> Result<Response, ApiError> {
    let target = match q.target.as_deref() {
        None | Some("portal") => SignInTarget::Portal,
        Some("console") => SignInTarget::Console,
        Some(other) => {
            return Err(ApiError::bad_request(format!("target must be 'portal' or 'console', not '{other}'")));
        }
    };
    let redirect = format!("{}/auth/oidc/callback", root(&app, &headers));
    let (to, browser) = app.begin_oidc_sign_in(&provider, target, &redirect, Some(addr.ip().to_string())).await?;
    let mut r = see_other(&to);
    // Lax, not Strict: the callback is a top-level navigation from the provider's site.
    let secure = if root(&app, &headers).starts_with("https://") { "; Secure" } else { "" };
    let cookie = format!("{BROWSER_COOKIE}={browser}; HttpOnly; SameSite=Lax; Path=/auth/oidc; Max-Age=600{secure}");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(r)
}

#[derive(Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    code: Option<String>,
    /// The provider's own name for itself (RFC 9207), when it sends it.
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

async fn callback(
    State(app): State<App>,
    headers: HeaderMap,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let provider_error = q.error.as_ref().map(|e| match &q.error_description {
        Some(d) => format!("{e} ({})", d.chars().take(200).collect::<String>()),
        None => e.clone(),
    });
    let state = q.state.unwrap_or_default();
    let ip = Some(addr.ip().to_string());
    let browser = browser_cookie(&headers);
    let done = app
        .finish_oidc_sign_in(
            &state,
            browser.as_deref(),
            q.code.as_deref(),
            q.iss.as_deref(),
            provider_error.as_deref(),
            ip,
        )
        .await;
    let mut r = match done {
        Ok((_, SignedIn::Portal(session))) => {
            let mut r = see_other("/");
            let cookie = crate::portal::session_set_cookie(&app, &headers, &session.secret);
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Ok((_, SignedIn::Console { secret, .. })) => see_other(&format!("/admin.html#token={}", encode(&secret))),
        Err((Some(SignInTarget::Console), e)) => {
            see_other(&format!("/admin.html#signInError={}", encode(&e.to_string())))
        }
        Err((_, e)) => see_other(&format!("/?signInError={}", encode(&e.to_string()))),
    };
    // The sign-in cookie has done its work.
    let cleared = format!("{BROWSER_COOKIE}=; HttpOnly; SameSite=Lax; Path=/auth/oidc; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&cleared) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}
