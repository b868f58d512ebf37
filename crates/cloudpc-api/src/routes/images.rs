//! `/deviceManagement/virtualEndpoint/galleryImages` and `/deviceImages`.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::routing::{delete, get, post};
use axum::Router;
use futures_util::TryStreamExt;

use cloudpc_control::images::UploadTarget;
use cloudpc_control::App;
use cloudpc_types::images::{
    DeviceImage, DeviceImageCreate, DeviceImageVersionCreate, GalleryImage, SourceImageFormat,
};

use super::{no_content, Reply};
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{form_pairs, Collection, GraphRequest};
use crate::openapi::ImageBytes;
use crate::Caller;

const VE: &str = "deviceManagement/virtualEndpoint";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/deviceManagement/virtualEndpoint/galleryImages", get(list_gallery))
        .route("/deviceManagement/virtualEndpoint/galleryImages/{id}", get(get_gallery).delete(delete_gallery))
        .route("/deviceManagement/virtualEndpoint/deviceImages", get(list_device).post(create_device))
        .route("/deviceManagement/virtualEndpoint/deviceImages/{id}", get(get_device).delete(delete_device))
        .route("/deviceManagement/virtualEndpoint/deviceImages/{id}/versions", post(create_version))
        .route("/deviceManagement/virtualEndpoint/deviceImages/{id}/versions/{version}", delete(delete_version))
        // Uploads are streamed to disk, so the small-body limit of the other routes does not apply;
        // the app layer enforces the image size limit as the bytes arrive.
        .route(
            "/deviceManagement/virtualEndpoint/deviceImages/upload",
            post(upload_device).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/deviceManagement/virtualEndpoint/deviceImages/{id}/versions/upload",
            post(upload_version).layer(DefaultBodyLimit::disable()),
        )
}

/// The named query parameters of an upload; any other non-OData parameter is refused.
fn upload_params(uri: &Uri, allowed: &[&str]) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let pairs = form_pairs(uri.query().unwrap_or(""))?;
    let mut out = std::collections::HashMap::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "Query parameter '{k}' is not known here; use {}.",
                allowed.join(", ")
            )));
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn required(params: &mut std::collections::HashMap<String, String>, key: &str) -> Result<String, ApiError> {
    params.remove(key).ok_or_else(|| ApiError::bad_request(format!("The query parameter '{key}' is required.")))
}

/// `format=qcow2` (the default) or `format=raw`.
fn source_format(params: &mut std::collections::HashMap<String, String>) -> Result<SourceImageFormat, ApiError> {
    match params.remove("format") {
        None => Ok(SourceImageFormat::Qcow2),
        Some(f) => SourceImageFormat::parse(&f).map_err(|e| ApiError::bad_request(e.to_string())),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

fn body_reader(body: Body) -> impl tokio::io::AsyncRead + Unpin + Send {
    tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other))
}

/// Creates an image from a disk image (qcow2, or raw with `format=raw`) streamed as the request body
/// (`?displayName=…&version=…[&operatingSystem=…]`); `pending` until checked.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/upload", tag = "images",
    params(("displayName" = String, Query, min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("version" = String, Query, pattern = r"^[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}$", description = "Major.Minor.Patch"),
        ("operatingSystem" = Option<String>, Query),
        ("format" = Option<SourceImageFormat>, Query, description = "qcow2 (default) or raw")),
    request_body(content = ImageBytes, content_type = "application/octet-stream"),
    responses((status = 201, body = DeviceImage),
        (status = 409, description = "The server keeps as many custom images as it may."),
        (status = 413, description = "Larger than an image of the size limit can be."),
        (status = 429, description = "As many uploads as the server takes at once are streaming; try again after Retry-After."),
        (status = 507, description = "The server has too little free space for the image.")))]
pub async fn upload_device(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let mut p = upload_params(&uri, &["displayName", "version", "operatingSystem", "format"])?;
    let format = source_format(&mut p)?;
    let target = UploadTarget::NewImage {
        display_name: required(&mut p, "displayName")?,
        version: required(&mut p, "version")?,
        operating_system: p.remove("operatingSystem"),
    };
    let image = app.upload_device_image(&actor, target, format, content_length(&headers), body_reader(body)).await?;
    g.entity(&format!("{VE}/deviceImages"), &image, StatusCode::CREATED)
}

/// Adds a version from a disk image file on the server's host; existing Cloud PCs keep theirs.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}/versions", tag = "images", request_body = DeviceImageVersionCreate,
    responses((status = 201, body = DeviceImage)))]
pub async fn create_version(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<DeviceImageVersionCreate>,
) -> Reply {
    g.entity(
        &format!("{VE}/deviceImages"),
        &app.create_device_image_version(&actor, &id, input).await?,
        StatusCode::CREATED,
    )
}

/// Deletes one version and its files; refused while a Cloud PC is built from it.
#[utoipa::path(delete, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}/versions/{version}", tag = "images",
    responses((status = 204), (status = 409, description = "in use, being checked, or the only version")))]
pub async fn delete_version(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath((id, version)): ApiPath<(String, String)>,
) -> Reply {
    app.delete_device_image_version(&actor, &id, &version).await?;
    no_content()
}

/// Adds a version from a disk image streamed as the request body (`?version=…[&format=raw]`).
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}/versions/upload", tag = "images",
    params(("version" = String, Query, pattern = r"^[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}$", description = "Major.Minor.Patch, higher than the image's newest version"),
        ("format" = Option<SourceImageFormat>, Query, description = "qcow2 (default) or raw")),
    request_body(content = ImageBytes, content_type = "application/octet-stream"),
    responses((status = 201, body = DeviceImage),
        (status = 413, description = "Larger than an image of the size limit can be."),
        (status = 429, description = "As many uploads as the server takes at once are streaming; try again after Retry-After."),
        (status = 507, description = "The server has too little free space for the image.")))]
pub async fn upload_version(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiPath(id): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let mut p = upload_params(&uri, &["version", "format"])?;
    let format = source_format(&mut p)?;
    let target = UploadTarget::NewVersion { image_id: id, version: required(&mut p, "version")? };
    let image = app.upload_device_image(&actor, target, format, content_length(&headers), body_reader(body)).await?;
    g.entity(&format!("{VE}/deviceImages"), &image, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/galleryImages", tag = "images", responses((status = 200, body = Collection<GalleryImage>)))]
pub async fn list_gallery(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page(&format!("{VE}/galleryImages"), app.list_gallery_images().await?)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/galleryImages/{id}", tag = "images", responses((status = 200, body = GalleryImage)))]
pub async fn get_gallery(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity(&format!("{VE}/galleryImages"), &app.get_gallery_image(&id).await?, StatusCode::OK)
}

/// cloudpc extension: deletes an image build nothing uses (its registration and its directory).
#[utoipa::path(delete, path = "/v1.0/deviceManagement/virtualEndpoint/galleryImages/{id}", tag = "images",
    responses((status = 204), (status = 409, description = "a policy or a Cloud PC uses it")))]
pub async fn delete_gallery(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.delete_gallery_image(&actor, &id).await?;
    no_content()
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages", tag = "images", responses((status = 200, body = Collection<DeviceImage>)))]
pub async fn list_device(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page(&format!("{VE}/deviceImages"), app.list_device_images().await?)
}

/// Registers a disk image file (qcow2 or raw) on the server's host; the image is `pending` until checked.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages", tag = "images", request_body = DeviceImageCreate,
    responses((status = 201, body = DeviceImage), (status = 409, description = "The server keeps as many custom images as it may.")))]
pub async fn create_device(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<DeviceImageCreate>,
) -> Reply {
    g.entity(&format!("{VE}/deviceImages"), &app.create_device_image(&actor, input).await?, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}", tag = "images", responses((status = 200, body = DeviceImage)))]
pub async fn get_device(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity(&format!("{VE}/deviceImages"), &app.get_device_image(&id).await?, StatusCode::OK)
}

#[utoipa::path(delete, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}", tag = "images", responses((status = 204), (status = 409, description = "a policy uses the image")))]
pub async fn delete_device(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.delete_device_image(&actor, &id).await?;
    no_content()
}
