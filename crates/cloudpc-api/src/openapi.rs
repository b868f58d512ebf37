//! The OpenAPI document, generated from the handlers' annotations and the types' schemas.
//!
//! The annotations say what is particular to an operation: its success answer (a Graph entity or
//! a [`Collection`] envelope), its body, and the refusals only it can give (409 conflicts, 429 and
//! 507 on uploads). What holds for every operation because of the layers it passes through (the
//! auth middleware, the body limit, the JSON, path and OData extractors, the error mapping) is
//! added by [`GraphConventions`], one pass over the whole document: copying the same six responses
//! into sixty annotations would let the next new route forget one, and the document would again
//! promise less than the API answers. `schemathesis` (`scripts/schemathesis.sh`) and the
//! integration tests check the result against the running server.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Required, Response, ResponseBuilder, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::error::ODataError;
use crate::routes::{cloud_pcs, directory, hosts, identity, images, licensing, networks, policies, replica, tokens};

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
        cloud_pcs::reboot, cloud_pcs::power_off, cloud_pcs::power_on, cloud_pcs::hibernate, cloud_pcs::resume, cloud_pcs::rename, cloud_pcs::end_grace_period,
        cloud_pcs::initial_password, cloud_pcs::console_ticket, cloud_pcs::list_audit, cloud_pcs::get_audit, cloud_pcs::list_devices,
        cloud_pcs::list_managed_devices,
        tokens::list, tokens::create, tokens::read, tokens::revoke, replica::read,
        hosts::list, hosts::read, hosts::update, hosts::remove, hosts::create_join_token, hosts::evacuate,
        identity::list, identity::read, identity::create, identity::update, identity::remove, identity::scim_token,
        networks::list, networks::create, networks::read, networks::update, networks::remove, networks::run_health_checks,
    ),
    components(schemas(ODataError)),
    modifiers(&BearerAuth, &GraphConventions, &CreatedLinks),
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

/// The body of an image upload: the disk image's bytes, streamed.
pub struct ImageBytes;

impl PartialSchema for ImageBytes {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .min_length(Some(1))
            .description(Some("The disk image (qcow2, or raw with format=raw); not empty."))
            .into()
    }
}

impl ToSchema for ImageBytes {}

/// The answers every operation can give, named once under `components/responses`, each with the
/// Graph error body. Which operations get which is decided in [`GraphConventions::modify`].
const COMMON: &[(&str, &str, &str)] = &[
    (
        "400",
        "BadRequest",
        "The request is not valid: a body that is malformed or breaks a rule, an unknown or malformed \
         query option ($top, $skiptoken, $count, $filter, $expand, or a parameter of the operation), or an id \
         that is not valid text. The message names the field or option.",
    ),
    ("401", "Unauthorized", "No bearer token, or one that is not valid (unknown or revoked)."),
    (
        "403",
        "Forbidden",
        "The token's role may not do this: a Cloud PC Reader may only read, and only an administrator \
         may see or make tokens.",
    ),
    ("404", "NotFound", "Nothing with this id (or userPrincipalName) exists."),
    (
        "413",
        "PayloadTooLarge",
        "The request body is larger than the limit: 1 MiB for JSON bodies, the image size limit for uploads.",
    ),
    ("415", "UnsupportedMediaType", "The body was not sent with Content-Type: application/json."),
    ("500", "InternalServerError", "Something failed inside cloudpc; the cause is logged, not shown."),
];

/// Adds what every operation shares because of the layers in front of its handler, and the Graph
/// error body to every error answer. Only adds: an annotation's own description of a status wins.
struct GraphConventions;

impl Modify for GraphConventions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (_, name, description) in COMMON {
            components.responses.insert(name.to_string(), RefOr::T(error_response(description)));
        }
        let schemas = components.schemas.clone();
        for (path, item) in openapi.paths.paths.iter_mut() {
            for op in operations(item) {
                let has_id = path.contains('{');
                add_path_parameters(path, op);
                let body_types: Vec<String> = op.request_body.iter().flat_map(|b| b.content.keys().cloned()).collect();
                let json_body = body_types.iter().any(|t| t == "application/json");
                let applies = |status: &str| match status {
                    // Every handler parses its path and OData options; the auth layer runs first.
                    "400" | "401" | "403" | "500" => true,
                    "404" => has_id,
                    "413" => !body_types.is_empty(),
                    "415" => json_body,
                    _ => false,
                };
                for (status, name, _) in COMMON {
                    if applies(status) && !op.responses.responses.contains_key(*status) {
                        op.responses
                            .responses
                            .insert(status.to_string(), RefOr::Ref(Ref::new(format!("#/components/responses/{name}"))));
                    }
                }
                for (status, response) in op.responses.responses.iter_mut() {
                    let RefOr::T(response) = response else { continue };
                    if status.starts_with('4') || status.starts_with('5') {
                        if response.content.is_empty() {
                            response.content.insert("application/json".into(), error_content());
                        }
                        if status == "429" {
                            response.headers.insert(
                                "Retry-After".into(),
                                HeaderBuilder::new()
                                    .schema(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
                                    .description(Some("Seconds after which the same request may succeed."))
                                    .build(),
                            );
                        }
                    }
                }
                if is_collection(op, &schemas) {
                    op.parameters.get_or_insert_with(Vec::new).extend(collection_parameters());
                    let text = op.description.get_or_insert_with(String::new);
                    if !text.is_empty() {
                        text.push_str("\n\n");
                    }
                    text.push_str(COLLECTION_OPTIONS);
                }
            }
        }
    }
}

/// OpenAPI links from each create (`POST` on a collection, `201`) to the operations on the
/// created item (`{collection}/{id}…`), its `id` taken from the answer: a client (and
/// schemathesis's stateful phase) learns where the new resource's id goes. An upload creates in
/// the collection above it (`deviceImages/upload` → `deviceImages/{id}`).
struct CreatedLinks;

impl Modify for CreatedLinks {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let targets = |collection: &str| -> Vec<(String, String)> {
            let prefix = format!("{collection}/{{");
            let mut out = Vec::new();
            for (path, item) in openapi.paths.paths.iter() {
                let Some(rest) = path.strip_prefix(&prefix) else { continue };
                let Some((param, _)) = rest.split_once('}') else { continue };
                let ops = [&item.get, &item.put, &item.post, &item.delete, &item.patch];
                for id in ops.into_iter().flatten().filter_map(|op| op.operation_id.clone()) {
                    out.push((id, param.to_string()));
                }
            }
            out
        };
        let mut links = Vec::new();
        for (path, item) in openapi.paths.paths.iter() {
            let creates = item.post.as_ref().is_some_and(|op| op.responses.responses.contains_key("201"));
            if !creates || path.contains('{') {
                continue;
            }
            let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or_default();
            let found = [path.as_str(), parent].into_iter().map(targets).find(|t| !t.is_empty());
            links.push((path.clone(), found.unwrap_or_default()));
        }
        for (path, found) in links {
            let Some(op) = openapi.paths.paths.get_mut(&path).and_then(|i| i.post.as_mut()) else { continue };
            let Some(RefOr::T(created)) = op.responses.responses.get_mut("201") else { continue };
            for (operation_id, param) in found {
                // utoipa 5.5 writes `Link::operation_id` as "operation_id", a key OpenAPI does not
                // know; the extensions map is written flat, so the field goes in there by its name.
                let link = LinkBuilder::new()
                    .extensions(Some(Extensions::from_iter([("operationId", operation_id.clone())])))
                    .parameter(param, "$response.body#/id")
                    .description("The created item's id.")
                    .build();
                created.links.insert(operation_id, RefOr::T(link));
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

fn error_content() -> Content {
    Content::new(Some(RefOr::Ref(Ref::from_schema_name("ODataError"))))
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new().description(description).content("application/json", error_content()).build()
}

/// Whether the operation answers a [`Collection`](crate::odata::Collection): its 200 body has
/// `value` and `@odata.context`.
fn is_collection(op: &Operation, schemas: &BTreeMap<String, RefOr<Schema>>) -> bool {
    let Some(RefOr::T(ok)) = op.responses.responses.get("200") else { return false };
    ok.content.values().any(|c| {
        let schema = match &c.schema {
            Some(RefOr::Ref(r)) => r.ref_location.strip_prefix("#/components/schemas/").and_then(|n| schemas.get(n)),
            other => other.as_ref(),
        };
        match schema {
            Some(RefOr::T(Schema::Object(o))) => {
                o.properties.contains_key("value") && o.properties.contains_key("@odata.context")
            }
            _ => false,
        }
    })
}

/// Every `{name}` of the path as a required string parameter, unless the annotation describes it.
/// (Handlers take [`ApiPath`](crate::extract::ApiPath), which utoipa does not read as it reads
/// axum's `Path`.)
fn add_path_parameters(path: &str, op: &mut Operation) {
    let params = op.parameters.get_or_insert_with(Vec::new);
    for name in path.split('{').skip(1).filter_map(|s| s.split_once('}')).map(|(name, _)| name) {
        if !params.iter().any(|p| p.name == name && p.parameter_in == ParameterIn::Path) {
            params.push(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .build(),
            );
        }
    }
}

const COLLECTION_OPTIONS: &str = "A Graph collection, paged: follow `@odata.nextLink` while it is there. \
Also takes `$filter` (`property eq value`, terms joined by `and`; nested properties as `a/b`; a property \
the items do not have is refused with 400) and `$select` (comma-separated properties; the items then \
carry only those and `id`).";

/// The OData options a collection takes as parameters. `$filter` and `$select` are described in
/// words instead: which properties they accept depends on the collection, and `$select` answers
/// partial entities that the entity schemas (with their required properties) do not describe.
fn collection_parameters() -> Vec<Parameter> {
    let query = |name: &str, description: &str, schema: ObjectBuilder| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(schema))
            .build()
    };
    vec![
        query(
            "$top",
            "Page size (default 100).",
            ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)).maximum(Some(crate::odata::MAX_PAGE)),
        ),
        query(
            "$skiptoken",
            "Where the page starts; take it from @odata.nextLink.",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(0))
                .maximum(Some(i64::MAX)),
        ),
        query(
            "$count",
            "true adds @odata.count, the number of matching items over all pages.",
            ObjectBuilder::new().schema_type(Type::Boolean),
        ),
    ]
}

/// Built once: the document does not change while the server runs.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(ApiDoc::openapi);

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(DOCUMENT.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn document() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("the document serializes")
    }

    fn operations_of(doc: &Value) -> Vec<(String, String, &Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                out.push((method.clone(), path.clone(), op));
            }
        }
        out
    }

    #[test]
    fn test_every_operation_documents_the_answers_its_layers_can_give() {
        let doc = document();
        let ops = operations_of(&doc);
        assert!(ops.len() > 50, "the document lists every operation");
        for (method, path, op) in ops {
            let responses = op["responses"].as_object().expect("responses");
            let has = |s: &str| responses.contains_key(s);
            for status in ["400", "401", "403", "500"] {
                assert!(has(status), "{method} {path} does not document {status}");
            }
            assert_eq!(has("404"), path.contains('{'), "{method} {path}: 404 belongs to operations on an id");
            let body = op.get("requestBody").is_some();
            assert_eq!(has("413"), body, "{method} {path}: 413 belongs to operations with a body");
            let json_body = op["requestBody"]["content"].get("application/json").is_some();
            assert_eq!(has("415"), json_body, "{method} {path}: 415 belongs to operations with a JSON body");
            for name in path.split('{').skip(1).filter_map(|s| s.split_once('}')).map(|(n, _)| n) {
                let params = op["parameters"].as_array().expect("parameters");
                assert!(
                    params.iter().any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true),
                    "{method} {path}: the path parameter {name} is not documented"
                );
            }
        }
    }

    #[test]
    fn test_errors_are_graph_errors_and_collections_are_envelopes() {
        let doc = document();
        let resolve = |v: &Value| -> Value {
            match v["$ref"].as_str() {
                Some(r) => doc.pointer(r.strip_prefix('#').unwrap()).cloned().expect("the $ref resolves"),
                None => v.clone(),
            }
        };
        for (method, path, op) in operations_of(&doc) {
            for (status, response) in op["responses"].as_object().unwrap() {
                let response = resolve(response);
                let schema = &response["content"]["application/json"]["schema"];
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        schema["$ref"], "#/components/schemas/ODataError",
                        "{method} {path} {status} does not carry the Graph error body"
                    );
                } else if !schema.is_null() {
                    let body = resolve(schema);
                    assert_ne!(body["type"], "array", "{method} {path} {status} documents a bare array");
                }
            }
        }
        let envelope = &doc["components"]["schemas"]["Collection_User"];
        assert_eq!(envelope["required"], serde_json::json!(["@odata.context", "value"]));
        for key in ["@odata.count", "@odata.nextLink"] {
            assert!(envelope["properties"].get(key).is_some(), "{key} is documented");
        }
        let params = doc["paths"]["/v1.0/users"]["get"]["parameters"].as_array().unwrap();
        for name in ["$top", "$skiptoken", "$count"] {
            assert!(params.iter().any(|p| p["name"] == name), "{name} is documented on collections");
        }
    }

    #[test]
    fn test_creates_link_to_the_operations_on_what_they_created() {
        let doc = document();
        let links = &doc["paths"]["/v1.0/users"]["post"]["responses"]["201"]["links"];
        assert_eq!(links["get_user"]["operationId"], "get_user", "{links}");
        assert_eq!(links["get_user"]["parameters"]["id"], "$response.body#/id");
        assert!(links["get_user"].get("operation_id").is_none(), "{links}");
        let upload = &doc["paths"]["/v1.0/deviceManagement/virtualEndpoint/deviceImages/upload"]["post"];
        assert_eq!(upload["responses"]["201"]["links"]["get_device"]["operationId"], "get_device");
        let ids: Vec<&str> = operations_of(&doc).iter().filter_map(|(_, _, op)| op["operationId"].as_str()).collect();
        for (_, path, op) in operations_of(&doc) {
            for response in op["responses"].as_object().unwrap().values() {
                for (name, link) in response["links"].as_object().into_iter().flatten() {
                    let target = link["operationId"].as_str().unwrap_or_default();
                    assert!(ids.contains(&target), "{path}: link {name} points at no operation");
                }
            }
        }
    }

    #[test]
    fn test_operation_ids_are_unique() {
        let doc = document();
        let mut seen = std::collections::HashSet::new();
        for (method, path, op) in operations_of(&doc) {
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(seen.insert(id.to_string()), "operationId {id} is used twice");
        }
    }
}
