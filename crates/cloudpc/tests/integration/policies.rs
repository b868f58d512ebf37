//! Provisioning policies: rules on create and update, ordered assignments, delete guard.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

fn path(p: &Value) -> String {
    format!("{VE}/provisioningPolicies/{}", p["id"].as_str().unwrap())
}

fn targets(groups: &[&Value]) -> Value {
    json!({"assignments": groups.iter().map(|g| json!({"target": {"@odata.type": "#microsoft.graph.cloudPcManagementGroupAssignmentTarget", "groupId": g["id"]}})).collect::<Vec<_>>()})
}

#[tokio::test]
async fn test_policy_create_with_defaults_and_graph_shape() {
    let s = Server::start().await;
    let img = s.ready_image("Ubuntu").await;
    let p = s
        .create(
            &format!("{VE}/provisioningPolicies"),
            json!({
                "@odata.type": "#microsoft.graph.cloudPcProvisioningPolicy",
                "displayName": "Finance (Berlin)",
                "description": "Desktops for finance",
                "imageId": img["id"], "imageType": "custom",
                "cloudPcNamingTemplate": "FIN-%USERNAME:4%-%RAND:5%",
                "localAdminEnabled": true,
            }),
        )
        .await;
    assert_eq!(p["provisioningType"], "dedicated");
    assert_eq!(p["imageDisplayName"], "Ubuntu");
    assert_eq!(p["windowsSetting"]["locale"], "en-US");
    assert_eq!(p["domainJoinConfigurations"][0]["domainJoinType"], "azureADJoin");
    assert_eq!(p["domainJoinConfigurations"][0]["regionName"], "automatic");
    assert_eq!(p["localAdminEnabled"], true);
    let (_, got) = s.get(&path(&p)).await;
    assert_eq!(got["displayName"], "Finance (Berlin)");
    assert!(got.get("assignments").is_none(), "assignments only with $expand");
}

#[tokio::test]
async fn test_policy_name_and_template_rules_refused_and_nothing_stored() {
    let s = Server::start().await;
    let img = s.ready_image("Base").await;
    let before = s.snapshot().await;
    let base = |name: &str, template: Option<&str>| {
        let mut b = json!({"displayName": name, "imageId": img["id"], "imageType": "custom"});
        if let Some(t) = template {
            b["cloudPcNamingTemplate"] = json!(t);
        }
        b
    };
    for bad in ["a<b", "a>b", "a&b", "a|b", "a\"b", "a^b", "", "   "] {
        let (status, v) = s.post(&format!("{VE}/provisioningPolicies"), base(bad, None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(message(&v).contains("displayName"), "{bad:?}: {v}");
    }
    for bad in [
        "CPC-%RAND:4%",
        "CPC-%USERNAME:5%",
        "TOOLONGPREFIX-%RAND:5%",
        "CPC_%RAND:5%",
        "%RAND:5%",
        "CPC-%RAND:5%%RAND:5%",
        "CPC-%FOO:3%-%RAND:5%",
    ] {
        let (status, v) = s.post(&format!("{VE}/provisioningPolicies"), base("ok", Some(bad))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(message(&v).contains("cloudPcNamingTemplate"), "{bad}: {v}");
    }
    assert_eq!(s.snapshot().await, before);
}

#[tokio::test]
async fn test_policy_image_must_exist_and_be_ready() {
    let s = Server::start().await;
    let broken = s.data_dir().join("broken.qcow2");
    std::fs::write(&broken, b"not an image").unwrap();
    let failed = s.image("Broken", &broken).await;
    assert_eq!(failed["status"], "failed");
    for (image_id, image_type, words) in [
        (json!("00000000-0000-0000-0000-000000000000"), "custom", "does not exist"),
        (json!("not-a-guid"), "custom", "does not exist"),
        (json!("microsoftwindowsdesktop_windows-ent-cpc_win11-24h2"), "gallery", "does not exist"),
        (failed["id"].clone(), "custom", "not ready"),
    ] {
        let (status, v) = s
            .post(
                &format!("{VE}/provisioningPolicies"),
                json!({"displayName": "p", "imageId": image_id, "imageType": image_type}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(message(&v).contains("imageId") && message(&v).contains(words), "{v}");
    }
    let (status, v) = s.post(&format!("{VE}/provisioningPolicies"), json!({"displayName": "p", "imageId": failed["id"], "imageType": "custom", "domainJoinConfigurations": [{"domainJoinType": "hybridAzureADJoin"}]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("domainJoinConfigurations[0].onPremisesConnectionId"), "{v}");
}

#[tokio::test]
async fn test_policy_update_keeps_provisioning_type_and_is_audited() {
    let s = Server::start().await;
    let img = s.ready_image("Base").await;
    let p = s.policy("Finance", &img).await;
    let (status, v) = s.patch(&path(&p), json!({"provisioningType": "shared"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("provisioningType"), "{v}");
    let (status, _) = s.patch(&path(&p), json!({"provisioningType": "dedicated", "displayName": "Finance EU", "cloudPcNamingTemplate": "FIN-%RAND:6%"})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, got) = s.get(&path(&p)).await;
    assert_eq!(got["displayName"], "Finance EU");
    assert_eq!(got["cloudPcNamingTemplate"], "FIN-%RAND:6%");
    assert_eq!(got["provisioningType"], "dedicated");
    let (status, v) = s.patch(&path(&p), json!({"displayName": "bad|name"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (_, got) = s.get(&path(&p)).await;
    assert_eq!(got["displayName"], "Finance EU", "a refused update changes nothing");

    let (_, ev) = s.get(&format!("{VE}/auditEvents?$filter=activity eq 'Update ProvisioningPolicy'")).await;
    let props = ev["value"][0]["resources"][0]["modifiedProperties"].as_array().unwrap().clone();
    let names: Vec<&str> = props.iter().map(|p| p["displayName"].as_str().unwrap()).collect();
    assert_eq!(names, ["cloudPcNamingTemplate", "displayName"]);
}

#[tokio::test]
async fn test_assignments_keep_order_and_first_assignment_time() {
    let s = Server::start().await;
    let img = s.ready_image("Base").await;
    let p = s.policy("Finance", &img).await;
    let (a, b, c) = (s.group("A").await, s.group("B").await, s.group("C").await);
    let (status, v) = s.post(&format!("{}/assign", path(&p)), targets(&[&b, &a])).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (_, got) = s.get(&format!("{}?$expand=assignments", path(&p))).await;
    let list = got["assignments"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["target"]["groupId"], b["id"]);
    assert_eq!(list[1]["target"]["groupId"], a["id"]);
    assert_eq!(list[0]["id"], format!("{}_{}", p["id"].as_str().unwrap(), b["id"].as_str().unwrap()));
    let a_time = list[1]["assignedDateTime"].clone();

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    s.post(&format!("{}/assign", path(&p)), targets(&[&a, &c])).await;
    let (_, got) = s.get(&format!("{}/assignments", path(&p))).await;
    let list = got["value"].as_array().unwrap().clone();
    let ids: Vec<&Value> = list.iter().map(|x| &x["target"]["groupId"]).collect();
    assert_eq!(ids, [&a["id"], &c["id"]]);
    assert_eq!(list[0]["assignedDateTime"], a_time, "a group that stays keeps its first assignment time");
    assert_ne!(list[1]["assignedDateTime"], a_time);

    let (status, _) = s.delete(&format!("/v1.0/groups/{}", a["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::CONFLICT, "an assigned group cannot be deleted");
}

#[tokio::test]
async fn test_assign_refuses_unknown_or_repeated_groups() {
    let s = Server::start().await;
    let img = s.ready_image("Base").await;
    let p = s.policy("Finance", &img).await;
    let a = s.group("A").await;
    let ghost = json!({"id": "00000000-0000-0000-0000-00000000abcd"});
    let (status, v) = s.post(&format!("{}/assign", path(&p)), targets(&[&a, &ghost])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("assignments[1].target.groupId"), "{v}");
    let (status, v) = s.post(&format!("{}/assign", path(&p)), targets(&[&a, &a])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (_, got) = s.get(&format!("{}/assignments", path(&p))).await;
    assert!(got["value"].as_array().unwrap().is_empty(), "nothing assigned after refusals");
}

#[tokio::test]
async fn test_policy_with_assignments_cannot_be_deleted() {
    let s = Server::start().await;
    let img = s.ready_image("Base").await;
    let p = s.policy("Finance", &img).await;
    let g = s.group("Finance").await;
    s.post(&format!("{}/assign", path(&p)), targets(&[&g])).await;
    let (status, v) = s.delete(&path(&p)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(message(&v).contains("assigned"), "{v}");
    let (status, _) = s.post(&format!("{}/assign", path(&p)), json!({"assignments": []})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.delete(&path(&p)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.get(&path(&p)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let acts = s.audit_activities().await;
    for a in ["Create ProvisioningPolicy", "Assign ProvisioningPolicy", "Delete ProvisioningPolicy"] {
        assert!(acts.iter().any(|x| x == a), "missing {a}");
    }
}
