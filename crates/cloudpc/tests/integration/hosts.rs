//! Hypervisor hosts behind agents: joining with a token, the hosts resource, placement by region
//! and capacity, maintenance, consoles relayed through the host's agent, host loss and fencing.
//! Agents run on this machine, each with its own data directory, port and domain prefix, all on
//! the local libvirt (or simulated, where a test says so).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;
use crate::vm_support::*;

/// A running `cloudpc host-agent`; killed when dropped.
pub struct HostAgent {
    child: Child,
    pub data: tempfile::TempDir,
    pub url: String,
}

impl HostAgent {
    /// Joins `server` with `token` and starts serving; `extra` are more agent flags.
    pub fn join(server: &Server, token: &str, name: &str, prefix: &str, extra: &[&str]) -> HostAgent {
        let data = tempfile::tempdir().expect("temp dir");
        // QEMU runs as libvirt-qemu and must reach the disks in the agent's data directory.
        std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (child, url) = Self::spawn(
            data.path(),
            &[&["--join", &server.url, "--token", token, "--name", name, "--domain-prefix", prefix], extra].concat(),
        )
        .unwrap_or_else(|e| panic!("agent {name} did not start: {e}"));
        HostAgent { child, data, url }
    }

    /// Starts an agent and waits for its listening line; `Err` with what it printed otherwise.
    fn spawn(dir: &Path, args: &[&str]) -> Result<(Child, String), String> {
        let mut child = Command::new(bin())
            .args(["host-agent", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(args)
            .env("CLOUDPC_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cloudpc host-agent");
        // Both pipes are read for the agent's whole life (a full pipe would stall its logging):
        // stderr is passed on to the test's, and kept for the error below.
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let kept = said.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[host agent] {line}");
                kept.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("cloudpc host agent ") {
                        let url = rest.split("listening on ").nth(1).unwrap().split(' ').next().unwrap().to_string();
                        return Ok((child, url));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("not listening after 60 s; it printed: {}", said.lock().unwrap()));
                }
            }
        }
        let _ = child.wait();
        let _ = stderr_reader.join();
        let err = said.lock().unwrap().clone();
        Err(err)
    }

    /// Runs an agent that is expected to refuse to start; returns what it printed.
    pub fn refused(dir: &Path, args: &[&str]) -> String {
        match Self::spawn(dir, args) {
            Ok((mut c, _)) => {
                let _ = c.kill();
                panic!("the agent started")
            }
            Err(e) => e,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the agent again on its data directory (it joined already; no token needed).
    pub fn restart(&mut self, extra: &[&str]) {
        self.kill();
        let (child, url) = Self::spawn(self.data.path(), extra).unwrap_or_else(|e| panic!("agent restart: {e}"));
        assert_eq!(url, self.url, "the agent keeps the address it joined with");
        self.child = child;
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn join_token(s: &Server, region: &str) -> String {
    let t = s.create("/cloudpc/hosts/joinTokens", json!({ "region": region })).await;
    t["token"].as_str().unwrap().to_string()
}

pub async fn hosts(s: &Server) -> Vec<Value> {
    let (status, v) = s.get("/cloudpc/hosts").await;
    assert_eq!(status.as_u16(), 200, "{v}");
    v["value"].as_array().unwrap().clone()
}

pub async fn host(s: &Server, name: &str) -> Value {
    hosts(s).await.into_iter().find(|h| h["displayName"] == name).unwrap_or_else(|| panic!("no host {name}"))
}

/// Waits until the host's state is `state`; returns how long that took.
pub async fn wait_host_state(s: &Server, name: &str, state: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let h = host(s, name).await;
        if h["state"] == state {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "host {name} not {state} after {limit:?}: {h}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn join_body(token: &str, name: &str, csr: &str) -> Value {
    json!({
        "token": token, "name": name, "address": "https://127.0.0.1:1", "certificateRequest": csr,
        "capacity": {"vcpus": 4, "memory_mib": 4096, "disk_gib": 50}, "accelerator": "tcg", "agentVersion": "0"
    })
}

#[tokio::test]
async fn test_join_tokens_work_once_expire_and_bad_joins_change_nothing() {
    let s = Server::start().await;
    let (status, v) = s.post("/cloudpc/hosts/joinTokens", json!({ "region": "west", "validForMinutes": 0 })).await;
    assert_eq!(status.as_u16(), 400, "{v}");
    assert!(message(&v).contains("validForMinutes"), "{v}");
    let (status, v) = s.post("/cloudpc/hosts/joinTokens", json!({ "region": "west/../x" })).await;
    assert_eq!(status.as_u16(), 400, "{v}");
    let reader = s.reader_token().await;
    let (status, _) =
        s.call_as(&reader, reqwest::Method::POST, "/cloudpc/hosts/joinTokens", Some(json!({ "region": "west" }))).await;
    assert_eq!(status.as_u16(), 403, "readers cannot let hosts in");

    // Hostile joins are refused with the field named, and leave the token usable.
    let token = join_token(&s, "west").await;
    let before = hosts(&s).await.len();
    for (body, field) in [
        (join_body(&token, "hv1", "not a certificate request"), "certificateRequest"),
        (join_body(&token, "hv 1;rm", "x"), "name"),
        (json!({"token": token}), "name"),
    ] {
        let (status, v) = s
            .raw(reqwest::Method::POST, "/cloudpc/agent/join", None, Some(&body.to_string()), Some("application/json"))
            .await;
        assert_eq!(status.as_u16(), 400, "{v}");
        assert!(message(&v).contains(field), "{field}: {v}");
    }
    let mut bad_address = join_body(&token, "hv1", "x");
    bad_address["address"] = json!("http://127.0.0.1:7366");
    let (status, v) = s
        .raw(
            reqwest::Method::POST,
            "/cloudpc/agent/join",
            None,
            Some(&bad_address.to_string()),
            Some("application/json"),
        )
        .await;
    assert_eq!(status.as_u16(), 400, "{v}");
    assert!(message(&v).contains("https://host:port"), "{v}");
    assert_eq!(hosts(&s).await.len(), before, "nothing was registered");

    // The real agent joins with it once; the same token is refused the second time.
    let mut a1 = HostAgent::join(&s, &token, "sim-west-1", "cpctsim-", &["--simulate", "--vcpus", "8"]);
    let h = host(&s, "sim-west-1").await;
    assert_eq!(h["region"], "west");
    assert_eq!(h["state"], "ready");
    assert_eq!(h["accelerator"], "simulated");
    assert_eq!(h["capacity"]["vCpuCount"], 8);
    assert!(h["agentAddress"].as_str().unwrap().starts_with("https://127.0.0.1:"), "{h}");
    assert!(h["subnetIndex"].as_u64().unwrap() >= 1, "{h}");
    let again = tempfile::tempdir().unwrap();
    let err =
        HostAgent::refused(again.path(), &["--join", &s.url, "--token", &token, "--name", "sim-west-2", "--simulate"]);
    assert!(err.contains("used already, or expired"), "{err}");
    // A duplicate name is refused and keeps the token.
    let t2 = join_token(&s, "west").await;
    let err =
        HostAgent::refused(again.path(), &["--join", &s.url, "--token", &t2, "--name", "SIM-WEST-1", "--simulate"]);
    assert!(err.contains("exists already"), "{err}");
    let mut a2 = HostAgent::join(&s, &t2, "sim-west-2", "cpctsim-", &["--simulate"]);

    // An expired token is refused: its expiry is moved into the past in the database.
    let t3 = join_token(&s, "west").await;
    expire_join_tokens(&s).await;
    let err =
        HostAgent::refused(again.path(), &["--join", &s.url, "--token", &t3, "--name", "sim-west-3", "--simulate"]);
    assert!(err.contains("expired"), "{err}");

    // Only the control plane's certificate opens an agent: no certificate, or another agent's
    // certificate (made for servers only), is refused during the TLS handshake.
    let ca = std::fs::read(a1.data.path().join("ca.pem")).unwrap();
    let root = reqwest::Certificate::from_pem(&ca).unwrap();
    let anonymous = reqwest::Client::builder().use_rustls_tls().add_root_certificate(root.clone()).build().unwrap();
    assert!(anonymous.get(format!("{}/v1/status", a2.url)).send().await.is_err(), "no client certificate");
    let mut own = std::fs::read(a1.data.path().join("cert.pem")).unwrap();
    own.extend(std::fs::read(a1.data.path().join("key.pem")).unwrap());
    let impostor = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(root)
        .identity(reqwest::Identity::from_pem(&own).unwrap())
        .build()
        .unwrap();
    assert!(impostor.get(format!("{}/v1/status", a2.url)).send().await.is_err(), "an agent cannot call an agent");

    // Host loss: kill -9 of an agent makes its host unreachable within 15 s.
    wait_host_state(&s, "sim-west-1", "ready", Duration::from_secs(10)).await;
    a1.kill();
    let took = wait_host_state(&s, "sim-west-1", "unreachable", Duration::from_secs(25)).await;
    assert!(took <= Duration::from_secs(16), "unreachable after {took:?}");
    let h = host(&s, "sim-west-1").await;
    assert!(h["statusDetail"].as_str().unwrap().contains("has not reported since"), "{h}");
    assert_eq!(host(&s, "sim-west-2").await["state"], "ready");

    // Admin states; unreachable cannot be set by hand.
    let id = host(&s, "sim-west-2").await["id"].as_str().unwrap().to_string();
    let (status, v) = s.patch(&format!("/cloudpc/hosts/{id}"), json!({ "state": "maintenance" })).await;
    assert_eq!(status.as_u16(), 200, "{v}");
    assert_eq!(v["state"], "maintenance");
    let (status, v) = s.patch(&format!("/cloudpc/hosts/{id}"), json!({ "state": "unreachable" })).await;
    assert_eq!(status.as_u16(), 400, "only shown, never set: {v}");
    let activities = s.audit_activities().await;
    for a in ["Create JoinToken", "Join Host", "Update Host"] {
        assert!(activities.iter().any(|x| x == a), "{a} audited: {activities:?}");
    }
    a2.kill();
}

/// Moves every join token's expiry into the past, in the server's database.
async fn expire_join_tokens(s: &Server) {
    match s.database_url() {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query("UPDATE host_join_tokens SET expires_at = now() - interval '1 minute'")
                .execute(&pool)
                .await
                .unwrap();
        }
        None => {
            let url = format!("sqlite://{}", s.data_dir().join("cloudpc.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query("UPDATE host_join_tokens SET expires_at = '2000-01-01T00:00:00.000000Z'")
                .execute(&pool)
                .await
                .unwrap();
        }
    }
}

fn region_policy(region: &str) -> Value {
    json!({"domainJoinConfigurations": [{"domainJoinType": "azureADJoin", "regionName": region}]})
}

/// The Cloud PC of a user.
async fn pc_of(s: &VmServer, upn: &str) -> Value {
    s.cloud_pcs()
        .await
        .into_iter()
        .find(|p| p["userPrincipalName"] == upn)
        .unwrap_or_else(|| panic!("no Cloud PC of {upn}"))
}

/// The libvirt domain of a Cloud PC on an agent with `agent_prefix`.
fn domain_on(agent_prefix: &str, cp_prefix: &str, pc: &Value) -> String {
    format!("{agent_prefix}{cp_prefix}{}", pc["managedDeviceName"].as_str().unwrap().to_ascii_lowercase())
}

/// Opens the Cloud PC's console through the gateway and returns the first bytes (the RFB greeting).
async fn console_greeting(s: &VmServer, pc: &Value) -> Vec<u8> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (status, ticket) = s.action(pc, "getConsoleTicket").await;
    assert_eq!(status, 200, "{ticket}");
    let url = format!("{}{}", s.url.replace("http://", "ws://"), ticket["url"].as_str().unwrap());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(60), tokio_tungstenite::connect_async(req))
        .await
        .expect("the gateway answers within 60 s")
        .expect("the gateway relays the console");
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("greeting").unwrap().unwrap();
    first.into_data().to_vec()
}

#[tokio::test]
async fn test_vm_agents_place_by_region_relay_consoles_drain_evacuate_and_fence() {
    let _turn = vm_turn().await;
    let base = format!("cpct{}-", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let _sweep = DomainSweeper(base.clone());
    let s = VmServer::start(&["--no-local-host"]).await;
    assert!(hosts(&s).await.is_empty(), "a control plane alone has no host of its own");
    let gallery = gallery().to_string_lossy().into_owned();
    let flags = ["--fence-after-secs", "8", "--gallery-dir", gallery.as_str()];
    let (p1, p2, p3) = (format!("{base}a1-"), format!("{base}a2-"), format!("{base}a3-"));
    let t = join_token(&s, "west").await;
    let mut a1 = HostAgent::join(&s, &t, "hv-west-1", &p1, &flags);
    let t = join_token(&s, "west").await;
    let mut a2 = HostAgent::join(&s, &t, "hv-west-2", &p2, &flags);
    let t = join_token(&s, "east").await;
    let mut a3 = HostAgent::join(&s, &t, "hv-east-1", &p3, &flags);
    let subnets: std::collections::HashSet<u64> =
        hosts(&s).await.iter().map(|h| h["subnetIndex"].as_u64().unwrap()).collect();
    assert_eq!(subnets.len(), 3, "every host has a subnet of its own");

    let sku = s.tiny_sku("TINY", 1, 1, 1).await;
    let west = s.tiny_policy("west", region_policy("west")).await;
    let east = s.tiny_policy("east", region_policy("east")).await;
    let (gw, ge) = (s.group("west people").await, s.group("east people").await);
    s.assign(&west, &[&gw]).await;
    s.assign(&east, &[&ge]).await;
    for (upn, g) in [("w1@contoso.com", &gw), ("w2@contoso.com", &gw), ("e1@contoso.com", &ge)] {
        let u = s.user(upn).await;
        s.add_member(g, &u).await;
        s.license(upn, &sku, true).await;
    }
    s.wait_all(3, &["provisioned"], Duration::from_secs(300)).await;

    // Each region's Cloud PCs on that region's hosts, spread over them, VMs under each agent's prefix.
    for (name, count) in [("hv-west-1", 1), ("hv-west-2", 1), ("hv-east-1", 1)] {
        assert_eq!(host(&s, name).await["cloudPcCount"], count, "{name}");
    }
    let e1 = pc_of(&s, "e1@contoso.com").await;
    assert_eq!(domains(&p3), vec![domain_on(&p3, &s.prefix, &e1)]);
    assert_eq!(domains(&p1).len() + domains(&p2).len(), 2);
    let sub3 = host(&s, "hv-east-1").await["subnetIndex"].as_u64().unwrap();
    let net = virsh(&["net-dumpxml", &format!("cloudpc-host{sub3}")]);
    assert!(net.contains(&format!("10.{}.{}.1", 214 + sub3 / 256, sub3 % 256)), "{net}");
    let xml = virsh(&["dumpxml", &domain_on(&p3, &s.prefix, &e1)]);
    assert!(xml.contains(&format!("network='cloudpc-host{sub3}'")), "{xml}");
    assert!(
        xml.contains(&a3.data.path().join("disks").to_string_lossy().into_owned()),
        "disk in the agent's directory"
    );

    // The image reached the agent's host in a step of its own, verified by its digest.
    let steps = s.steps(&e1).await;
    let transfer = steps.iter().find(|st| st["name"] == "transferImage").expect("a transferImage step");
    assert_eq!(transfer["status"], "succeeded", "{transfer}");
    assert!(std::fs::read_dir(a3.data.path().join("images")).unwrap().count() >= 3, "disk, kernel and initrd cached");

    // The console of a Cloud PC on an agent's host, relayed through that agent.
    let greeting = console_greeting(&s, &e1).await;
    assert!(greeting.starts_with(b"RFB 003.008"), "{greeting:?}");

    // Maintenance stops placement; back to ready, the waiting Cloud PC is placed.
    let h3 = host(&s, "hv-east-1").await["id"].as_str().unwrap().to_string();
    let (status, v) = s.patch(&format!("/cloudpc/hosts/{h3}"), json!({"state": "maintenance"})).await;
    assert_eq!(status.as_u16(), 200, "{v}");
    let u = s.user("e2@contoso.com").await;
    s.add_member(&ge, &u).await;
    s.license("e2@contoso.com", &sku, true).await;
    let start = Instant::now();
    let waiting = loop {
        let pc = s.cloud_pcs().await.into_iter().find(|p| p["userPrincipalName"] == "e2@contoso.com");
        if let Some(pc) = pc.filter(|p| p["status"] == "pendingProvision") {
            break pc;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "e2 is not waiting: {}", summary(&s.cloud_pcs().await));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let detail = waiting["statusDetail"].as_str().unwrap();
    assert!(detail.contains("no host in region 'east' is ready") && detail.contains("maintenance"), "{detail}");
    assert_eq!(domains(&p3).len(), 1, "no VM was made on the host in maintenance");
    s.patch(&format!("/cloudpc/hosts/{h3}"), json!({"state": "ready"})).await;
    s.wait_all(4, &["provisioned"], Duration::from_secs(180)).await;
    assert_eq!(host(&s, "hv-east-1").await["cloudPcCount"], 2);

    // Drain of a hibernated Cloud PC: it moves to the other west host with what its user saved
    // (flushed to its disk when it was hibernated: only the disk moves) and boots there afresh.
    let w1 = pc_of(&s, "w1@contoso.com").await;
    let (from, to, from_prefix, to_prefix) = if domains(&p1).contains(&domain_on(&p1, &s.prefix, &w1)) {
        ("hv-west-1", "hv-west-2", p1.clone(), p2.clone())
    } else {
        ("hv-west-2", "hv-west-1", p2.clone(), p1.clone())
    };
    let old_domain = domain_on(&from_prefix, &s.prefix, &w1);
    // No sync here: written a moment before the hibernation, it is in the guest's page cache only.
    guest_output(&old_domain, "/bin/sh", &["-c", "echo kept-across-the-move > /root/keep.txt"]).await;
    let (status, v) = s.action(&w1, "hibernate").await;
    assert_eq!(status, 204, "{v}");
    assert_eq!(virsh(&["domstate", &old_domain]).trim(), "shut off");
    let from_id = host(&s, from).await["id"].as_str().unwrap().to_string();
    let (status, v) = s.patch(&format!("/cloudpc/hosts/{from_id}"), json!({"state": "draining"})).await;
    assert_eq!(status.as_u16(), 200, "{v}");
    let start = Instant::now();
    while host(&s, from).await["cloudPcCount"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the drain did not finish: {}",
            summary(&s.cloud_pcs().await)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let moved = pc_of(&s, "w1@contoso.com").await;
    assert_eq!(moved["status"], "provisioned", "{moved}");
    let detail = moved["statusDetail"].as_str().unwrap_or("");
    assert!(
        detail.contains("Moved to another host") && detail.contains("hibernated and started afresh"),
        "the user is told: {moved}"
    );
    assert_eq!((moved["powerState"].as_str(), moved["powerStateDetail"].as_str()), (Some("running"), None), "{moved}");
    assert_eq!(host(&s, to).await["cloudPcCount"], 2);
    assert!(domains(&from_prefix).is_empty(), "nothing left on the drained host");
    let new_domain = domain_on(&to_prefix, &s.prefix, &w1);
    let start = Instant::now();
    while agent(&new_domain, json!({"execute": "guest-ping"})) != json!({}) {
        assert!(start.elapsed() < Duration::from_secs(90), "the moved VM's guest agent does not answer");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(guest_output(&new_domain, "/bin/cat", &["/root/keep.txt"]).await.trim(), "kept-across-the-move");
    assert!(s.audit_activities().await.iter().any(|a| a == "Move CloudPc"));
    s.patch(&format!("/cloudpc/hosts/{from_id}"), json!({"state": "ready"})).await;

    // Host loss: kill -9 of the agent that now has both west Cloud PCs; its host is unreachable
    // within 15 s, and its Cloud PCs say so.
    let (lost_agent, survivor) = if to == "hv-west-2" { (&mut a2, "hv-west-1") } else { (&mut a1, "hv-west-2") };
    wait_host_state(&s, to, "ready", Duration::from_secs(10)).await;
    lost_agent.kill();
    let took = wait_host_state(&s, to, "unreachable", Duration::from_secs(25)).await;
    assert!(took <= Duration::from_secs(16), "unreachable after {took:?}");
    let start = Instant::now();
    loop {
        let pc = pc_of(&s, "w2@contoso.com").await;
        if pc["powerState"] == "unknown"
            && pc["statusDetail"].as_str().is_some_and(|d| d.contains("host is unreachable"))
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the Cloud PC does not show its host's loss: {pc}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Evacuate: the admin is told the data is lost before confirming; then both are recreated.
    let lost_id = host(&s, to).await["id"].as_str().unwrap().to_string();
    let (status, v) = s.post(&format!("/cloudpc/hosts/{lost_id}/evacuate"), json!({})).await;
    assert_eq!(status.as_u16(), 400, "{v}");
    assert!(message(&v).contains("2 Cloud PC(s)") && message(&v).contains("lost"), "{v}");
    let survivor_id = host(&s, survivor).await["id"].as_str().unwrap().to_string();
    let (status, v) = s.post(&format!("/cloudpc/hosts/{survivor_id}/evacuate"), json!({"confirmDataLoss": true})).await;
    assert_eq!(status.as_u16(), 409, "a reachable host is drained, not evacuated: {v}");
    let (status, v) = s.post(&format!("/cloudpc/hosts/{lost_id}/evacuate"), json!({"confirmDataLoss": true})).await;
    assert_eq!(status.as_u16(), 200, "{v}");
    assert_eq!(v["value"].as_array().unwrap().len(), 2);
    s.wait_all(4, &["provisioned"], Duration::from_secs(240)).await;
    assert_eq!(host(&s, survivor).await["cloudPcCount"], 2);
    assert_eq!(host(&s, to).await["cloudPcCount"], 0);

    // The lost host comes back: its old VMs belong to no Cloud PC and are removed.
    let lost_prefix = to_prefix.clone();
    assert_eq!(domains(&lost_prefix).len(), 2, "the old VMs are still on the lost host");
    lost_agent.restart(&flags);
    let start = Instant::now();
    while !domains(&lost_prefix).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "orphaned VMs stay: {:?}", domains(&lost_prefix));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_host_state(&s, to, "ready", Duration::from_secs(15)).await;

    // Fencing: agents that hear from no control plane for longer than their lease stop their VMs.
    let running = |prefix: &str| domains(prefix).iter().filter(|d| virsh(&["domstate", d]).trim() == "running").count();
    let survivor_prefix = if survivor == "hv-west-1" { p1.clone() } else { p2.clone() };
    assert_eq!(running(&survivor_prefix), 2);
    assert_eq!(running(&p3), 2);
    let VmServer { s: mut server, .. } = s;
    server.kill();
    let start = Instant::now();
    while running(&survivor_prefix) + running(&p3) > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the agents did not fence their VMs");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let fenced_after = start.elapsed();
    assert!(fenced_after >= Duration::from_secs(3), "not before the lease ran out: {fenced_after:?}");
    a1.kill();
    a3.kill();
}

#[tokio::test]
async fn test_admin_console_hosts_page_lists_hosts_makes_join_tokens_and_sets_maintenance() {
    let web = crate::vm::web_dir();
    let s =
        Server::start_with(&["--web-dir", web.join("dist").to_str().unwrap(), "--no-local-host"], Some(ADMIN_TOKEN))
            .await;
    let token = join_token(&s, "west").await;
    let _agent = HostAgent::join(&s, &token, "sim-console-1", "cpctsim-", &["--simulate"]);
    let reader = s.reader_token().await;
    crate::vm::browser_test(
        "hosts.mjs",
        &[
            ("CLOUDPC_URL", &s.url),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("READER_TOKEN", &reader),
            ("HOST_NAME", "sim-console-1"),
        ],
        "admin-hosts.png",
    )
    .await;
    assert_eq!(host(&s, "sim-console-1").await["state"], "ready", "the browser put it back to ready");
    let activities = s.audit_activities().await;
    assert_eq!(activities.iter().filter(|a| *a == "Update Host").count(), 2, "{activities:?}");
    assert_eq!(activities.iter().filter(|a| *a == "Create JoinToken").count(), 2, "the test's and the browser's");
}
