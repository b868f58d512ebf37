//! The admin CLI against a real server: everyday work, JSON output, exit codes.

use std::process::{Command, Output};

use serde_json::Value;

use crate::support::*;

pub fn cli(s: &Server, token: &str, args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("CLOUDPC_URL", &s.url).env("CLOUDPC_TOKEN", token).output().expect("run cloudpc")
}

fn ok(s: &Server, args: &[&str]) -> String {
    let out = cli(s, ADMIN_TOKEN, args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json_out(s: &Server, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    serde_json::from_str(&ok(s, &all)).unwrap_or_else(|e| panic!("{args:?}: not JSON: {e}"))
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap()
}

#[tokio::test]
async fn test_cli_admin_workflow_end_to_end() {
    let s = Server::start().await;
    let image_file = qcow2(s.data_dir(), "base.qcow2", "64M");
    ok(&s, &["users", "create", "--upn", "adele@contoso.com", "--name", "Adele Vance"]);
    ok(&s, &["groups", "create", "--name", "Finance", "--description", "Money"]);
    ok(&s, &["groups", "add-member", "Finance", "adele@contoso.com"]);
    ok(
        &s,
        &[
            "skus",
            "create",
            "--part-number",
            "CPC_2C_8GB_128GB",
            "--seats",
            "5",
            "--vcpu",
            "2",
            "--ram-gb",
            "8",
            "--storage-gb",
            "128",
        ],
    );
    let table = ok(&s, &["users", "assign-license", "adele@contoso.com", "--add", "CPC_2C_8GB_128GB"]);
    assert!(table.contains("CPC_2C_8GB_128GB"), "{table}");

    let image = json_out(
        &s,
        &["images", "create", "--name", "Base", "--version", "1.0.0", "--file", image_file.to_str().unwrap(), "--wait"],
    );
    assert_eq!(image["status"], "ready");
    let image_id = image["id"].as_str().unwrap();
    ok(
        &s,
        &[
            "policies",
            "create",
            "--name",
            "Finance desktops",
            "--image",
            image_id,
            "--naming-template",
            "FIN-%RAND:5%",
            "--local-admin",
        ],
    );
    ok(&s, &["groups", "create", "--name", "Backup"]);
    let assigned = ok(&s, &["policies", "assign", "Finance desktops", "--group", "Finance", "--group", "Backup"]);
    assert!(assigned.contains("ORDER"), "{assigned}");

    let policy = json_out(&s, &["policies", "get", "Finance desktops"]);
    assert_eq!(policy["localAdminEnabled"], true);
    let groups: Vec<String> = json_out(&s, &["groups", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    let order: Vec<String> = policy["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["target"]["groupId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, groups, "assignment order follows --group order");

    let users = json_out(&s, &["users", "list", "--filter", "userPrincipalName eq 'adele@contoso.com'"]);
    assert_eq!(users.as_array().unwrap().len(), 1);
    let skus = json_out(&s, &["skus", "list"]);
    assert_eq!(skus[0]["consumedUnits"], 1);
    let updated = json_out(&s, &["policies", "update", "Finance desktops", "--description", "EU"]);
    assert_eq!(updated["description"], "EU");
    let audit = json_out(&s, &["audit", "list"]);
    assert!(audit.as_array().unwrap().len() >= 9);
    let cloud_pcs = json_out(&s, &["cloudpcs", "list"]);
    assert!(cloud_pcs.as_array().is_some());
}

#[tokio::test]
async fn test_cli_list_follows_pages() {
    let s = Server::start().await;
    for i in 0..120 {
        s.user(&format!("u{i:03}@contoso.com")).await;
    }
    let all = json_out(&s, &["users", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 120, "more than one page of 100");
    let some = json_out(&s, &["users", "list", "--top", "7"]);
    assert_eq!(some.as_array().unwrap().len(), 7);
}

/// A one-seat SKU "ONE" and user a@contoso.com, made through the CLI.
fn one_seat_sku_and_user_a(s: &Server) {
    let sku =
        ["skus", "create", "--part-number", "ONE", "--seats", "1", "--vcpu", "1", "--ram-gb", "1", "--storage-gb", "1"];
    ok(s, &sku);
    ok(s, &["users", "create", "--upn", "a@contoso.com", "--name", "A"]);
}

#[tokio::test]
async fn test_cli_exit_codes_scripts_can_trust() {
    let s = Server::start().await;
    one_seat_sku_and_user_a(&s);
    ok(&s, &["users", "create", "--upn", "b@contoso.com", "--name", "B"]);
    ok(&s, &["users", "assign-license", "a@contoso.com", "--add", "ONE"]);

    let refused = cli(&s, ADMIN_TOKEN, &["users", "assign-license", "b@contoso.com", "--add", "ONE"]);
    assert_eq!(code(&refused), 3, "seat limit is a refusal");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("seats"));

    assert_eq!(code(&cli(&s, ADMIN_TOKEN, &["users", "get", "nobody@contoso.com"])), 4);
    assert_eq!(code(&cli(&s, ADMIN_TOKEN, &["groups", "get", "No Such Group"])), 4);
    assert_eq!(code(&cli(&s, "cpc_wrong-token", &["users", "list"])), 5);
    let reader = s.reader_token().await;
    assert_eq!(code(&cli(&s, &reader, &["users", "list"])), 0);
    assert_eq!(code(&cli(&s, &reader, &["groups", "create", "--name", "X"])), 5);
    assert_eq!(code(&cli(&s, ADMIN_TOKEN, &["users", "create", "--upn", "bad", "--name", "X"])), 3);
    assert_eq!(
        code(&cli(&s, ADMIN_TOKEN, &["users", "update", "a@contoso.com"])),
        2,
        "nothing to change is a usage error"
    );
    assert_eq!(code(&cli(&s, ADMIN_TOKEN, &["users", "frobnicate"])), 2);

    let unreachable = Command::new(bin())
        .args(["users", "list"])
        .env("CLOUDPC_URL", "http://127.0.0.1:1")
        .env("CLOUDPC_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert_eq!(code(&unreachable), 1);
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach"));
}

#[tokio::test]
async fn test_cli_token_create_prints_secret_once() {
    let s = Server::start().await;
    let out = ok(&s, &["tokens", "create", "--name", "auditor", "--role", "reader"]);
    let secret = out.lines().find(|l| l.starts_with("cpc_")).expect("secret printed").to_string();
    assert_eq!(code(&cli(&s, &secret, &["audit", "list"])), 0);
    let listed = ok(&s, &["tokens", "list"]);
    assert!(listed.contains("auditor") && !listed.contains(&secret));
}

#[tokio::test]
async fn test_cli_cloud_pcs_of_untargeted_user_and_refused_actions() {
    let s = Server::start().await;
    one_seat_sku_and_user_a(&s);
    ok(&s, &["users", "assign-license", "a@contoso.com", "--add", "ONE"]);
    // The reconciler reacts to the license: a licensed user no policy targets is notProvisioned.
    let mut pcs = Value::Null;
    for _ in 0..100 {
        pcs = json_out(&s, &["cloudpcs", "list"]);
        if pcs.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(pcs[0]["status"], "notProvisioned", "{pcs}");
    let id = pcs[0]["id"].as_str().unwrap().to_string();
    assert_eq!(json_out(&s, &["cloudpcs", "steps", &id]), serde_json::json!([]));
    for action in ["reprovision", "retry", "reboot", "end-grace-period", "initial-password"] {
        let out = cli(&s, ADMIN_TOKEN, &["cloudpcs", action, &id]);
        assert_eq!(code(&out), 3, "{action}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let renamed = json_out(&s, &["cloudpcs", "rename", &id, "--name", "Spare"]);
    assert_eq!(renamed["displayName"], "Spare");
    let reader = s.reader_token().await;
    assert_eq!(code(&cli(&s, &reader, &["cloudpcs", "rename", &id, "--name", "x"])), 5);
    // Removing the license removes the notProvisioned entry.
    ok(&s, &["users", "assign-license", "a@contoso.com", "--remove", "ONE"]);
    for _ in 0..100 {
        if json_out(&s, &["cloudpcs", "list"]).as_array().is_some_and(|a| a.is_empty()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the notProvisioned Cloud PC stayed after the license was removed");
}
