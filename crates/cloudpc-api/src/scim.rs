//! `/scim/v2`: the SCIM 2.0 edge. Authentication by the provider's SCIM token, SCIM's own error
//! format and media type, ETags; the rules live in `cloudpc_control::scim`.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use cloudpc_control::scim::{self, ListQuery, Resource, ScimError};
use cloudpc_control::{Actor, App};
use cloudpc_types::identity::IdentityProvider;

const MEDIA_TYPE: &str = "application/scim+json";

#[derive(Clone)]
struct ScimCaller(IdentityProvider, Actor);

fn reply(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(MEDIA_TYPE));
    r
}

fn error(e: ScimError) -> Response {
    reply(StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.body())
}

fn resource(status: StatusCode, r: Resource) -> Response {
    let location = r.body["meta"]["location"].as_str().map(str::to_string);
    let mut resp = reply(status, &r.body);
    if let Ok(v) = HeaderValue::from_str(&r.version) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if status == StatusCode::CREATED {
        if let Some(v) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
    }
    resp
}

/// The base URL resources are located under.
fn base(app: &App, headers: &HeaderMap) -> String {
    format!("{}/scim/v2", crate::sign_in::root(app, headers))
}

async fn gate(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let secret = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(|s| s.trim().to_string());
    let Some(secret) = secret else {
        return error(ScimError::new(401, None, "send the provider's SCIM token as 'Authorization: Bearer <token>'"));
    };
    match app.scim_caller(&secret, ip).await {
        Ok((p, actor)) => {
            req.extensions_mut().insert(ScimCaller(p, actor));
            next.run(req).await
        }
        Err(e) => error(e.into()),
    }
}

pub fn routes(app: App) -> Router<App> {
    Router::new()
        .route("/Users", get(list_users).post(create_user))
        .route("/Users/{id}", get(get_user).put(replace_user).patch(patch_user).delete(delete_user))
        .route("/Groups", get(list_groups).post(create_group))
        .route("/Groups/{id}", get(get_group).put(replace_group).patch(patch_group).delete(delete_group))
        .route("/ServiceProviderConfig", get(config))
        .route("/ResourceTypes", get(resource_types))
        .route("/ResourceTypes/{id}", get(resource_type))
        .route("/Schemas", get(schemas))
        .route("/Schemas/{id}", get(schema))
        .fallback(|| async { error(ScimError::new(404, None, "there is no such SCIM endpoint")) })
        .method_not_allowed_fallback(|| async {
            error(ScimError::new(405, None, "this SCIM endpoint does not take that method"))
        })
        .layer(middleware::from_fn_with_state(app, gate))
        .layer(axum::extract::DefaultBodyLimit::max(crate::MAX_BODY_BYTES))
}

/// A refusal in SCIM's format (a handler's error).
struct Refusal(ScimError);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0)
    }
}

type Reply = Result<Response, Refusal>;

fn caller(req_ext: &axum::http::Extensions) -> Result<ScimCaller, Refusal> {
    req_ext.get::<ScimCaller>().cloned().ok_or_else(|| Refusal(ScimError::new(401, None, "not signed in")))
}

fn json(bytes: &Bytes) -> Result<Value, Refusal> {
    serde_json::from_slice(bytes)
        .map_err(|e| Refusal(ScimError::new(400, Some("invalidSyntax"), format!("the body is not valid JSON: {e}"))))
}

fn query(q: HashMap<String, String>) -> Result<ListQuery, Refusal> {
    let get = |k: &str| q.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
    let number = |k: &str| -> Result<Option<i64>, Refusal> {
        get(k)
            .map(|v| {
                v.trim().parse::<i64>().map_err(|_| {
                    Refusal(ScimError::new(400, Some("invalidValue"), format!("{k}: must be a whole number")))
                })
            })
            .transpose()
    };
    Ok(ListQuery {
        filter: get("filter"),
        start_index: number("startIndex")?,
        count: number("count")?,
        attributes: get("attributes"),
        excluded_attributes: get("excludedAttributes"),
    })
}

fn if_match(h: &HeaderMap) -> Option<String> {
    h.get(header::IF_MATCH).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// `If-None-Match` with the current version: nothing changed (304).
fn unchanged(h: &HeaderMap, r: &Resource) -> bool {
    h.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() == r.version)
}

async fn list_users(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Reply {
    let c = caller(req.extensions())?;
    let q = query(q)?;
    Ok(reply(StatusCode::OK, &app.scim_list_users(&c.0, &q, &base(&app, &headers)).await.map_err(Refusal)?))
}

async fn list_groups(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Reply {
    let c = caller(req.extensions())?;
    let q = query(q)?;
    Ok(reply(StatusCode::OK, &app.scim_list_groups(&c.0, &q, &base(&app, &headers)).await.map_err(Refusal)?))
}

async fn get_user(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let r = app.scim_get_user(&c.0, &id, &base(&app, &headers)).await.map_err(Refusal)?;
    if unchanged(&headers, &r) {
        return Ok(StatusCode::NOT_MODIFIED.into_response());
    }
    Ok(resource(StatusCode::OK, r))
}

async fn get_group(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let r = app.scim_get_group(&c.0, &id, &base(&app, &headers)).await.map_err(Refusal)?;
    if unchanged(&headers, &r) {
        return Ok(StatusCode::NOT_MODIFIED.into_response());
    }
    Ok(resource(StatusCode::OK, r))
}

async fn create_user(State(app): State<App>, headers: HeaderMap, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let body = body_of(req).await?;
    let r = app.scim_create_user(&c.0, &c.1, &body, &base(&app, &headers)).await.map_err(Refusal)?;
    Ok(resource(StatusCode::CREATED, r))
}

async fn create_group(State(app): State<App>, headers: HeaderMap, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let body = body_of(req).await?;
    let r = app.scim_create_group(&c.0, &c.1, &body, &base(&app, &headers)).await.map_err(Refusal)?;
    Ok(resource(StatusCode::CREATED, r))
}

async fn body_of(req: Request) -> Result<Value, Refusal> {
    let bytes = axum::body::to_bytes(req.into_body(), crate::MAX_BODY_BYTES)
        .await
        .map_err(|_| Refusal(ScimError::new(413, None, "the body is larger than 1 MiB")))?;
    json(&bytes)
}

async fn replace_user(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let body = body_of(req).await?;
    let r = app
        .scim_replace_user(&c.0, &c.1, &id, &body, if_match(&headers).as_deref(), &base(&app, &headers))
        .await
        .map_err(Refusal)?;
    Ok(resource(StatusCode::OK, r))
}

async fn patch_user(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let body = body_of(req).await?;
    let r = app
        .scim_patch_user(&c.0, &c.1, &id, &body, if_match(&headers).as_deref(), &base(&app, &headers))
        .await
        .map_err(Refusal)?;
    Ok(resource(StatusCode::OK, r))
}

async fn replace_group(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let body = body_of(req).await?;
    let r = app
        .scim_replace_group(&c.0, &c.1, &id, &body, if_match(&headers).as_deref(), &base(&app, &headers))
        .await
        .map_err(Refusal)?;
    Ok(resource(StatusCode::OK, r))
}

async fn patch_group(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let body = body_of(req).await?;
    let r = app
        .scim_patch_group(&c.0, &c.1, &id, &body, if_match(&headers).as_deref(), &base(&app, &headers))
        .await
        .map_err(Refusal)?;
    Ok(match r {
        Some(r) => resource(StatusCode::OK, r),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

async fn delete_user(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    app.scim_delete_user(&c.0, &c.1, &id, if_match(&headers).as_deref()).await.map_err(Refusal)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_group(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    app.scim_delete_group(&c.0, &c.1, &id, if_match(&headers).as_deref()).await.map_err(Refusal)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn list_of(items: Vec<Value>) -> Value {
    serde_json::json!({
        "schemas": [scim::LIST_SCHEMA], "totalResults": items.len(), "startIndex": 1,
        "itemsPerPage": items.len(), "Resources": items,
    })
}

async fn config(State(app): State<App>, headers: HeaderMap) -> Response {
    reply(StatusCode::OK, &scim::service_provider_config(&base(&app, &headers)))
}

async fn resource_types(State(app): State<App>, headers: HeaderMap) -> Response {
    reply(StatusCode::OK, &list_of(scim::resource_types(&base(&app, &headers))))
}

async fn resource_type(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    match scim::resource_types(&base(&app, &headers)).into_iter().find(|t| t["id"] == id.as_str()) {
        Some(t) => reply(StatusCode::OK, &t),
        None => error(ScimError::new(404, None, format!("resource type '{id}' does not exist"))),
    }
}

async fn schemas(State(app): State<App>, headers: HeaderMap) -> Response {
    reply(StatusCode::OK, &list_of(scim::schemas(&base(&app, &headers))))
}

async fn schema(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    match scim::schemas(&base(&app, &headers)).into_iter().find(|s| s["id"] == id.as_str()) {
        Some(s) => reply(StatusCode::OK, &s),
        None => error(ScimError::new(404, None, format!("schema '{id}' does not exist"))),
    }
}
