//! Malformed or hostile input is refused with a message that names the problem; nothing changes.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn test_malformed_bodies_refused_and_nothing_stored() {
    let s = Server::start().await;
    let before = s.snapshot().await;
    let cases: Vec<(&str, Option<&str>, StatusCode, &str)> = vec![
        ("{\"userPrincipalName\": ", Some("application/json"), StatusCode::BAD_REQUEST, "not well-formed JSON"),
        ("[1, 2]", Some("application/json"), StatusCode::BAD_REQUEST, "not valid"),
        (
            "{\"userPrincipalName\": \"a@contoso.com\"}",
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "displayName",
        ),
        (
            "{\"userPrincipalName\": \"a@contoso.com\", \"displayName\": \"A\", \"isAdmin\": true}",
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "isAdmin",
        ),
        (
            "{\"userPrincipalName\": \"a@contoso.com\", \"displayName\": \"A\", \"accountEnabled\": \"yes\"}",
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "accountEnabled",
        ),
        (
            "{\"userPrincipalName\": \"a@contoso.com\", \"displayName\": \"A\"}",
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            "{\"userPrincipalName\": \"a@contoso.com\", \"displayName\": \"A\"}",
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            "{\"userPrincipalName\": \"not-an-address\", \"displayName\": \"A\"}",
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "userPrincipalName",
        ),
        (
            "{\"userPrincipalName\": \"a@contoso.com\", \"displayName\": \"bell\\u0007\"}",
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "control characters",
        ),
        (
            "{\"userPrincipalName\": \"a@contoso.com\", \"displayName\": \"A\", \"mail\": \"nope\"}",
            Some("application/json"),
            StatusCode::BAD_REQUEST,
            "mail",
        ),
    ];
    for (body, ct, status, words) in cases {
        let (got, v) = s.raw(Method::POST, "/v1.0/users", Some(ADMIN_TOKEN), Some(body), ct).await;
        assert_eq!(got, status, "{body}: {v}");
        assert!(v["error"]["code"].is_string(), "Graph error body expected: {v}");
        assert!(message(&v).contains(words), "{body}: expected '{words}' in {v}");
    }
    assert_eq!(s.snapshot().await, before);
}

#[tokio::test]
async fn test_oversized_body_and_long_names_refused() {
    let s = Server::start().await;
    let before = s.snapshot().await;
    // Just over the 1 MiB limit, so the whole body fits in loopback socket buffers and the
    // client reads the answer instead of a reset.
    let huge = json!({"displayName": "x".repeat((1 << 20) + 1024)}).to_string();
    let (status, v) =
        s.raw(Method::POST, "/v1.0/groups", Some(ADMIN_TOKEN), Some(&huge), Some("application/json")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(message(&v).contains("larger than"), "{v}");
    let (status, v) = s.post("/v1.0/groups", json!({"displayName": "x".repeat(300)})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("displayName") && message(&v).contains("limit"), "{v}");
    assert_eq!(s.snapshot().await, before);
}

#[tokio::test]
async fn test_unknown_routes_and_methods_get_graph_errors() {
    let s = Server::start().await;
    let (status, v) = s.get("/v1.0/nothingHere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(message(&v).contains("nothingHere"), "{v}");
    let (status, v) = s.call(Method::PUT, "/v1.0/users", Some(json!({}))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(v["error"]["code"].is_string(), "{v}");
    let (status, v) = s.get("/v1.0/users/00000000-0000-0000-0000-000000000000").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(message(&v).contains("user"), "{v}");
}
