//! `/deviceManagement/virtualEndpoint/galleryImages` and `/deviceImages`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use cloudpc_control::App;
use cloudpc_types::images::{DeviceImage, DeviceImageCreate, GalleryImage};

use super::{no_content, Reply};
use crate::extract::ApiJson;
use crate::odata::GraphRequest;
use crate::Caller;

const VE: &str = "deviceManagement/virtualEndpoint";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/deviceManagement/virtualEndpoint/galleryImages", get(list_gallery))
        .route("/deviceManagement/virtualEndpoint/galleryImages/{id}", get(get_gallery))
        .route("/deviceManagement/virtualEndpoint/deviceImages", get(list_device).post(create_device))
        .route("/deviceManagement/virtualEndpoint/deviceImages/{id}", get(get_device).delete(delete_device))
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/galleryImages", tag = "images", responses((status = 200, body = Vec<GalleryImage>)))]
pub async fn list_gallery(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page(&format!("{VE}/galleryImages"), app.list_gallery_images().await?)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/galleryImages/{id}", tag = "images", responses((status = 200, body = GalleryImage)))]
pub async fn get_gallery(State(app): State<App>, g: GraphRequest, Path(id): Path<String>) -> Reply {
    g.entity(&format!("{VE}/galleryImages"), &app.get_gallery_image(&id).await?, StatusCode::OK)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages", tag = "images", responses((status = 200, body = Vec<DeviceImage>)))]
pub async fn list_device(State(app): State<App>, g: GraphRequest) -> Reply {
    g.page(&format!("{VE}/deviceImages"), app.list_device_images().await?)
}

/// Registers a qcow2 file on the server's host; the image is `pending` until checked.
#[utoipa::path(post, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages", tag = "images", request_body = DeviceImageCreate, responses((status = 201, body = DeviceImage)))]
pub async fn create_device(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<DeviceImageCreate>,
) -> Reply {
    g.entity(&format!("{VE}/deviceImages"), &app.create_device_image(&actor, input).await?, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}", tag = "images", responses((status = 200, body = DeviceImage)))]
pub async fn get_device(State(app): State<App>, g: GraphRequest, Path(id): Path<String>) -> Reply {
    g.entity(&format!("{VE}/deviceImages"), &app.get_device_image(&id).await?, StatusCode::OK)
}

#[utoipa::path(delete, path = "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}", tag = "images", responses((status = 204), (status = 409, description = "a policy uses the image")))]
pub async fn delete_device(State(app): State<App>, Caller(actor): Caller, Path(id): Path<String>) -> Reply {
    app.delete_device_image(&actor, &id).await?;
    no_content()
}
