//! Every call needs a token; readers read, administrators change.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn test_missing_or_wrong_token_refused() {
    let s = Server::start().await;
    let (status, v) = s.raw(Method::GET, "/v1.0/users", None, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "InvalidAuthenticationToken");
    for bad in ["cpc_wrong", "not-even-a-token", ""] {
        let (status, _) = s.raw(Method::GET, "/v1.0/users", Some(bad), None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "token {bad:?}");
    }
    let (status, _) = s.raw(Method::POST, "/v1.0/users", Some("cpc_wrong"), Some("{}"), Some("application/json")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn test_reader_reads_but_cannot_change_anything() {
    let s = Server::start().await;
    let user = s.user("adele@contoso.com").await;
    let group = s.group("Finance").await;
    let reader = s.reader_token().await;
    let before = s.snapshot().await;

    let (status, v) = s.call_as(&reader, Method::GET, "/v1.0/users", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["value"].as_array().unwrap().len(), 1);
    let (status, _) = s.call_as(&reader, Method::GET, &format!("{VE}/auditEvents"), None).await;
    assert_eq!(status, StatusCode::OK);

    let uid = user["id"].as_str().unwrap();
    let gid = group["id"].as_str().unwrap();
    let writes = [
        (Method::POST, "/v1.0/users".to_string(), json!({"userPrincipalName": "x@contoso.com", "displayName": "x"})),
        (Method::PATCH, format!("/v1.0/users/{uid}"), json!({"displayName": "changed"})),
        (Method::DELETE, format!("/v1.0/users/{uid}"), json!(null)),
        (Method::POST, format!("/v1.0/groups/{gid}/members/$ref"), json!({"@odata.id": uid})),
        (Method::POST, "/v1.0/subscribedSkus".to_string(), json!({})),
        (Method::POST, format!("{VE}/provisioningPolicies"), json!({})),
        (Method::POST, "/cloudpc/tokens".to_string(), json!({"displayName": "me", "role": "cloudPcAdministrator"})),
    ];
    for (method, path, body) in writes {
        let body = (!body.is_null()).then_some(body);
        let (status, v) = s.call_as(&reader, method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "Authorization_RequestDenied");
        assert!(message(&v).contains("Cloud PC Reader"), "{v}");
    }
    let (status, _) = s.call_as(&reader, Method::GET, "/cloudpc/tokens", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "readers cannot list tokens");
    assert_eq!(s.snapshot().await, before, "refused writes changed something");
    let (_, u) = s.get(&format!("/v1.0/users/{uid}")).await;
    assert_eq!(u["displayName"], "adele@contoso.com");
}

#[tokio::test]
async fn test_admin_creates_tokens_and_secrets_are_not_listed() {
    let s = Server::start().await;
    let created = s.create("/cloudpc/tokens", json!({"displayName": "ci", "role": "cloudPcAdministrator"})).await;
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("cpc_"));
    let (status, _) = s.call_as(secret, Method::POST, "/v1.0/groups", Some(json!({"displayName": "made by ci"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, list) = s.get("/cloudpc/tokens").await;
    let text = list.to_string();
    assert!(!text.contains(secret) && !text.contains("secret"), "token list leaks secrets: {text}");
    assert_eq!(list["value"].as_array().unwrap().len(), 2);
    let (_, events) = s.get(&format!("{VE}/auditEvents?$filter=activity eq 'Create Group'")).await;
    assert_eq!(events["value"][0]["actor"]["userPrincipalName"], "ci");
    assert_eq!(events["value"][0]["actor"]["ipAddress"], "127.0.0.1");
}

#[tokio::test]
async fn test_audit_events_cannot_be_changed_through_the_api() {
    let s = Server::start().await;
    s.group("Finance").await;
    let (_, events) = s.get(&format!("{VE}/auditEvents")).await;
    let event = events["value"].as_array().unwrap().last().unwrap().clone();
    let id = event["id"].as_str().unwrap();
    for method in [Method::PATCH, Method::DELETE, Method::PUT] {
        let (status, v) =
            s.call(method.clone(), &format!("{VE}/auditEvents/{id}"), Some(json!({"activity": "forged"}))).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}: {v}");
    }
    let (status, v) = s.call(Method::POST, &format!("{VE}/auditEvents"), Some(json!({"activity": "forged"}))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    let (_, after) = s.get(&format!("{VE}/auditEvents/{id}")).await;
    assert_eq!(after["activity"], event["activity"]);
    assert_eq!(after["activityDateTime"], event["activityDateTime"]);
}
