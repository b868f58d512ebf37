//! The README's CLI walk-through, run as written: every `$cloudpc …` line of its first
//! administrator block goes through bash against a real server, with only the placeholders
//! (`<gallery id>`, `<cloud pc id>`) filled in. If the README and the program drift apart, or
//! the walk-through's license cannot be placed on a machine like this one, this test fails.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;
use crate::vm_support::*;

/// The `$cloudpc` lines of the README block that starts with `export CLOUDPC_TOKEN`, each with
/// its continuation lines joined.
fn walk_through() -> Vec<String> {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
        .expect("README.md");
    let start = readme.find("export CLOUDPC_TOKEN").expect("the walk-through block");
    let block = &readme[start..start + readme[start..].find("```").expect("end of the block")];
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim_end();
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if current.trim_start().starts_with("$cloudpc ") {
                    lines.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    lines
}

#[tokio::test]
async fn test_vm_readme_cli_walk_through_runs_as_written() {
    let lines = walk_through();
    assert!(lines.len() >= 12, "the walk-through was found: {lines:?}");
    let _turn = vm_turn().await;
    let s = VmServer::start(&[]).await;
    let gallery = s.gallery_image_id().await;
    let mut outputs = Vec::new();
    for line in &lines {
        let mut line = line.replace("<gallery id>", &gallery);
        if line.contains("<cloud pc id>") {
            let pc = s.wait_all(1, &["provisioning", "pendingProvision", "provisioned"], Duration::from_secs(30)).await;
            line = line.replace("<cloud pc id>", pc[0]["id"].as_str().unwrap());
        }
        let run = tokio::process::Command::new("bash")
            .args(["-c", &line])
            .env("cloudpc", bin())
            .env("CLOUDPC_URL", &s.url)
            .env("CLOUDPC_TOKEN", ADMIN_TOKEN)
            .kill_on_drop(true)
            .output();
        // A Cloud PC that never gets capacity would keep `cloudpcs wait` waiting for 15 minutes.
        let out = match tokio::time::timeout(Duration::from_secs(240), run).await {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let (_, pcs) = s.get(&format!("{VE}/cloudPCs")).await;
                panic!("README line did not finish in 240 s: {line}; {pcs}")
            }
        };
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "README line failed: {line}\n{text}");
        outputs.push((line, text));
    }
    let pc: Value = s.wait_all(1, &["provisioned"], Duration::from_secs(180)).await.remove(0);
    assert_eq!(pc["status"], "provisioned", "{pc}");
    let waited = outputs.iter().find(|(l, _)| l.contains("cloudpcs wait")).expect("a wait line");
    assert!(waited.1.contains("provisioned"), "{}", waited.1);
    let password = outputs.iter().find(|(l, _)| l.contains("initial-password")).expect("a password line");
    assert!(password.1.len() > 8, "{}", password.1);
}
