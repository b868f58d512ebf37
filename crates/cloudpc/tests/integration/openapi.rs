//! The OpenAPI document against real answers: for a few representative operations, a response the
//! server really gives (a collection page, an entity, and each refusal a test can provoke: 400,
//! 401, 403, 404, 409, 413, 415) must have a status the document lists for that operation and a
//! body that fits the schema documented for that status. A client generated from the document
//! relies on exactly that. `scripts/schemathesis.sh` checks every operation with generated
//! requests; this test keeps the essentials in `cargo test`, with readable failures.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::*;

/// The document, and a small JSON Schema checker for the parts of it cloudpc uses (`$ref`, `type`
/// with `null`, `required`, `properties`, `additionalProperties: false`, `items`, `oneOf`,
/// `anyOf`, `allOf`, `enum`, `minimum`): enough to tell a bare array from a Graph collection and
/// a Graph error from plain text.
struct Doc(Value);

impl Doc {
    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {r}"));
                self.resolve(self.0.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {r}")))
            }
            None => v,
        }
    }

    /// The documented response of `method path` for `status`, or a failure naming what is listed.
    fn response(&self, method: &str, path: &str, status: StatusCode) -> &Value {
        let op = &self.0["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not in the document");
        let responses = op["responses"].as_object().expect("responses");
        let listed: Vec<&String> = responses.keys().collect();
        let r = responses.get(status.as_str()).unwrap_or_else(|| {
            panic!("{method} {path} answered {status}, which the document does not list: {listed:?}")
        });
        self.resolve(r)
    }

    /// Checks that `body`, a real answer of `method path` with `status`, is documented.
    fn check(&self, method: &str, path: &str, status: StatusCode, body: &Value) {
        let response = self.response(method, path, status);
        match response["content"]["application/json"]["schema"].as_object() {
            Some(_) => {
                let schema = &response["content"]["application/json"]["schema"];
                if let Err(e) = self.validate(schema, body, "$") {
                    panic!("{method} {path} {status}: the body does not fit the documented schema: {e}\nbody: {body}");
                }
            }
            None => assert!(body.is_null(), "{method} {path} {status}: no body is documented, got {body}"),
        }
    }

    fn validate(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        for key in ["oneOf", "anyOf"] {
            if let Some(options) = schema[key].as_array() {
                let fits = options.iter().filter(|s| self.validate(s, v, at).is_ok()).count();
                let ok = if key == "oneOf" { fits == 1 } else { fits >= 1 };
                if !ok {
                    return Err(format!("{at}: fits {fits} of the {key} options"));
                }
            }
        }
        if let Some(all) = schema["allOf"].as_array() {
            for s in all {
                self.validate(s, v, at)?;
            }
        }
        if let Some(values) = schema["enum"].as_array() {
            if !values.contains(v) {
                return Err(format!("{at}: {v} is not one of {values:?}"));
            }
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.is_empty() {
            let actual = match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            let ok = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
            if !ok {
                return Err(format!("{at}: is {actual}, the document says {types:?}"));
            }
        }
        if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64()) {
            if n < min {
                return Err(format!("{at}: {n} is below the minimum {min}"));
            }
        }
        if let Value::Object(map) = v {
            for key in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(key) {
                    return Err(format!("{at}: the required property '{key}' is missing"));
                }
            }
            let props = schema["properties"].as_object();
            for (key, value) in map {
                match props.and_then(|p| p.get(key)) {
                    Some(s) => self.validate(s, value, &format!("{at}.{key}"))?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{at}: the property '{key}' is not documented"))
                    }
                    None => {}
                }
            }
        }
        if let (Value::Array(items), Some(item_schema)) = (v, schema.get("items")) {
            for (i, item) in items.iter().enumerate() {
                self.validate(item_schema, item, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}

async fn document(s: &Server) -> Doc {
    let (status, doc) = s.raw(Method::GET, "/openapi.json", None, None, None).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    Doc(doc)
}

#[tokio::test]
async fn test_collections_and_entities_answer_as_documented() {
    let s = Server::start().await;
    let doc = document(&s).await;
    let a = s.user("adele@contoso.com").await;
    s.user("bianca@contoso.com").await;
    s.sku("CPC_2VCPU", 3).await;
    let group = s.group("Finance").await;

    // A page with every optional member of the envelope: @odata.count and @odata.nextLink.
    let (status, page) = s.get("/v1.0/users?$top=1&$count=true").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page["@odata.nextLink"].is_string() && page["@odata.count"] == 2, "{page}");
    doc.check("get", "/v1.0/users", status, &page);
    for (path, real) in [
        ("/v1.0/groups", "/v1.0/groups".to_string()),
        ("/v1.0/subscribedSkus", "/v1.0/subscribedSkus".to_string()),
        ("/v1.0/groups/{id}/members", format!("/v1.0/groups/{}/members", group["id"].as_str().unwrap())),
        ("/v1.0/deviceManagement/virtualEndpoint/auditEvents", format!("{VE}/auditEvents")),
        ("/cloudpc/tokens", "/cloudpc/tokens".to_string()),
    ] {
        let (status, v) = s.get(&real).await;
        assert_eq!(status, StatusCode::OK, "{real}: {v}");
        doc.check("get", path, status, &v);
    }

    let (status, user) = s.get(&format!("/v1.0/users/{}", a["id"].as_str().unwrap())).await;
    doc.check("get", "/v1.0/users/{id}", status, &user);
    let (status, created) = s.post("/v1.0/groups", json!({"displayName": "Sales"})).await;
    doc.check("post", "/v1.0/groups", status, &created);
    let (status, none) = s.delete(&format!("/v1.0/groups/{}", created["id"].as_str().unwrap())).await;
    doc.check("delete", "/v1.0/groups/{id}", status, &none);
}

#[tokio::test]
async fn test_every_refusal_a_client_can_provoke_is_documented() {
    let s = Server::start().await;
    let doc = document(&s).await;
    let reader = s.reader_token().await;
    s.user("adele@contoso.com").await;
    let missing = "00000000-0000-0000-0000-000000000000";
    let user = json!({"userPrincipalName": "adele@contoso.com", "displayName": "Adele"}).to_string();

    let cases: Vec<(&str, &str, (StatusCode, Value))> = vec![
        // 400: a malformed OData option, a body breaking a rule, an id that is not UTF-8.
        ("get", "/v1.0/users", s.get("/v1.0/users?$top=0").await),
        ("delete", "/v1.0/subscribedSkus/{id}", s.delete("/v1.0/subscribedSkus/%FF").await),
        ("post", "/v1.0/groups", s.post("/v1.0/groups", json!({"displayName": " "})).await),
        (
            "get",
            "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{id}",
            s.get(&format!("{VE}/provisioningPolicies/{missing}?$expand=manager")).await,
        ),
        // 401: no token, and a token that is not one.
        ("get", "/v1.0/users", s.raw(Method::GET, "/v1.0/users", None, None, None).await),
        (
            "delete",
            "/v1.0/users/{id}",
            s.raw(Method::DELETE, &format!("/v1.0/users/{missing}"), Some("cpc_nope"), None, None).await,
        ),
        // 403: a reader writing, and a reader looking at tokens.
        (
            "post",
            "/v1.0/groups",
            s.call_as(&reader, Method::POST, "/v1.0/groups", Some(json!({"displayName": "X"}))).await,
        ),
        ("get", "/cloudpc/tokens", s.call_as(&reader, Method::GET, "/cloudpc/tokens", None).await),
        // 404: unknown ids, in an entity, a sub-collection and an action.
        ("get", "/v1.0/users/{id}", s.get(&format!("/v1.0/users/{missing}")).await),
        ("get", "/v1.0/users/{id}/licenseDetails", s.get(&format!("/v1.0/users/{missing}/licenseDetails")).await),
        (
            "post",
            "/v1.0/deviceManagement/virtualEndpoint/cloudPCs/{id}/reboot",
            s.post(&format!("{VE}/cloudPCs/{missing}/reboot"), json!({})).await,
        ),
        // 409: the userPrincipalName is taken.
        (
            "post",
            "/v1.0/users",
            s.raw(Method::POST, "/v1.0/users", Some(ADMIN_TOKEN), Some(&user), Some("application/json")).await,
        ),
        // 413: a JSON body over 1 MiB.
        (
            "post",
            "/v1.0/groups",
            s.raw(
                Method::POST,
                "/v1.0/groups",
                Some(ADMIN_TOKEN),
                Some(&json!({"displayName": "x".repeat((1 << 20) + 1024)}).to_string()),
                Some("application/json"),
            )
            .await,
        ),
        // 415: not JSON.
        (
            "post",
            "/v1.0/users",
            s.raw(Method::POST, "/v1.0/users", Some(ADMIN_TOKEN), Some(&user), Some("text/plain")).await,
        ),
    ];
    let mut provoked = std::collections::BTreeSet::new();
    for (method, path, (status, body)) in cases {
        assert!(status.is_client_error(), "{method} {path}: expected a refusal, got {status}: {body}");
        doc.check(method, path, status, &body);
        provoked.insert(status.as_u16());
    }
    assert_eq!(provoked.into_iter().collect::<Vec<_>>(), [400, 401, 403, 404, 409, 413, 415]);
}
