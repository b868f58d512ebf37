//! The OpenAPI document, generated from the handlers' annotations and the types' schemas.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{cloud_pcs, directory, images, licensing, policies, tokens};

#[derive(OpenApi)]
#[openapi(
    info(title = "cloudpc", description = "Self-hosted Cloud PCs; a Microsoft Graph-shaped API (virtualEndpoint, users, groups, subscribedSkus)."),
    paths(
        directory::list_users, directory::create_user, directory::get_user, directory::update_user, directory::delete_user,
        directory::member_of, directory::list_groups, directory::create_group, directory::get_group, directory::update_group,
        directory::delete_group, directory::list_members, directory::add_member, directory::remove_member,
        licensing::list_skus, licensing::create_sku, licensing::get_sku, licensing::update_sku, licensing::delete_sku,
        licensing::assign_user_license, licensing::assign_group_license, licensing::license_details, licensing::group_licenses,
        images::list_gallery, images::get_gallery, images::delete_gallery, images::list_device, images::create_device, images::get_device, images::delete_device, images::upload_device, images::create_version, images::upload_version, images::delete_version,
        policies::list, policies::create, policies::read, policies::update, policies::remove, policies::assign, policies::assignments,
        cloud_pcs::list_cloud_pcs, cloud_pcs::get_cloud_pc, cloud_pcs::steps, cloud_pcs::reprovision, cloud_pcs::retry,
        cloud_pcs::reboot, cloud_pcs::power_off, cloud_pcs::power_on, cloud_pcs::rename, cloud_pcs::end_grace_period,
        cloud_pcs::initial_password, cloud_pcs::console_ticket, cloud_pcs::list_audit, cloud_pcs::get_audit, cloud_pcs::list_devices,
        cloud_pcs::list_managed_devices,
        tokens::list, tokens::create,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
