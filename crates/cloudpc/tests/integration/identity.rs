//! Identity from the organisation's provider: SCIM 2.0 provisioning (the RFC's examples and the
//! sequences Entra ID and Okta send), OpenID Connect sign-in against a real provider (npm
//! `oidc-provider`) in Chromium, provider JWTs on the API, and the effects on Cloud PCs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;
use crate::vm::{browser_test, web_dir};
use crate::vm_support::*;

const USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const GROUP: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const PATCH: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const CLIENT_SECRET: &str = "idp-test-client-secret";

/// A real OpenID Connect provider (web/tests/support/idp.mjs), killed when dropped.
struct Idp {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    accounts: Value,
    redirect: String,
}

impl Idp {
    async fn start(accounts: Value, cloudpc_url: &str) -> Idp {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let redirect = format!("{cloudpc_url}/auth/oidc/callback");
        let child = Self::spawn(port, dir.path(), &accounts, &redirect).await;
        Idp { child, port, dir, accounts, redirect }
    }

    // The child is returned to an `Idp`, whose drop kills and waits for it.
    #[allow(clippy::zombie_processes)]
    async fn spawn(port: u16, dir: &std::path::Path, accounts: &Value, redirect: &str) -> Child {
        let key = dir.join("key.json");
        let _ = std::fs::remove_file(&key);
        let mut child = Command::new("node")
            .arg(web_dir().join("tests/support/idp.mjs"))
            .current_dir(web_dir())
            .env("IDP_PORT", port.to_string())
            .env("IDP_KEY_OUT", &key)
            .env("IDP_CLIENT_ID", "cloudpc")
            .env("IDP_CLIENT_SECRET", CLIENT_SECRET)
            .env("IDP_REDIRECT_URIS", redirect)
            .env("IDP_ACCOUNTS", accounts.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let url = format!("http://127.0.0.1:{port}/.well-known/openid-configuration");
        let start = Instant::now();
        loop {
            if key.exists() && reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                return child;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the test identity provider did not start");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new signing key: the provider restarts on the same address with a fresh key.
    async fn rotate_keys(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, self.dir.path(), &self.accounts, &self.redirect).await;
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Signs `claims` with the provider's current private key, as the provider would.
    fn mint(&self, claims: &Value) -> String {
        let key: Value =
            serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("key.json")).unwrap()).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(key["kid"].as_str().unwrap().to_string());
        let enc = jsonwebtoken::EncodingKey::from_rsa_pem(key["pem"].as_str().unwrap().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &enc).unwrap()
    }

    fn claims(&self, name: &str, groups: &[&str], aud: &str, expires_in: i64) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({"iss": self.issuer(), "sub": name, "aud": aud, "iat": now, "exp": now + expires_in,
               "preferred_username": name, "groups": groups})
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects the provider and issues its SCIM token; returns (provider, SCIM token).
async fn connect(s: &Server, issuer: &str) -> (Value, String) {
    let p = s
        .create(
            "/cloudpc/identityProviders",
            json!({"displayName": "Contoso ID", "issuer": issuer, "clientId": "cloudpc", "clientSecret": CLIENT_SECRET,
                   "scopes": ["profile", "groups"], "administratorGroups": ["cpc-admins"], "readerGroups": ["helpdesk"]}),
        )
        .await;
    assert_eq!(p["hasClientSecret"], true, "{p}");
    assert!(p.get("clientSecret").is_none(), "the secret is never shown: {p}");
    let (status, t) =
        s.post(&format!("/cloudpc/identityProviders/{}/scimToken", p["id"].as_str().unwrap()), json!(null)).await;
    assert_eq!(status, 201, "{t}");
    assert!(t["scimBaseUrl"].as_str().unwrap().ends_with("/scim/v2"), "{t}");
    (p, t["secret"].as_str().unwrap().to_string())
}

/// One SCIM request: (status, body, ETag).
async fn scim(
    s: &Server,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value, Option<String>) {
    let mut req = reqwest::Client::new().request(method, format!("{}/scim/v2{path}", s.url)).bearer_auth(token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/scim+json").body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
    if status != 204 && status != 304 {
        assert!(
            resp.headers()
                .get("content-type")
                .is_some_and(|c| c.to_str().unwrap().starts_with("application/scim+json")),
            "SCIM answers are application/scim+json ({path})"
        );
    }
    let text = resp.text().await.unwrap();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() }, etag)
}

/// The user Entra ID creates (its usual attribute set, booleans as strings).
fn entra_user(upn: &str, external: &str) -> Value {
    json!({
        "schemas": [USER, ENTERPRISE], "externalId": external, "userName": upn, "active": "True",
        "displayName": format!("{upn} display"), "title": "Engineer", "preferredLanguage": "en-US",
        "emails": [{"primary": true, "type": "work", "value": upn}],
        "name": {"formatted": "Given Family", "familyName": "Family", "givenName": "Given"},
        "addresses": [{"type": "work", "country": "NL"}], "roles": [],
        ENTERPRISE: {"department": "Sales", "manager": {"value": "x"}},
    })
}

fn ids(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["userName"].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn test_scim_users_and_groups_follow_the_rfc_and_what_entra_and_okta_send() {
    let s = Server::start().await;
    let (provider, token) = connect(&s, "https://login.contoso.example/tenant").await;

    // Without or with a wrong token: SCIM's error format, nothing else.
    let (st, e, _) = scim(&s, "cpcscim_wrong", Method::GET, "/Users", None, &[]).await;
    assert_eq!(
        (st, e["schemas"][0].as_str(), e["status"].as_str()),
        (401, Some("urn:ietf:params:scim:api:messages:2.0:Error"), Some("401")),
        "{e}"
    );
    let (st, _, _) = scim(&s, crate::support::ADMIN_TOKEN, Method::GET, "/Users", None, &[]).await;
    assert_eq!(st, 401, "an API token is not a SCIM token");

    // Discovery.
    let (st, cfg, _) = scim(&s, &token, Method::GET, "/ServiceProviderConfig", None, &[]).await;
    assert_eq!(
        (st, cfg["patch"]["supported"].clone(), cfg["filter"]["supported"].clone(), cfg["etag"]["supported"].clone()),
        (200, json!(true), json!(true), json!(true))
    );
    let (_, types, _) = scim(&s, &token, Method::GET, "/ResourceTypes", None, &[]).await;
    assert_eq!(types["totalResults"], 2);
    let (st, schema, _) = scim(&s, &token, Method::GET, &format!("/Schemas/{USER}"), None, &[]).await;
    assert_eq!((st, schema["attributes"][0]["name"].as_str()), (200, Some("userName")));

    // Entra's sequence: look the user up by userName, create it, read it back.
    let (_, found, _) =
        scim(&s, &token, Method::GET, "/Users?filter=userName+eq+%22ann%40contoso.com%22", None, &[]).await;
    assert_eq!(found["totalResults"], 0);
    let (st, ann, etag) =
        scim(&s, &token, Method::POST, "/Users", Some(entra_user("ann@contoso.com", "e-ann")), &[]).await;
    assert_eq!(st, 201, "{ann}");
    let ann_id = ann["id"].as_str().unwrap().to_string();
    assert_eq!(
        (ann["active"].clone(), ann["name"]["givenName"].clone(), ann["externalId"].clone()),
        (json!(true), json!("Given"), json!("e-ann"))
    );
    assert_eq!(ann["meta"]["version"].as_str(), etag.as_deref());
    let graph = s.get(&format!("/v1.0/users/{ann_id}")).await.1;
    assert_eq!(
        (graph["userPrincipalName"].as_str(), graph["identityProviderId"].as_str(), graph["surname"].as_str()),
        (Some("ann@contoso.com"), provider["id"].as_str(), Some("Family")),
        "a SCIM user is a directory user that remembers its provider: {graph}"
    );
    for (upn, ext) in [("bob@contoso.com", "e-bob"), ("cara@fabrikam.com", "e-cara"), ("dan@contoso.com", "e-dan")] {
        assert_eq!(scim(&s, &token, Method::POST, "/Users", Some(entra_user(upn, ext)), &[]).await.0, 201);
    }
    let (st, dup, _) = scim(&s, &token, Method::POST, "/Users", Some(entra_user("ANN@contoso.com", "e-x")), &[]).await;
    assert_eq!((st, dup["scimType"].as_str()), (409, Some("uniqueness")), "{dup}");

    // Filters, pages, attributes (RFC 7644 §3.4.2).
    let q = |f: &str| format!("/Users?filter={}", url_encode(f));
    for (filter, want) in [
        (r#"userName eq "ANN@contoso.com""#, vec!["ann@contoso.com"]),
        (r#"userName co "fabrikam""#, vec!["cara@fabrikam.com"]),
        (r#"userName sw "b" or userName ew "fabrikam.com""#, vec!["bob@contoso.com", "cara@fabrikam.com"]),
        (r#"externalId eq "e-dan" and active eq true"#, vec!["dan@contoso.com"]),
        (r#"not (userName co "contoso") and emails[type eq "work"]"#, vec!["cara@fabrikam.com"]),
        (
            r#"userName ne "ann@contoso.com" and (userName lt "c" or userName ge "dan")"#,
            vec!["bob@contoso.com", "dan@contoso.com"],
        ),
        (r#"name.familyName pr and userName gt "c""#, vec!["cara@fabrikam.com", "dan@contoso.com"]),
        (r#"meta.created ge "2000-01-01T00:00:00Z" and userName le "ann@contoso.com""#, vec!["ann@contoso.com"]),
    ] {
        let (st, list, _) = scim(&s, &token, Method::GET, &q(filter), None, &[]).await;
        assert_eq!(st, 200, "{filter}: {list}");
        assert_eq!(ids(&list), want, "{filter}");
    }
    let (st, bad, _) = scim(&s, &token, Method::GET, &q(r#"userName eq"#), None, &[]).await;
    assert_eq!((st, bad["scimType"].as_str()), (400, Some("invalidFilter")), "{bad}");
    assert!(bad["detail"].as_str().unwrap().contains("expected a value"), "{bad}");
    let (_, page2, _) =
        scim(&s, &token, Method::GET, "/Users?startIndex=2&count=2&attributes=userName", None, &[]).await;
    assert_eq!(
        (page2["totalResults"].clone(), page2["startIndex"].clone(), page2["itemsPerPage"].clone()),
        (json!(4), json!(2), json!(2))
    );
    let first = &page2["Resources"][0];
    assert!(first.get("userName").is_some() && first.get("id").is_some() && first.get("emails").is_none(), "{first}");
    let (_, lean, _) = scim(&s, &token, Method::GET, "/Users?excludedAttributes=emails,name&count=1", None, &[]).await;
    let lean = &lean["Resources"][0];
    assert!(lean.get("emails").is_none() && lean.get("name").is_none() && lean.get("userName").is_some(), "{lean}");
    let (st, _, _) = scim(&s, &token, Method::GET, "/Users?count=many", None, &[]).await;
    assert_eq!(st, 400);

    // ETags: If-None-Match answers 304; a stale If-Match is refused with 412 and changes nothing.
    let (st, _, _) = scim(
        &s,
        &token,
        Method::GET,
        &format!("/Users/{ann_id}"),
        None,
        &[("if-none-match", etag.as_deref().unwrap())],
    )
    .await;
    assert_eq!(st, 304);
    let entra_patch = json!({"schemas": [PATCH], "Operations": [
        {"op": "Replace", "path": "displayName", "value": "Ann Example"},
        {"op": "Add", "value": {"name.givenName": "Ann"}},
        {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "ann.example@contoso.com"},
        {"op": "Replace", "path": format!("{ENTERPRISE}:department"), "value": "R&D"},
    ]});
    let (st, _, _) = scim(
        &s,
        &token,
        Method::PATCH,
        &format!("/Users/{ann_id}"),
        Some(entra_patch.clone()),
        &[("if-match", "W/\"999\"")],
    )
    .await;
    assert_eq!(st, 412);
    let (st, ann, etag2) = scim(
        &s,
        &token,
        Method::PATCH,
        &format!("/Users/{ann_id}"),
        Some(entra_patch),
        &[("if-match", etag.as_deref().unwrap())],
    )
    .await;
    assert_eq!(st, 200, "{ann}");
    assert_eq!(
        (ann["displayName"].as_str(), ann["name"]["givenName"].as_str(), ann["emails"][0]["value"].as_str()),
        (Some("Ann Example"), Some("Ann"), Some("ann.example@contoso.com"))
    );
    assert_ne!(etag, etag2, "a change makes a new version");

    // Bad input is refused with the SCIM error and changes nothing.
    let before = s.get(&format!("/v1.0/users/{ann_id}")).await.1;
    for (body, scim_type) in [
        (r#"{"schemas": ["#, "invalidSyntax"),
        (
            &*json!({"schemas": [PATCH], "Operations": [{"op": "Replace", "path": "active", "value": "maybe"}]})
                .to_string(),
            "invalidValue",
        ),
        (
            &*json!({"schemas": [PATCH], "Operations": [{"op": "Replace", "path": "userName", "value": "not a name"}]})
                .to_string(),
            "invalidValue",
        ),
        (
            &*json!({"schemas": [PATCH], "Operations": [{"op": "Replace", "path": "emails[type eq", "value": "x"}]})
                .to_string(),
            "invalidPath",
        ),
        (
            &*json!({"schemas": [PATCH], "Operations": [{"op": "Move", "path": "userName", "value": "x"}]}).to_string(),
            "invalidSyntax",
        ),
        (&*json!({"Operations": []}).to_string(), "invalidSyntax"),
    ] {
        let resp = reqwest::Client::new()
            .patch(format!("{}/scim/v2/Users/{ann_id}", s.url))
            .bearer_auth(&token)
            .header("content-type", "application/scim+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["scimType"].as_str(), Some(scim_type), "{body}: {e}");
    }
    assert_eq!(s.get(&format!("/v1.0/users/{ann_id}")).await.1, before, "refused patches changed nothing");

    // Groups: created with a member, then Entra's and Okta's membership patches, and a PUT.
    let id_of = |upn: &str| {
        let s = &s;
        let upn = upn.to_string();
        async move { s.get(&format!("/v1.0/users/{upn}")).await.1["id"].as_str().unwrap().to_string() }
    };
    let (bob, cara, dan) =
        (id_of("bob@contoso.com").await, id_of("cara@fabrikam.com").await, id_of("dan@contoso.com").await);
    let (st, g, _) = scim(&s, &token, Method::POST, "/Groups", Some(json!({"schemas": [GROUP], "displayName": "Sales", "externalId": "g-sales", "members": [{"value": ann_id}]})), &[]).await;
    assert_eq!(st, 201, "{g}");
    let gid = g["id"].as_str().unwrap().to_string();
    assert_eq!(members(&s, &gid).await, vec!["ann@contoso.com"]);
    let entra = json!({"schemas": [PATCH], "Operations": [{"op": "Add", "path": "members", "value": [{"value": bob}, {"value": cara}]}]});
    assert_eq!(scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(entra), &[]).await.0, 200);
    assert_eq!(members(&s, &gid).await, vec!["ann@contoso.com", "bob@contoso.com", "cara@fabrikam.com"]);
    let rfc_remove = json!({"schemas": [PATCH], "Operations": [{"op": "remove", "path": format!("members[value eq \"{ann_id}\"]")}]});
    assert_eq!(scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(rfc_remove), &[]).await.0, 200);
    let entra_remove =
        json!({"schemas": [PATCH], "Operations": [{"op": "Remove", "path": "members", "value": [{"value": bob}]}]});
    assert_eq!(scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(entra_remove), &[]).await.0, 200);
    assert_eq!(members(&s, &gid).await, vec!["cara@fabrikam.com"]);
    let okta = json!({"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"id": gid, "displayName": "Sales EMEA"}}]});
    let (_, g, _) = scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(okta), &[]).await;
    assert_eq!(g["displayName"], "Sales EMEA");
    let put = json!({"schemas": [GROUP], "displayName": "Sales EMEA", "members": [{"value": dan}, {"value": bob}]});
    assert_eq!(scim(&s, &token, Method::PUT, &format!("/Groups/{gid}"), Some(put), &[]).await.0, 200);
    assert_eq!(members(&s, &gid).await, vec!["bob@contoso.com", "dan@contoso.com"]);
    let (_, filtered, _) = scim(
        &s,
        &token,
        Method::GET,
        &format!("/Groups?filter={}", url_encode(&format!(r#"members[value eq "{dan}"]"#))),
        None,
        &[],
    )
    .await;
    assert_eq!(filtered["totalResults"], 1, "{filtered}");
    let unknown = json!({"schemas": [PATCH], "Operations": [{"op": "add", "path": "members", "value": [{"value": uuid::Uuid::new_v4().to_string()}]}]});
    let (st, e, _) = scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(unknown), &[]).await;
    assert_eq!((st, e["scimType"].as_str()), (400, Some("invalidValue")), "{e}");
    assert_eq!(members(&s, &gid).await, vec!["bob@contoso.com", "dan@contoso.com"], "nothing changed");

    // What the provider manages is changed only through it.
    let (st, e) = s.patch(&format!("/v1.0/users/{ann_id}"), json!({"displayName": "local edit"})).await;
    assert_eq!(st, 409);
    assert!(message(&e).contains("managed by the identity provider 'Contoso ID'"), "{e}");
    let (st, e) = s.add_member(&json!({"id": gid}), &json!({"id": ann_id})).await;
    assert_eq!(st, 409, "{e}");

    // A SCIM token reaches only what its provider manages: local users are invisible to it.
    let local = s.user("local@contoso.com").await;
    let local_id = local["id"].as_str().unwrap();
    let (_, found, _) = scim(&s, &token, Method::GET, &q(r#"userName eq "local@contoso.com""#), None, &[]).await;
    assert_eq!(found["totalResults"], 0);
    let (_, all, _) = scim(&s, &token, Method::GET, "/Users", None, &[]).await;
    assert_eq!(all["totalResults"], 4, "only the provider's own users");
    let off = json!({"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": false}}]});
    assert_eq!(scim(&s, &token, Method::PATCH, &format!("/Users/{local_id}"), Some(off), &[]).await.0, 404);
    assert_eq!(scim(&s, &token, Method::DELETE, &format!("/Users/{local_id}"), None, &[]).await.0, 404);
    let take =
        json!({"schemas": [PATCH], "Operations": [{"op": "add", "path": "members", "value": [{"value": local_id}]}]});
    let (st, e, _) = scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(take), &[]).await;
    assert_eq!(st, 400, "{e}");
    assert!(e["detail"].as_str().unwrap().contains("not a user this provider manages"), "{e}");
    assert_eq!(s.get(&format!("/v1.0/users/{local_id}")).await.1["accountEnabled"], true);

    // Okta deactivates with a path-less replace; deletion removes.
    let okta_off = json!({"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": false}}]});
    let (_, u, _) = scim(&s, &token, Method::PATCH, &format!("/Users/{dan}"), Some(okta_off), &[]).await;
    assert_eq!(u["active"], false);
    assert_eq!(s.get(&format!("/v1.0/users/{dan}")).await.1["accountEnabled"], false);
    assert_eq!(scim(&s, &token, Method::DELETE, &format!("/Users/{dan}"), None, &[]).await.0, 204);
    assert_eq!(scim(&s, &token, Method::GET, &format!("/Users/{dan}"), None, &[]).await.0, 404);
    assert_eq!(scim(&s, &token, Method::DELETE, &format!("/Groups/{gid}"), None, &[]).await.0, 204);

    // Every change is audited with the provider as the actor.
    let (_, audit) = s.get("/v1.0/deviceManagement/virtualEndpoint/auditEvents").await;
    let by_provider: Vec<&str> = audit["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["actor"]["userPrincipalName"].as_str() == Some("Contoso ID (SCIM)")
                || e["actor"]["applicationDisplayName"].as_str() == Some("Contoso ID (SCIM)")
        })
        .map(|e| e["activity"].as_str().unwrap())
        .collect();
    for a in [
        "Create User",
        "Update User",
        "Delete User",
        "Create Group",
        "Add member to Group",
        "Remove member from Group",
        "Delete Group",
    ] {
        assert!(by_provider.contains(&a), "{a} by the provider in {by_provider:?}");
    }

    // A new token replaces the old one.
    let (_, t2) = s
        .post(&format!("/cloudpc/identityProviders/{}/scimToken", provider["id"].as_str().unwrap()), json!(null))
        .await;
    assert_eq!(scim(&s, &token, Method::GET, "/Users", None, &[]).await.0, 401);
    assert_eq!(scim(&s, t2["secret"].as_str().unwrap(), Method::GET, "/Users", None, &[]).await.0, 200);

    // Disconnecting the provider leaves its users as local ones that admins manage from then on.
    let (st, e) = s.delete(&format!("/cloudpc/identityProviders/{}", provider["id"].as_str().unwrap())).await;
    assert_eq!(st, 204, "{e}");
    let (st, e) = s.patch(&format!("/v1.0/users/{ann_id}"), json!({"displayName": "now local"})).await;
    assert_eq!(st, 204, "{e}");
    let (_, e) = s.get(&format!("/v1.0/users/{ann_id}")).await;
    assert_eq!(e["displayName"], "now local");
    assert!(e.get("identityProviderId").is_none(), "{e}");
    assert_eq!(scim(&s, t2["secret"].as_str().unwrap(), Method::GET, "/Users", None, &[]).await.0, 401);
}

/// Whether a response starts a session: any cookie but the sign-in cookie being cleared.
fn sets_session(resp: &reqwest::Response) -> bool {
    resp.headers().get_all("set-cookie").iter().any(|c| !c.to_str().unwrap().starts_with("cloudpc_oidc="))
}

async fn members(s: &Server, gid: &str) -> Vec<String> {
    let (_, v) = s.get(&format!("/v1.0/groups/{gid}/members")).await;
    let mut v: Vec<String> =
        v["value"].as_array().unwrap().iter().map(|u| u["userPrincipalName"].as_str().unwrap().to_string()).collect();
    v.sort();
    v
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn dist() -> PathBuf {
    web_dir().join("dist")
}

fn accounts() -> Value {
    json!({
        "alice": {"upn": "alice@contoso.com", "groups": ["staff"]},
        "ada": {"upn": "ada@contoso.com", "groups": ["staff", "cpc-admins"]},
        "rita": {"upn": "rita@contoso.com", "groups": ["helpdesk"]},
        "bob": {"upn": "bob@contoso.com", "groups": ["staff"]},
    })
}

/// Sign-in in Chromium through a real provider for the portal and the console (roles from its
/// groups), refusals audited with the reason; the provider's JWTs on the API, checked for
/// signature, expiry and audience, and its rotated keys picked up.
#[tokio::test]
async fn test_oidc_sign_in_in_chromium_roles_from_groups_and_provider_tokens_checked() {
    let s = Server::start_with(&["--web-dir", dist().to_str().unwrap()], Some(crate::support::ADMIN_TOKEN)).await;
    let mut idp = Idp::start(accounts(), &s.url).await;
    let (provider, scim_token) = connect(&s, &idp.issuer()).await;
    assert_eq!(
        scim(&s, &scim_token, Method::POST, "/Users", Some(entra_user("alice@contoso.com", "e-alice")), &[]).await.0,
        201
    );

    let steps = json!([
        {"page": "portal", "login": "alice", "expect": "My Cloud PCs"},
        {"page": "console", "login": "ada", "expect": "Cloud PC Administrator", "identityPage": true},
        {"page": "console", "login": "rita", "expect": "Cloud PC Reader (read only)", "signOut": true},
        {"page": "console", "login": "alice", "expect": "none of the provider's groups", "absent": "Sign out"},
        {"page": "portal", "login": "bob", "expect": "is not a cloudpc user"},
    ]);
    let out = browser_test(
        "oidc.mjs",
        &[("CLOUDPC_URL", &s.url), ("PROVIDER", "Contoso ID"), ("STEPS", &steps.to_string())],
        "oidc-sign-in.png",
    )
    .await;
    println!("{out}");

    // The sign-ins and the refusals, with their reasons, are in the audit log.
    let (_, audit) = s.get("/v1.0/deviceManagement/virtualEndpoint/auditEvents").await;
    let events = audit["value"].as_array().unwrap();
    let reason = |who: &str| {
        events
            .iter()
            .find(|e| e["activity"] == "Sign in failed User" && e["resources"][0]["displayName"] == who)
            .map(|e| e.to_string())
    };
    assert!(reason("alice@contoso.com").is_some_and(|e| e.contains("none of the provider")), "{events:?}");
    assert!(reason("bob@contoso.com").is_some_and(|e| e.contains("not a cloudpc user")));
    assert!(events
        .iter()
        .any(|e| e["activity"] == "Sign in User" && e.to_string().contains("signed in through Contoso ID")));
    let (_, p) = s.get(&format!("/cloudpc/identityProviders/{}", provider["id"].as_str().unwrap())).await;
    assert_eq!(p["hasScimToken"], true);
    assert_eq!(
        scim(&s, &scim_token, Method::GET, "/Users", None, &[]).await.0,
        401,
        "the console issued a new SCIM token"
    );
    let (_, tokens) = s.get("/cloudpc/tokens").await;
    assert!(
        tokens["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["displayName"] == "ada@contoso.com (signed in through Contoso ID)"
                && t["role"] == "cloudPcAdministrator"
                && !t["expirationDateTime"].is_null()),
        "{tokens}"
    );
    // Ada's token expires, so it does not count as another administrator token for good.
    let lasting = tokens["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "cloudPcAdministrator" && t["expirationDateTime"].is_null())
        .unwrap();
    let (st, e) = s.delete(&format!("/cloudpc/tokens/{}", lasting["id"].as_str().unwrap())).await;
    assert_eq!(st, 409, "{e}");

    // A callback with an unknown (or replayed) state signs no one in.
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = no_redirects.get(format!("{}/auth/oidc/callback?state=forged&code=abc", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    let to = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(to.starts_with("/?signInError=") && to.contains("unknown"), "{to}");
    assert!(!sets_session(&resp), "no session for a forged state");
    let (st, _) = s.raw(Method::GET, "/auth/oidc/00000000-0000-0000-0000-000000000000/start", None, None, None).await;
    assert_eq!(st, 404, "an unknown provider");

    // The provider's JWTs on the API: the role from the groups claim.
    let admin = idp.mint(&idp.claims("ops@contoso.com", &["cpc-admins"], "cloudpc", 300));
    assert_eq!(s.call_as(&admin, Method::GET, "/v1.0/users", None).await.0, 200);
    let (st, _) =
        s.call_as(&admin, Method::POST, "/v1.0/groups", Some(json!({"displayName": "made by a provider token"}))).await;
    assert_eq!(st, 201);
    let reader = idp.mint(&idp.claims("rita@contoso.com", &["helpdesk"], "cloudpc", 300));
    assert_eq!(s.call_as(&reader, Method::GET, "/v1.0/users", None).await.0, 200);
    assert_eq!(s.call_as(&reader, Method::POST, "/v1.0/groups", Some(json!({"displayName": "x"}))).await.0, 403);
    let nobody = idp.mint(&idp.claims("alice@contoso.com", &["staff"], "cloudpc", 300));
    assert_eq!(s.call_as(&nobody, Method::GET, "/v1.0/users", None).await.0, 403);
    let refused = |token: String, says: &'static str| {
        let s = &s;
        async move {
            let (st, e) = s.call_as(&token, Method::GET, "/v1.0/users", None).await;
            assert_eq!(st, 401, "{e}");
            assert!(message(&e).contains(says), "{says}: {e}");
        }
    };
    refused(idp.mint(&idp.claims("ops@contoso.com", &["cpc-admins"], "cloudpc", -600)), "expired").await;
    refused(idp.mint(&idp.claims("ops@contoso.com", &["cpc-admins"], "someone-else", 300)), "audience").await;
    let mut id_token = idp.claims("ops@contoso.com", &["cpc-admins"], "cloudpc", 300);
    id_token["nonce"] = json!("n-0S6_WzA2Mj");
    refused(idp.mint(&id_token), "not an access token").await;
    // Tampered: the payload says cpc-admins, the signature was made for staff.
    let honest = idp.mint(&idp.claims("alice@contoso.com", &["staff"], "cloudpc", 300));
    let forged_payload = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(idp.claims("alice@contoso.com", &["cpc-admins"], "cloudpc", 300).to_string())
    };
    let parts: Vec<&str> = honest.split('.').collect();
    refused(format!("{}.{forged_payload}.{}", parts[0], parts[2]), "signature").await;
    let mut unknown_issuer = idp.claims("ops@contoso.com", &["cpc-admins"], "cloudpc", 300);
    unknown_issuer["iss"] = json!("http://127.0.0.1:1");
    refused(idp.mint(&unknown_issuer), "not a configured identity provider").await;

    // Key rotation: the provider now signs with a new key; cloudpc fetches its keys again.
    let old = idp.mint(&idp.claims("ops@contoso.com", &["cpc-admins"], "cloudpc", 300));
    idp.rotate_keys().await;
    let new = idp.mint(&idp.claims("ops@contoso.com", &["cpc-admins"], "cloudpc", 300));
    assert_ne!(old.split('.').next(), new.split('.').next(), "a new key id");
    let start = Instant::now();
    loop {
        let (st, e) = s.call_as(&new, Method::GET, "/v1.0/users", None).await;
        if st == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "a token signed with the rotated key was not accepted: {e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("rotated key accepted after {:?}", start.elapsed());
    refused(old, "does not publish").await;

    // Local passwords can be switched off; the provider still signs people in.
    let (st, _) = s
        .patch(&format!("/cloudpc/identityProviders/{}", provider["id"].as_str().unwrap()), json!({"readerGroups": []}))
        .await;
    assert_eq!(st, 200);
    let reader = idp.mint(&idp.claims("rita@contoso.com", &["helpdesk"], "cloudpc", 300));
    assert_eq!(s.call_as(&reader, Method::GET, "/v1.0/users", None).await.0, 403, "roles follow the provider settings");
    drop(s);
    let s = Server::start_with(&["--no-local-sign-in"], Some(crate::support::ADMIN_TOKEN)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/portal/api/signIn", s.url))
        .header("x-cloudpc-portal", "1")
        .json(&json!({"userPrincipalName": "a@b.c", "password": "Xx-123456"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let e: Value = resp.json().await.unwrap();
    assert!(message(&e).contains("local accounts are switched off"), "{e}");
    assert_eq!(s.raw(Method::GET, "/auth/signInOptions", None, None, None).await.1["localAccounts"], false);
}

/// The directory follows the provider end to end: a user added through SCIM to a group a policy
/// targets gets a real Cloud PC; they sign in through the provider and see it; deactivated
/// through SCIM, their session ends at once and the Cloud PC enters its grace period.
#[tokio::test]
async fn test_vm_scim_member_gets_a_cloud_pc_and_deactivation_ends_access_and_starts_grace() {
    let _turn = vm_turn().await;
    let s = VmServer::start(&["--web-dir", dist().to_str().unwrap()]).await;
    let idp = Idp::start(accounts(), &s.url).await;
    let (_, token) = connect(&s, &idp.issuer()).await;
    let (_, group, _) = scim(
        &s,
        &token,
        Method::POST,
        "/Groups",
        Some(json!({"schemas": [GROUP], "displayName": "Cloud PC users"})),
        &[],
    )
    .await;
    let gid = group["id"].as_str().unwrap().to_string();
    let sku = s.tiny_sku("TINY", 1, 1, 1).await;
    let (st, e) = s
        .post(
            &format!("/v1.0/groups/{gid}/assignLicense"),
            json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []}),
        )
        .await;
    assert!(st.is_success(), "{e}");
    let policy = s.tiny_policy("SCIM policy", json!({})).await;
    s.assign(&policy, &[&json!({"id": gid})]).await;
    let (_, alice, _) =
        scim(&s, &token, Method::POST, "/Users", Some(entra_user("alice@contoso.com", "e-alice")), &[]).await;
    let alice_id = alice["id"].as_str().unwrap().to_string();
    assert!(s.cloud_pcs().await.is_empty(), "not in the group yet");

    // Entra adds her to the group: provisioning starts within seconds, without any sign-in.
    let add =
        json!({"schemas": [PATCH], "Operations": [{"op": "Add", "path": "members", "value": [{"value": alice_id}]}]});
    let t = Instant::now();
    assert_eq!(scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(add), &[]).await.0, 200);
    let started = loop {
        if !s.cloud_pcs().await.is_empty() {
            break t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no Cloud PC 10 s after the membership change");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("SCIM membership change → provisioning started in {started:?}");
    let pcs = s.wait_all(1, &["provisioned"], Duration::from_secs(150)).await;
    let device = pcs[0]["managedDeviceName"].as_str().unwrap().to_string();

    // She signs in through the provider and sees it; then Entra deactivates her.
    let steps = json!([{"page": "portal", "login": "alice", "expect": device,
        "thenDeactivate": {"scimUrl": format!("{}/scim/v2/Users/{alice_id}", s.url), "token": token}, "afterwards": "Sign in with Contoso ID"}]);
    let out = browser_test(
        "oidc.mjs",
        &[("CLOUDPC_URL", &s.url), ("PROVIDER", "Contoso ID"), ("STEPS", &steps.to_string())],
        "oidc-scim-portal.png",
    )
    .await;
    println!("{out}");
    assert!(out.contains("deactivated; the portal shows"), "{out}");

    let t = Instant::now();
    loop {
        let pc = &s.cloud_pcs().await[0];
        if pc["status"] == "inGracePeriod" {
            println!("deactivated → inGracePeriod in {:?}", t.elapsed());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "not in grace period after deactivation: {pc}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CLI connects a provider (the client secret from the environment, never on the command
/// line), issues its SCIM token that then works, lists and removes it.
#[tokio::test]
async fn test_cli_connects_an_identity_provider_and_issues_its_scim_token() {
    let s = Server::start().await;
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(bin());
        cmd.args(args).env("CLOUDPC_URL", &s.url).env("CLOUDPC_TOKEN", crate::support::ADMIN_TOKEN);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(
        &[
            "identity-providers",
            "add",
            "--name",
            "Okta",
            "--issuer",
            "https://contoso.okta.example",
            "--client-id",
            "0oa1",
            "--client-secret-env",
            "OKTA_SECRET",
            "--admin-group",
            "cpc-admins",
            "--reader-group",
            "helpdesk",
            "--output",
            "json",
        ],
        &[("OKTA_SECRET", "s3cret-value")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((p["hasClientSecret"].clone(), p["administratorGroups"].clone()), (json!(true), json!(["cpc-admins"])));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret-value"));
    let out = run(
        &[
            "identity-providers",
            "add",
            "--name",
            "X",
            "--issuer",
            "https://x.example",
            "--client-id",
            "c",
            "--client-secret-env",
            "UNSET_VAR_X",
        ],
        &[],
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("UNSET_VAR_X"));
    let out = run(&["identity-providers", "scim-token", "okta"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/scim/v2"));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(scim(&s, &token, Method::GET, "/Users", None, &[]).await.0, 200);
    let out = run(&["identity-providers", "list"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("https://contoso.okta.example"));
    assert!(run(&["identity-providers", "delete", "Okta"], &[]).status.success());
    assert_eq!(scim(&s, &token, Method::GET, "/Users", None, &[]).await.0, 401, "its token went with it");
}

/// Follows the provider's redirects and fills its login form as a browser would, without one;
/// returns the callback URL the provider sends the browser back to.
async fn provider_login(http: &reqwest::Client, idp: &Idp, start: &str, login: &str) -> String {
    let absolute = |l: &str| if l.starts_with("http") { l.to_string() } else { format!("{}{l}", idp.issuer()) };
    let resp = http.get(start).send().await.unwrap();
    assert_eq!(resp.status(), 303, "start redirects to the provider");
    let mut next = absolute(resp.headers()["location"].to_str().unwrap());
    for _ in 0..10 {
        if next.contains("/auth/oidc/callback") {
            return next;
        }
        let resp = http.get(&next).send().await.unwrap();
        if resp.status().is_redirection() {
            next = absolute(resp.headers()["location"].to_str().unwrap());
            continue;
        }
        // The provider's login form: post the account's login to its action.
        let html = resp.text().await.unwrap();
        let action =
            html.split("action=\"").nth(1).and_then(|r| r.split('"').next()).expect("a login form").to_string();
        let resp = http
            .post(absolute(&action))
            .form(&[("prompt", "login"), ("login", login), ("password", "any")])
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_redirection(), "login accepted");
        next = absolute(resp.headers()["location"].to_str().unwrap());
    }
    panic!("the provider did not send the browser back to cloudpc");
}

/// A sign-in begun on one replica finishes on another (state, nonce and verifier live in the
/// database), the session works on both, and the state cannot be used twice.
#[tokio::test]
async fn test_oidc_sign_in_started_on_one_replica_finishes_on_another() {
    let a = Server::start_in(postgres_data_dir(), &[], Some(crate::support::ADMIN_TOKEN)).await;
    let b = a.start_replica(&[]).await;
    let idp = Idp::start(accounts(), &a.url).await;
    let (provider, token) = connect(&a, &idp.issuer()).await;
    assert_eq!(
        scim(&b, &token, Method::POST, "/Users", Some(entra_user("alice@contoso.com", "e-alice")), &[]).await.0,
        201
    );
    let http =
        reqwest::Client::builder().cookie_store(true).redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let start = format!("{}/auth/oidc/{}/start?target=portal", a.url, provider["id"].as_str().unwrap());
    let back = provider_login(&http, &idp, &start, "alice").await;
    assert!(back.starts_with(&a.url), "{back}");
    assert!(back.contains("iss="), "the provider names itself in its response (RFC 9207): {back}");
    let on_b = back.replacen(&a.url, &b.url, 1);
    let resp = http.get(&on_b).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/", "signed in on the other replica");
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string())
        .find(|c| !c.starts_with("cloudpc_oidc="))
        .expect("a session cookie");
    for s in [&a, &b] {
        let me = reqwest::Client::new()
            .get(format!("{}/portal/api/me", s.url))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), 200);
        assert_eq!(me.json::<Value>().await.unwrap()["userPrincipalName"], "alice@contoso.com");
    }
    // A response naming another issuer (a mix-up) signs no one in, even with a fresh state.
    let back2 = provider_login(&http, &idp, &start, "alice").await;
    let iss = format!("iss={}", url_encode(&idp.issuer()));
    assert!(back2.contains(&iss), "{back2}");
    let mixed = back2.replace(&iss, "iss=https%3A%2F%2Fevil.example");
    let resp = http.get(&mixed).send().await.unwrap();
    let to = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(to.contains("another+identity+provider") && !sets_session(&resp), "{to}");
    // Login CSRF: a callback opened in a browser that did not start the sign-in is refused.
    let back3 = provider_login(&http, &idp, &start, "alice").await;
    let victim = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = victim.get(&back3).send().await.unwrap();
    let to = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(to.contains("did+not+start") && !sets_session(&resp), "{to}");
    let again = http.get(&back).send().await.unwrap();
    let to = again.headers()["location"].to_str().unwrap().to_string();
    assert!(to.contains("signInError") && !sets_session(&again), "a used state signs no one in: {to}");
}
