//! Network connections (`onPremisesConnections`): the resource's rules, and the domain password
//! that is never shown, never audited and never stored in the clear, on either backend.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

const NC: &str = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections";
const PASSWORD: &str = "J0in!Pass-cpc-4f2a9";

fn corp() -> Value {
    json!({
        "displayName": "Contoso HQ",
        "connectionType": "hybridAzureADJoin",
        "adDomainName": "corp.cloudpc.test",
        "adDomainUsername": "cpcjoin",
        "adDomainPassword": PASSWORD,
        "organizationalUnit": "OU=CloudPCs,DC=corp,DC=cloudpc,DC=test",
        "bridgeName": "cpcorg0",
        "vlanId": 120
    })
}

/// Every stored byte of the server's database, as text: the SQLite files, or every row of every
/// table of the PostgreSQL database.
async fn stored_text(s: &Server) -> String {
    match s.database_url() {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let tables: Vec<(String,)> =
                sqlx::query_as("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let mut all = String::new();
            for (t,) in tables {
                let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT row_to_json(x)::text FROM \"{t}\" x"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                rows.into_iter().for_each(|(r,)| all.push_str(&r));
            }
            all
        }
        None => files_under(s.data.path())
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cloudpc.db")))
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
            .collect(),
    }
}

#[tokio::test]
async fn test_network_connections_keep_graphs_rules_and_never_show_or_store_the_password() {
    let s = Server::start().await;
    let c = s.create(NC, corp()).await;
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(c["healthCheckStatus"], "pending", "{c}");
    assert_eq!(c["inUse"], false);
    assert_eq!(c["hasAdDomainPassword"], true);
    assert_eq!(c["bridgeName"], "cpcorg0");
    assert!(!c.to_string().contains(PASSWORD), "{c}");

    // Read back, listed, and the password nowhere: not in answers, the audit log, or the database.
    let (_, got) = s.get(&format!("{NC}/{id}")).await;
    assert_eq!(got["adDomainName"], "corp.cloudpc.test");
    let (_, list) = s.get(NC).await;
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    let (_, audit) = s.get(&format!("{VE}/auditEvents?$top=999")).await;
    assert!(audit.to_string().contains("Create OnPremisesConnection"), "{audit}");
    assert!(!audit.to_string().contains(PASSWORD) && !list.to_string().contains(PASSWORD));
    let stored = stored_text(&s).await;
    assert!(stored.contains("corp.cloudpc.test"), "the search does see the database");
    assert!(!stored.contains(PASSWORD), "the domain password is stored in the clear");
    let key = std::fs::metadata(s.data.path().join("secrets.key")).expect("the sealing key is made on first use");
    assert_eq!(key.len(), 32);

    // Rules that need no policy: unique names, join type fixed, fields that fit the join type.
    let (st, e) =
        s.post(NC, json!({"displayName": "contoso hq", "bridgeName": "br0", "connectionType": "azureADJoin"})).await;
    assert_eq!(st, 409, "{e}");
    let (st, e) = s.patch(&format!("{NC}/{id}"), json!({"connectionType": "azureADJoin"})).await;
    assert_eq!(st, 400, "{e}");
    assert!(message(&e).contains("connectionType"), "{e}");
    for (body, field) in [
        (json!({"displayName": "x", "bridgeName": "br0"}), "adDomainName"),
        (
            json!({"displayName": "x", "bridgeName": "br0", "adDomainName": "corp.cloudpc.test", "adDomainUsername": "j"}),
            "adDomainPassword",
        ),
        (
            json!({"displayName": "x", "bridgeName": "br0", "adDomainName": "corp", "adDomainUsername": "j", "adDomainPassword": "p"}),
            "adDomainName",
        ),
        (
            json!({"displayName": "x", "bridgeName": "br0", "adDomainName": "corp.cloudpc.test", "adDomainUsername": "j", "adDomainPassword": "p", "organizationalUnit": "OU=X,DC=other,DC=test"}),
            "organizationalUnit",
        ),
        (json!({"displayName": "x", "bridgeName": "a-bridge-name-too-long"}), "bridgeName"),
        (json!({"displayName": "x", "bridgeName": "br0", "connectionType": "azureADJoin", "vlanId": 4095}), "vlanId"),
        (
            json!({"displayName": "x", "bridgeName": "br0", "connectionType": "azureADJoin", "adDomainName": "corp.cloudpc.test"}),
            "connectionType",
        ),
    ] {
        let before = s.get(NC).await.1["value"].as_array().unwrap().len();
        let (st, e) = s.post(NC, body.clone()).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert!(message(&e).contains(field), "{body}: {e}");
        assert_eq!(s.get(NC).await.1["value"].as_array().unwrap().len(), before, "nothing stored");
    }

    // A new password replaces the old one, sealed too; a change makes the checks pending again.
    let (st, e) = s.patch(&format!("{NC}/{id}"), json!({"adDomainPassword": "N3w!Pass-cpc-77", "vlanId": 121})).await;
    assert_eq!(st, 204, "{e}");
    let (_, got) = s.get(&format!("{NC}/{id}")).await;
    assert_eq!(got["vlanId"], 121);
    assert!(!stored_text(&s).await.contains("N3w!Pass-cpc-77"));
    let (_, audit) = s.get(&format!("{VE}/auditEvents?$top=999")).await;
    assert!(!audit.to_string().contains("N3w!Pass"), "{audit}");

    // Readers read, and only read.
    let reader = s.reader_token().await;
    assert_eq!(s.call_as(&reader, Method::GET, NC, None).await.0, 200);
    let (st, _) = s.call_as(&reader, Method::PATCH, &format!("{NC}/{id}"), Some(json!({"displayName": "r"}))).await;
    assert_eq!(st, 403);

    // The hosted kind: no domain, a bridge only.
    let hosted = s
        .create(NC, json!({"displayName": "Branch", "connectionType": "azureADJoin", "bridgeName": "br-branch", "regionName": "west"}))
        .await;
    assert_eq!(hosted["hasAdDomainPassword"], false);
    assert_eq!(hosted["regionName"], "west");

    let (st, _) = s.delete(&format!("{NC}/{id}")).await;
    assert_eq!(st, 204);
    let (st, _) = s.get(&format!("{NC}/{id}")).await;
    assert_eq!(st, 404);
    assert!(s.audit_activities().await.iter().any(|a| a == "Delete OnPremisesConnection"));
}

#[tokio::test]
async fn test_cli_adds_lists_and_removes_a_network_connection_with_the_password_from_the_environment() {
    let s = Server::start().await;
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args).env("CLOUDPC_URL", &s.url).env("CLOUDPC_TOKEN", ADMIN_TOKEN);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let add = [
        "network-connections",
        "add",
        "--name",
        "Contoso HQ",
        "--bridge",
        "cpcorg0",
        "--domain",
        "corp.cloudpc.test",
        "--username",
        "cpcjoin",
        "--password-env",
        "JOIN_PASSWORD",
        "--ou",
        "OU=CloudPCs,DC=corp,DC=cloudpc,DC=test",
        "--output",
        "json",
    ];
    let out = run(&add, &[("JOIN_PASSWORD", PASSWORD)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (c["connectionType"].clone(), c["hasAdDomainPassword"].clone()),
        (json!("hybridAzureADJoin"), json!(true))
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(PASSWORD));

    // A missing variable is named, and nothing is made.
    let out = run(&add, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JOIN_PASSWORD"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = run(&["network-connections", "list"], &[]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains("Contoso HQ") && table.contains("pending") && table.contains("cpcorg0"), "{table}");
    let out = run(&["network-connections", "delete", "contoso hq"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.get(NC).await.1["value"].as_array().unwrap().is_empty());
}
