//! Users, groups and membership.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn test_user_lifecycle_by_id_and_principal_name() {
    let s = Server::start().await;
    let u = s.create("/v1.0/users", json!({"userPrincipalName": "adele.vance@contoso.com", "displayName": "Adele Vance", "mail": "adele@contoso.com"})).await;
    assert_eq!(u["accountEnabled"], true);
    assert_eq!(u["mailNickname"], "adele.vance");
    assert!(u["@odata.context"].as_str().unwrap().ends_with("$metadata#users/$entity"));
    let id = u["id"].as_str().unwrap();

    let (status, by_upn) = s.get("/v1.0/users/adele.vance@contoso.com").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_upn["id"], id);

    let (status, _) =
        s.patch(&format!("/v1.0/users/{id}"), json!({"displayName": "Adele V.", "accountEnabled": false})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, after) = s.get(&format!("/v1.0/users/{id}")).await;
    assert_eq!(after["displayName"], "Adele V.");
    assert_eq!(after["accountEnabled"], false);

    let (status, v) =
        s.post("/v1.0/users", json!({"userPrincipalName": "ADELE.VANCE@contoso.com", "displayName": "dup"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("already exists"));

    let (status, _) = s.delete(&format!("/v1.0/users/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = s.get(&format!("/v1.0/users/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "ResourceNotFound");
    let acts = s.audit_activities().await;
    for a in ["Create User", "Update User", "Delete User"] {
        assert!(acts.iter().any(|x| x == a), "missing audit {a}: {acts:?}");
    }
}

#[tokio::test]
async fn test_user_update_records_old_and_new_values() {
    let s = Server::start().await;
    let u = s.user("megan@contoso.com").await;
    s.patch(&format!("/v1.0/users/{}", u["id"].as_str().unwrap()), json!({"displayName": "Megan Bowen"})).await;
    let (_, v) = s.get(&format!("{VE}/auditEvents?$filter=activity eq 'Update User'")).await;
    let props = &v["value"][0]["resources"][0]["modifiedProperties"];
    assert_eq!(props.as_array().unwrap().len(), 1, "{props}");
    assert_eq!(props[0]["displayName"], "displayName");
    assert_eq!(props[0]["oldValue"], "megan@contoso.com");
    assert_eq!(props[0]["newValue"], "Megan Bowen");
}

#[tokio::test]
async fn test_group_membership_add_list_remove() {
    let s = Server::start().await;
    let g = s.create("/v1.0/groups", json!({"displayName": "Finance", "description": "Money people", "mailEnabled": false, "securityEnabled": true, "mailNickname": "finance"})).await;
    let gid = g["id"].as_str().unwrap();
    let a = s.user("a@contoso.com").await;
    let b = s.user("b@contoso.com").await;
    assert_eq!(s.add_member(&g, &a).await.0, StatusCode::NO_CONTENT);
    assert_eq!(s.add_member(&g, &b).await.0, StatusCode::NO_CONTENT);
    let (status, v) = s.add_member(&g, &a).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("already a member"));

    let (_, members) = s.get(&format!("/v1.0/groups/{gid}/members")).await;
    let upns: Vec<&str> =
        members["value"].as_array().unwrap().iter().map(|m| m["userPrincipalName"].as_str().unwrap()).collect();
    assert_eq!(upns, ["a@contoso.com", "b@contoso.com"]);
    let (_, of) = s.get("/v1.0/users/a@contoso.com/memberOf").await;
    assert_eq!(of["value"][0]["displayName"], "Finance");

    let (status, _) = s.delete(&format!("/v1.0/groups/{gid}/members/{}/$ref", a["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.delete(&format!("/v1.0/groups/{gid}/members/{}/$ref", a["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, members) = s.get(&format!("/v1.0/groups/{gid}/members")).await;
    assert_eq!(members["value"].as_array().unwrap().len(), 1);

    let (status, _) = s.patch(&format!("/v1.0/groups/{gid}"), json!({"displayName": "Finance EU"})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.delete(&format!("/v1.0/groups/{gid}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.get("/v1.0/users/b@contoso.com").await;
    assert_eq!(status, StatusCode::OK, "deleting a group keeps its members");
}

#[tokio::test]
async fn test_membership_of_missing_user_names_the_field() {
    let s = Server::start().await;
    let g = s.group("Finance").await;
    let gid = g["id"].as_str().unwrap();
    let (status, v) = s.post(&format!("/v1.0/groups/{gid}/members/$ref"), json!({"@odata.id": "https://graph.microsoft.com/v1.0/directoryObjects/00000000-0000-0000-0000-000000000001"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("@odata.id"), "{v}");
    let (status, v) = s
        .post(
            &format!("/v1.0/groups/{gid}/members/$ref"),
            json!({"@odata.id": "https://graph.microsoft.com/v1.0/directoryObjects/not-an-id"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("@odata.id"), "{v}");
    let (status, _) = s.post("/v1.0/groups", json!({"displayName": "Mail", "mailEnabled": true})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
