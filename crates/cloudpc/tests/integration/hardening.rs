//! Tests of the outside review's hardening items (issue 9) that need no VM: supervised background
//! work, bounded input at the edge, sign-in limits, console tickets, tokens.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// Licenses `upn` with a new 2-vCPU SKU (bigger than the small host, so nothing boots).
async fn license(s: &Server, upn: &str, part: &str) {
    let sku = s
        .create(
            "/v1.0/subscribedSkus",
            json!({"skuPartNumber": part, "prepaidUnits": {"enabled": 5}, "vCpuCount": 2, "ramInGB": 1, "storageInGB": 1}),
        )
        .await;
    let (status, v) = s
        .post(
            &format!("/v1.0/users/{upn}/assignLicense"),
            json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []}),
        )
        .await;
    assert!(status.is_success(), "{v}");
}

async fn cloud_pc_of(s: &Server, upn: &str) -> Value {
    let (_, v) = s.get(&format!("{VE}/cloudPCs")).await;
    v["value"].as_array().unwrap().iter().find(|p| p["userPrincipalName"] == upn).cloned().unwrap_or(Value::Null)
}

async fn wait_cloud_pc_of(s: &Server, upn: &str, status: &str) -> Value {
    let mut pc = Value::Null;
    for _ in 0..300 {
        pc = cloud_pc_of(s, upn).await;
        if pc["status"] == status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pc
}

#[tokio::test]
async fn test_panic_while_planning_one_cloud_pc_fails_it_and_the_loop_goes_on() {
    // The first Cloud PC to start a generation panics there; the first reconciler pass panics
    // too. Without supervision either would end the reconciler for every Cloud PC.
    let s = Server::start_on_small_host(&[
        "--inject-panic",
        "startGeneration:1",
        "--inject-panic",
        "reconcile:1",
        "--resync-secs",
        "1",
    ])
    .await;
    let image = s.ready_image("Base").await;
    let policy = s.policy("P", &image).await;
    s.user_targeted_by(&policy, "first@contoso.com").await;
    license(&s, "first@contoso.com", "FIRST").await;
    let pc = wait_cloud_pc_of(&s, "first@contoso.com", "failed").await;
    assert_eq!(pc["status"], "failed", "{pc}");
    let detail = pc["statusDetail"].as_str().unwrap();
    assert!(detail.contains("internal error") && detail.contains("injected panic at startGeneration"), "{detail}");
    assert!(s.audit_activities().await.iter().any(|a| a == "Internal error CloudPc"));
    // It stays its policy's, so the reconciler does not take it for an orphan and deprovision it.
    assert_eq!(pc["provisioningPolicyId"], policy["id"], "{pc}");

    // The loop still runs: the next user's Cloud PC (same group) is planned and waits for capacity.
    let group = s.get("/v1.0/groups?$filter=displayName eq 'Group of first@contoso.com'").await.1["value"][0].clone();
    let second = s.user("second@contoso.com").await;
    s.add_member(&group, &second).await;
    license(&s, "second@contoso.com", "SECOND").await;
    let pc2 = wait_cloud_pc_of(&s, "second@contoso.com", "pendingProvision").await;
    assert_eq!(pc2["status"], "pendingProvision", "{pc2}");
    // The failed one stays failed (no loop), and Retry starts it again.
    let id = pc["id"].as_str().unwrap();
    let (status, v) = s.post(&format!("{VE}/cloudPCs/{id}/retry"), json!({})).await;
    assert!(status.is_success(), "{v}");
    let pc = wait_cloud_pc_of(&s, "first@contoso.com", "pendingProvision").await;
    assert_eq!(pc["status"], "pendingProvision", "{pc}");
}

#[tokio::test]
async fn test_panic_inside_a_step_is_that_steps_failure() {
    let s = Server::start_on_small_host(&["--inject-panic", "allocateCapacity:1", "--resync-secs", "1"]).await;
    let image = s.ready_image("Base").await;
    let policy = s.policy("P", &image).await;
    s.user_targeted_by(&policy, "a@contoso.com").await;
    license(&s, "a@contoso.com", "A").await;
    // Attempt 1 fails in allocateCapacity with the panic's message; attempt 2 waits for capacity.
    let pc = wait_cloud_pc_of(&s, "a@contoso.com", "pendingProvision").await;
    assert_eq!(pc["status"], "pendingProvision", "{pc}");
    let (_, steps) = s.get(&format!("{VE}/cloudPCs/{}/provisioningSteps", pc["id"].as_str().unwrap())).await;
    let failed: Vec<&Value> = steps["value"].as_array().unwrap().iter().filter(|st| st["status"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{steps}");
    assert_eq!(failed[0]["name"], "allocateCapacity");
    assert!(failed[0]["error"].as_str().unwrap().contains("internal error in this step: injected panic"), "{steps}");
}
