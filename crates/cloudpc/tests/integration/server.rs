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

    let import = dir.path().to_str().unwrap();
    let from_file =
        Server::start_with(&["--config", config.to_str().unwrap(), "--image-import-dir", import], Some(ADMIN_TOKEN))
            .await;
    let v = from_file.image("two", &image).await;
    assert_eq!(v["errorCode"], "sourceImageSizeExceedsLimitation", "file setting applies: {v}");

    let flag_wins = Server::start_with(
        &["--config", config.to_str().unwrap(), "--max-image-size-gb", "4", "--image-import-dir", import],
        Some(ADMIN_TOKEN),
    )
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
        "/v1.0/deviceManagement/virtualEndpoint/deviceImages/upload",
        "/v1.0/deviceManagement/virtualEndpoint/deviceImages/{id}/versions/{version}",
        "/v1.0/deviceManagement/virtualEndpoint/galleryImages/{id}",
        "/v1.0/deviceManagement/virtualEndpoint/auditEvents",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    assert!(doc["components"]["schemas"]["ProvisioningPolicy"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn test_cloud_pc_waits_for_capacity_and_says_why() {
    let s = Server::start_on_small_host(&["--resync-secs", "1"]).await;
    let image = s.ready_image("Base").await;
    let policy = s.policy("Big", &image).await;
    s.user_targeted_by(&policy, "a@contoso.com").await;
    // 2 vCPUs do not fit a host that offers 1: the Cloud PC waits and says why, and no VM is made.
    let sku = s.create("/v1.0/subscribedSkus", serde_json::json!({"skuPartNumber": "BIG", "prepaidUnits": {"enabled": 1}, "vCpuCount": 2, "ramInGB": 1, "storageInGB": 1})).await;
    s.post(
        "/v1.0/users/a@contoso.com/assignLicense",
        serde_json::json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []}),
    )
    .await;
    let pc = s.wait_first_cloud_pc("pendingProvision").await;
    assert_eq!(pc["status"], "pendingProvision", "{pc}");
    let detail = pc["statusDetail"].as_str().unwrap();
    assert!(detail.contains("waiting for capacity") && detail.contains("2 vCPU"), "{detail}");
    // The reconciler tries the capacity step again at every resync, so it may be running just now.
    let mut steps = serde_json::Value::Null;
    for _ in 0..40 {
        steps = s.get(&format!("{VE}/cloudPCs/{}/provisioningSteps", pc["id"].as_str().unwrap())).await.1;
        if steps["value"][0]["status"] == "waiting" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(steps["value"][0]["name"], "allocateCapacity");
    assert_eq!(steps["value"][0]["status"], "waiting", "{steps}");
    assert_eq!(steps["value"].as_array().unwrap().len(), 1, "nothing after the capacity step ran");

    // The waiting Cloud PC is built from the image: it cannot be deleted, even once no policy uses it.
    let other = s.ready_image("Other").await;
    s.patch(
        &format!("{VE}/provisioningPolicies/{}", policy["id"].as_str().unwrap()),
        serde_json::json!({"imageId": other["id"]}),
    )
    .await;
    let (status, v) = s.delete(&format!("{VE}/deviceImages/{}", image["id"].as_str().unwrap())).await;
    assert_eq!(status.as_u16(), 409, "{v}");
    assert!(message(&v).contains("Cloud PC") && message(&v).contains(pc["managedDeviceName"].as_str().unwrap()), "{v}");
}
