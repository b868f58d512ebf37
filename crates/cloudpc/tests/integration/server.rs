//! Start-up: the first administrator token, persistence across restarts, settings, OpenAPI.

use reqwest::{Method, StatusCode};

use crate::support::*;

#[tokio::test]
async fn test_first_start_prints_token_once_and_it_survives_restart() {
    let s = Server::start_with(&[], None).await;
    let token = s.banner.iter().find(|l| l.starts_with("cpc_")).expect("token printed on first start").clone();
    let (status, _) = s.raw(Method::GET, "/v1.0/users", Some(&token), None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) =
        s.call_as(&token, Method::POST, "/v1.0/groups", Some(serde_json::json!({"displayName": "Kept"}))).await;
    assert_eq!(status, StatusCode::CREATED);

    let data = s.stop();
    let again = Server::start_in(data, &[], None).await;
    assert!(again.banner.iter().all(|l| !l.contains("cpc_")), "token printed again: {:?}", again.banner);
    let (status, v) = again.raw(Method::GET, "/v1.0/groups", Some(&token), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["value"][0]["displayName"], "Kept");
}

#[tokio::test]
async fn test_settings_file_flags_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloudpc.toml");
    std::fs::write(&config, "max_image_size_gb = 1\nlog = \"warn\"\n").unwrap();
    let image = qcow2(dir.path(), "two.qcow2", "2G");

    let from_file = Server::start_with(&["--config", config.to_str().unwrap()], Some(ADMIN_TOKEN)).await;
    let v = from_file.image("two", &image).await;
    assert_eq!(v["errorCode"], "sourceImageSizeExceedsLimitation", "file setting applies: {v}");

    let flag_wins =
        Server::start_with(&["--config", config.to_str().unwrap(), "--max-image-size-gb", "4"], Some(ADMIN_TOKEN))
            .await;
    let v = flag_wins.image("two", &image).await;
    assert_eq!(v["status"], "ready", "flag overrides file: {v}");

    std::fs::write(&config, "max_image_size_gb = 1\nsurprise = true\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["server", "--listen", "127.0.0.1:0", "--config", config.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("d"))
        .env("CLOUDPC_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("surprise"), "names the bad key: {err}");

    let out = std::process::Command::new(bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("e"))
        .env("CLOUDPC_ADMIN_TOKEN", "too-short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CLOUDPC_ADMIN_TOKEN"));
}

#[tokio::test]
async fn test_openapi_document_lists_the_graph_paths() {
    let s = Server::start().await;
    let (status, doc) = s.raw(Method::GET, "/openapi.json", None, None, None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1.0/users",
        "/v1.0/groups/{id}/members/$ref",
        "/v1.0/subscribedSkus",
        "/v1.0/users/{id}/assignLicense",
        "/v1.0/deviceManagement/virtualEndpoint/provisioningPolicies/{id}/assign",
        "/v1.0/deviceManagement/virtualEndpoint/deviceImages",
        "/v1.0/deviceManagement/virtualEndpoint/auditEvents",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    assert!(doc["components"]["schemas"]["ProvisioningPolicy"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}
