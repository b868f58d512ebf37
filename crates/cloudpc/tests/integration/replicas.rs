//! Several `cloudpc server` replicas on one PostgreSQL database: what one replica knows, every
//! other knows (sessions, lockouts, console tickets, closed consoles), and a replica that dies
//! mid-provisioning is replaced by another that finishes the work from the step where it stopped.
//! These tests make their own PostgreSQL database in either pass of the suite.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{postgres_data_dir, Server, ADMIN_TOKEN, VE};
use crate::vm_support::{agent, vm_args, vm_turn, VmServer};

async fn sign_in(url: &str, upn: &str, password: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/portal/api/signIn"))
        .header("X-CloudPC-Portal", "1")
        .json(&json!({"userPrincipalName": upn, "password": password}))
        .send()
        .await
        .expect("sign-in request")
}

#[tokio::test]
async fn test_replicas_share_sessions_and_lockouts() {
    let a = Server::start_in(postgres_data_dir(), &[], Some(ADMIN_TOKEN)).await;
    let b = a.start_replica(&[]).await;
    let (_, ra) = a.get("/cloudpc/replica").await;
    let (_, rb) = b.get("/cloudpc/replica").await;
    assert_eq!((ra["database"].as_str(), rb["database"].as_str()), (Some("postgresql"), Some("postgresql")));
    assert_ne!(ra["replica"], rb["replica"], "two processes, two replica names");

    // What one writes, the other reads.
    let user = json!({"userPrincipalName": "ana@contoso.com", "displayName": "Ana", "passwordProfile": {"password": "Right-Pass-42"}});
    a.create("/v1.0/users", user).await;
    let (status, found) = b.get("/v1.0/users?$filter=userPrincipalName eq 'ana@contoso.com'").await;
    assert_eq!((status.as_u16(), found["value"].as_array().map(Vec::len)), (200, Some(1)), "{found}");

    // A session started at A is good at B.
    let r = sign_in(&a.url, "ana@contoso.com", "Right-Pass-42").await;
    assert_eq!(r.status().as_u16(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let me = reqwest::Client::new().get(format!("{}/portal/api/me", b.url)).header("cookie", &cookie).send().await;
    assert_eq!(me.unwrap().status().as_u16(), 200, "B knows A's session");

    // Five wrong passwords spread over both replicas lock the account on both.
    for i in 0..5 {
        let url = if i % 2 == 0 { &a.url } else { &b.url };
        assert_eq!(sign_in(url, "ana@contoso.com", "Wrong-Pass-1").await.status().as_u16(), 401);
    }
    for url in [&a.url, &b.url] {
        let r = sign_in(url, "ana@contoso.com", "Right-Pass-42").await;
        assert_eq!(r.status().as_u16(), 429, "locked on every replica, even with the right password");
    }
}

/// The replica that holds the Cloud PC's workflow lease now, read from the database.
fn lease_owner(database: &str) -> Option<String> {
    let out = std::process::Command::new("psql")
        .args([database, "-Atc", "SELECT lease_owner FROM cloud_pcs WHERE lease_owner IS NOT NULL"])
        .output()
        .expect("psql");
    let owner = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!owner.is_empty()).then_some(owner)
}

#[tokio::test]
async fn test_vm_replica_killed_mid_provisioning_another_finishes_with_one_vm() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let _turn = vm_turn().await;
    // The VM exists and boots while the guest steps run; a pause in joinDirectory (after createVm
    // and attachNetwork) leaves time to kill the replica in the middle of the workflow.
    let extra = ["--inject-delay", "joinDirectory:3000"];
    let a = VmServer::start_in(postgres_data_dir(), &extra).await;
    let args = vm_args(&a.prefix, &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = a.s.start_replica(&refs).await;
    let database = a.database_url().unwrap().to_string();

    let sku = a.tiny_sku("TINY", 1, 1, 1).await;
    let user = a
        .create(
            "/v1.0/users",
            json!({"userPrincipalName": "kim@contoso.com", "displayName": "Kim", "passwordProfile": {"password": "Kim-Pass-42"}}),
        )
        .await;
    let group = a.group("Failover").await;
    a.add_member(&group, &user).await;
    let policy = a.tiny_policy("Failover policy", json!({})).await;
    a.assign(&policy, &[&group]).await;
    a.license("kim@contoso.com", &sku, true).await;

    // Wait until the workflow is inside joinDirectory, then kill whichever replica runs it.
    let start = Instant::now();
    loop {
        if let Some(pc) = b.get(&format!("{VE}/cloudPCs")).await.1["value"].as_array().and_then(|v| v.first().cloned())
        {
            let (_, steps) = b.get(&format!("{VE}/cloudPCs/{}/provisioningSteps", pc["id"].as_str().unwrap())).await;
            let running = steps["value"].as_array().unwrap().iter().any(|s| s["name"] == "joinDirectory");
            if running {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the workflow never reached joinDirectory");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let owner = lease_owner(&database).expect("the running workflow holds a lease");
    let (_, ra) = a.get("/cloudpc/replica").await;
    let (mut a, mut b) = (a, b);
    let killed = Instant::now();
    let survivor: &Server = if ra["replica"] == owner {
        a.s.kill();
        &b
    } else {
        b.kill();
        &a.s
    };

    // The survivor takes the lease once it expires (15 s) and finishes from the step it stopped at.
    let pc = loop {
        let (_, v) = survivor.get(&format!("{VE}/cloudPCs")).await;
        let pc = v["value"][0].clone();
        if pc["status"] == "provisioned" {
            break pc;
        }
        assert!(pc["status"] != "failed", "{pc}");
        assert!(killed.elapsed() < Duration::from_secs(30), "not finished within 30 s of the kill: {pc}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("finished {:.1} s after the kill", killed.elapsed().as_secs_f64());
    let (_, steps) = survivor.get(&format!("{VE}/cloudPCs/{}/provisioningSteps", pc["id"].as_str().unwrap())).await;
    let created: Vec<&Value> = steps["value"].as_array().unwrap().iter().filter(|s| s["name"] == "createVm").collect();
    assert_eq!(created.len(), 1, "the VM was made once, not again after the takeover: {steps}");
    let domain = format!("{}{}", a.prefix, pc["managedDeviceName"].as_str().unwrap().to_ascii_lowercase());
    assert_eq!(a.domains(), vec![domain.clone()], "exactly one domain");
    assert_eq!(a.disks(), vec![format!("{domain}.console.log"), format!("{domain}.qcow2")], "no stray disks");
    assert_eq!(agent(&domain, json!({"execute": "guest-ping"})), json!({}));

    // A console ticket issued by one replica is redeemed at another, once.
    let third = survivor.start_replica(&refs).await;
    let (status, ticket) =
        survivor.post(&format!("{VE}/cloudPCs/{}/getConsoleTicket", pc["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status.as_u16(), 200, "{ticket}");
    let path = ticket["url"].as_str().unwrap();
    let connect = |base: &str| {
        let mut req = format!("{}{path}", base.replace("http://", "ws://")).into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let (mut ws, _) = connect(&third.url).await.expect("the ticket from another replica opens the console");
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("RFB greeting").unwrap().unwrap();
    assert!(first.into_data().starts_with(b"RFB "), "the relay carries the VNC server's greeting");
    assert!(connect(&survivor.url).await.is_err(), "the ticket is single-use across replicas");

    // Disabling the user at one replica closes the console relayed by another.
    let (status, _) = survivor
        .patch(&format!("/v1.0/users/{}", user["id"].as_str().unwrap()), json!({"accountEnabled": false}))
        .await;
    assert_eq!(status.as_u16(), 204);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the other replica's relay closed when the user was disabled");
    drop(third);
}

/// The README's `scripts/run-replicas.sh`, run as written on this prepared machine (the set-up
/// skipped, the test binary, a fresh database, other ports): two replicas answer, on PostgreSQL,
/// under different names, with the token replica 1 printed; Ctrl-C stops both.
#[tokio::test]
async fn test_run_replicas_script_starts_two_replicas_and_stops_them() {
    use std::io::BufRead;
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let url = crate::support::fresh_pg_database(&data.path().join(".test-database-url"));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let base = 18_080u16;
    // SIGINT back to its default for the script: a suite started in the background (`cmd &` in a
    // non-interactive shell) passes SIGINT on ignored, and bash cannot trap a signal that was
    // ignored when it started, so the Ctrl-C below would do nothing.
    let mut script = std::process::Command::new("env")
        .args(["--default-signal=INT", "bash"])
        .arg(root.join("scripts/run-replicas.sh"))
        .args(["--replicas", "2", "--domain-prefix", "cpctrr-", "--skip-image-test-boot"])
        .env("CLOUDPC_PREPARED", "1")
        .env("CLOUDPC_BIN", crate::support::bin())
        .env("CLOUDPC_PG_URL", &url)
        .env("CLOUDPC_DATA_DIR", data.path())
        .env("CLOUDPC_REPLICA_BASE_PORT", base.to_string())
        .env("CLOUDPC_LOG", "warn")
        .env_remove("CLOUDPC_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    let out = std::io::BufReader::new(script.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let token = loop {
        let line = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("no replicas: {lines:?}"));
        lines.push(line.clone());
        if lines.iter().any(|l| l.contains("replicas run")) {
            let token = lines.iter().find_map(|l| l.split_whitespace().find(|w| w.starts_with("cpc_")));
            break token.expect("replica 1 printed the administrator token").to_string();
        }
    };
    let http = reqwest::Client::new();
    let mut names = Vec::new();
    for port in [base + 1, base + 2] {
        let r = http.get(format!("http://127.0.0.1:{port}/cloudpc/replica")).bearer_auth(&token).send().await;
        let v: Value = r.expect("replica answers").json().await.unwrap();
        assert_eq!(v["database"], "postgresql", "{v}");
        names.push(v["replica"].as_str().unwrap().to_string());
    }
    assert_ne!(names[0], names[1]);
    // Ctrl-C: the script stops both replicas and exits.
    std::process::Command::new("kill").args(["-INT", &script.id().to_string()]).status().unwrap();
    let status = script.wait().unwrap();
    assert_eq!(status.code(), Some(130), "the script ends as an interrupted command does");
    for port in [base + 1, base + 2] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "replica on {port} stopped");
    }
}
