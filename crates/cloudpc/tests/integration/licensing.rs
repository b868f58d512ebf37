//! SKUs with hardware sizes and seats; direct and group-based license assignment.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

async fn assign(s: &Server, who: &str, add: &[&Value], remove: &[&Value]) -> (StatusCode, Value) {
    let body = json!({
        "addLicenses": add.iter().map(|k| json!({"skuId": k["skuId"], "disabledPlans": []})).collect::<Vec<_>>(),
        "removeLicenses": remove.iter().map(|k| k["skuId"].clone()).collect::<Vec<_>>(),
    });
    s.post(&format!("{who}/assignLicense"), body).await
}

async fn consumed(s: &Server, sku: &Value) -> u64 {
    let (_, v) = s.get(&format!("/v1.0/subscribedSkus/{}", sku["id"].as_str().unwrap())).await;
    v["consumedUnits"].as_u64().unwrap()
}

#[tokio::test]
async fn test_sku_carries_hardware_size_and_seats() {
    let s = Server::start().await;
    let sku = s
        .create("/v1.0/subscribedSkus", json!({"skuPartNumber": "CPC_E_4C_16GB_256GB", "displayName": "Cloud PC Enterprise 4/16/256", "prepaidUnits": {"enabled": 10}, "vCpuCount": 4, "ramInGB": 16, "storageInGB": 256}))
        .await;
    assert_eq!(
        (sku["vCpuCount"].as_u64(), sku["ramInGB"].as_u64(), sku["storageInGB"].as_u64()),
        (Some(4), Some(16), Some(256))
    );
    assert_eq!(sku["prepaidUnits"]["enabled"], 10);
    assert_eq!(sku["consumedUnits"], 0);
    assert_eq!(sku["id"], sku["skuId"]);
    let id = sku["id"].as_str().unwrap();
    let (status, _) =
        s.patch(&format!("/v1.0/subscribedSkus/{id}"), json!({"ramInGB": 32, "prepaidUnits": {"enabled": 20}})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, after) = s.get(&format!("/v1.0/subscribedSkus/{id}")).await;
    assert_eq!(after["ramInGB"], 32);
    assert_eq!(after["prepaidUnits"]["enabled"], 20);
    let (status, v) = s.post("/v1.0/subscribedSkus", json!({"skuPartNumber": "cpc_e_4c_16gb_256gb", "prepaidUnits": {"enabled": 1}, "vCpuCount": 1, "ramInGB": 1, "storageInGB": 1})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = s.post("/v1.0/subscribedSkus", json!({"skuPartNumber": "ZERO", "prepaidUnits": {"enabled": 1}, "vCpuCount": 0, "ramInGB": 1, "storageInGB": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("vCpuCount"), "{v}");
}

#[tokio::test]
async fn test_direct_assignment_past_seat_count_refused_and_nothing_stored() {
    let s = Server::start().await;
    let sku = s.sku("CPC_SMALL", 1).await;
    let a = s.user("a@contoso.com").await;
    s.user("b@contoso.com").await;
    let (status, v) = assign(&s, "/v1.0/users/a@contoso.com", &[&sku], &[]).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["id"], a["id"]);
    assert_eq!(consumed(&s, &sku).await, 1);
    let (_, details) = s.get("/v1.0/users/a@contoso.com/licenseDetails").await;
    assert_eq!(details["value"][0]["skuPartNumber"], "CPC_SMALL");
    assert_eq!(details["value"][0]["licenseAssignmentStates"][0]["assignedByGroup"], Value::Null);

    let events_before = s.admin_audit_count().await;
    let (status, v) = assign(&s, "/v1.0/users/b@contoso.com", &[&sku], &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("CPC_SMALL") && message(&v).contains("1 seats"), "{v}");
    let (_, details) = s.get("/v1.0/users/b@contoso.com/licenseDetails").await;
    assert!(details["value"].as_array().unwrap().is_empty());
    assert_eq!(consumed(&s, &sku).await, 1);
    assert_eq!(s.admin_audit_count().await, events_before, "a refused change must not be audited as done");

    // Removing frees the seat for someone else.
    assert_eq!(assign(&s, "/v1.0/users/a@contoso.com", &[], &[&sku]).await.0, StatusCode::OK);
    assert_eq!(assign(&s, "/v1.0/users/b@contoso.com", &[&sku], &[]).await.0, StatusCode::OK);
    assert_eq!(consumed(&s, &sku).await, 1);
}

#[tokio::test]
async fn test_group_license_counts_each_user_once_and_guards_membership() {
    let s = Server::start().await;
    let sku = s.sku("CPC_GROUP", 2).await;
    let g = s.group("Licensed").await;
    let gid = g["id"].as_str().unwrap();
    let a = s.user("a@contoso.com").await;
    let b = s.user("b@contoso.com").await;
    let c = s.user("c@contoso.com").await;
    s.add_member(&g, &a).await;
    assert_eq!(assign(&s, "/v1.0/users/a@contoso.com", &[&sku], &[]).await.0, StatusCode::OK);
    let (status, v) = assign(&s, &format!("/v1.0/groups/{gid}"), &[&sku], &[]).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(consumed(&s, &sku).await, 1, "direct + group for the same user is one seat");

    let (_, details) = s.get("/v1.0/users/a@contoso.com/licenseDetails").await;
    let states = details["value"][0]["licenseAssignmentStates"].as_array().unwrap();
    assert_eq!(states.len(), 2);
    assert!(states.iter().any(|st| st["assignedByGroup"] == g["id"]));

    assert_eq!(s.add_member(&g, &b).await.0, StatusCode::NO_CONTENT);
    assert_eq!(consumed(&s, &sku).await, 2);
    let (status, v) = s.add_member(&g, &c).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("CPC_GROUP"), "{v}");
    let (_, members) = s.get(&format!("/v1.0/groups/{gid}/members")).await;
    assert_eq!(members["value"].as_array().unwrap().len(), 2, "refused member must not be added");

    // Seats cannot drop below what is in use.
    let (status, v) = s
        .patch(
            &format!("/v1.0/subscribedSkus/{}", sku["id"].as_str().unwrap()),
            json!({"prepaidUnits": {"enabled": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");

    let (_, assigned) = s.get(&format!("/v1.0/groups/{gid}/assignedLicenses")).await;
    assert_eq!(assigned["value"][0]["skuPartNumber"], "CPC_GROUP");
    let (status, _) = s.delete(&format!("/v1.0/subscribedSkus/{}", sku["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::CONFLICT, "a SKU in use cannot be deleted");
    let _ = c;
}

#[tokio::test]
async fn test_assign_license_bad_references_name_the_field() {
    let s = Server::start().await;
    let sku = s.sku("CPC_A", 5).await;
    s.user("a@contoso.com").await;
    let (status, v) = s
        .post(
            "/v1.0/users/a@contoso.com/assignLicense",
            json!({"addLicenses": [{"skuId": "00000000-0000-0000-0000-000000000009"}], "removeLicenses": []}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("addLicenses[0].skuId"), "{v}");
    let (status, v) = s
        .post(
            "/v1.0/users/a@contoso.com/assignLicense",
            json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": [sku["skuId"]]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = s.post("/v1.0/users/a@contoso.com/assignLicense", json!({"addLicenses": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("removeLicenses"), "{v}");
    let (status, _) =
        s.post("/v1.0/users/nobody@contoso.com/assignLicense", json!({"addLicenses": [], "removeLicenses": []})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(consumed(&s, &sku).await, 0);
}
