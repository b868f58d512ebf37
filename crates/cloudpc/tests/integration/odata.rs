//! The Graph conventions scripts rely on: paging, $filter, $select, $count, @odata.context.

use std::collections::HashSet;

use reqwest::StatusCode;

use crate::support::*;

#[tokio::test]
async fn test_paging_follows_next_link_through_every_item() {
    let s = Server::start().await;
    for i in 0..7 {
        s.user(&format!("user{i}@contoso.com")).await;
    }
    let (_, first) = s.get("/v1.0/users?$top=3&$count=true").await;
    assert_eq!(first["@odata.count"], 7);
    assert!(first["@odata.context"].as_str().unwrap().ends_with("/v1.0/$metadata#users"));
    let mut seen = HashSet::new();
    let mut page = first;
    let mut pages = 0;
    loop {
        pages += 1;
        for u in page["value"].as_array().unwrap() {
            assert!(seen.insert(u["id"].as_str().unwrap().to_string()), "duplicate across pages");
        }
        let Some(next) = page["@odata.nextLink"].as_str() else { break };
        assert!(next.starts_with(&s.url) && next.contains("/v1.0/users?"), "{next}");
        let path = next.strip_prefix(&s.url).unwrap().to_string();
        page = s.get(&path).await.1;
    }
    assert_eq!((seen.len(), pages), (7, 3));
}

#[tokio::test]
async fn test_filter_select_and_unsupported_options() {
    let s = Server::start().await;
    s.user("adele@contoso.com").await;
    s.user("o'brien@contoso.com").await;
    let (status, v) =
        s.get("/v1.0/users?$filter=userPrincipalName%20eq%20'ADELE@contoso.com'&$select=displayName").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let list = v["value"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["displayName"], "adele@contoso.com");
    assert!(list[0].get("userPrincipalName").is_none(), "$select leaves other fields out");
    assert!(list[0].get("id").is_some());
    let (_, v) =
        s.get("/v1.0/users?$filter=userPrincipalName eq 'o''brien@contoso.com' and accountEnabled eq true").await;
    assert_eq!(v["value"].as_array().unwrap().len(), 1, "{v}");

    for (query, words) in [
        ("$orderby=displayName", "$orderby"),
        ("$top=0", "$top"),
        ("$top=abc", "$top"),
        ("$filter=displayName ne 'x'", "ne"),
        ("$filter=nosuchfield eq 'x'", "nosuchfield"),
        ("$skiptoken=zz", "$skiptoken"),
        ("$expand=manager", "$expand"),
    ] {
        let path = if query.starts_with("$expand") {
            format!("{VE}/provisioningPolicies?{query}")
        } else {
            format!("/v1.0/users?{query}")
        };
        let (status, v) = s.get(&path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {v}");
        assert!(message(&v).contains(words), "{query}: {v}");
    }
}
