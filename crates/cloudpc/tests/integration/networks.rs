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
    // Its checks run at once (and fail here, where no such bridge exists unless a test DC is up).
    assert!(table.contains("Contoso HQ") && table.contains("cpcorg0"), "{table}");
    assert!(["pending", "running", "failed", "passed"].iter().any(|w| table.contains(w)), "{table}");
    let out = run(&["network-connections", "delete", "contoso hq"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.get(NC).await.1["value"].as_array().unwrap().is_empty());
}

/// Waits until the connection's checks have run (a finished run, not the pending state of a new
/// or changed connection).
async fn checked(s: &Server, id: &str) -> Value {
    let started = std::time::Instant::now();
    loop {
        let (_, c) = s.get(&format!("{NC}/{id}")).await;
        let ended = c.pointer("/healthCheckStatusDetail/endDateTime").is_some_and(|e| !e.is_null());
        if ended && !matches!(c["healthCheckStatus"].as_str(), Some("pending" | "running")) {
            return c;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the checks did not finish: {c}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Runs the checks again and waits for this run's results.
async fn recheck(s: &Server, id: &str) -> Value {
    let (_, before) = s.get(&format!("{NC}/{id}")).await;
    let last = before.pointer("/healthCheckStatusDetail/startDateTime").cloned();
    let (st, e) = s.post(&format!("{NC}/{id}/runHealthChecks"), json!({})).await;
    assert_eq!(st, 204, "{e}");
    let started = std::time::Instant::now();
    loop {
        let c = checked(s, id).await;
        if c.pointer("/healthCheckStatusDetail/startDateTime").cloned() != last {
            return c;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "no new run: {c}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The check of that name, from the connection's last run.
fn check<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["healthCheckStatusDetail"]["healthChecks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["displayName"] == name)
        .unwrap_or_else(|| panic!("no check '{name}' in {c}"))
}

fn statuses(c: &Value) -> Vec<(String, String)> {
    c["healthCheckStatusDetail"]["healthChecks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["displayName"].as_str().unwrap().to_string(), k["status"].as_str().unwrap().to_string()))
        .collect()
}

fn seconds(c: &Value) -> f64 {
    let t = |p: &str| chrono::DateTime::parse_from_rfc3339(c.pointer(p).unwrap().as_str().unwrap()).unwrap();
    (t("/healthCheckStatusDetail/endDateTime") - t("/healthCheckStatusDetail/startDateTime")).num_milliseconds() as f64
        / 1000.0
}

/// The health checks against a real Active Directory domain controller (Samba AD DC) on a test
/// organisation network: every check passes for a good connection, from a namespace on the bridge
/// that got its address from the organisation's DHCP; the test computer is gone afterwards; each
/// kind of mistake fails the check it concerns, with a remedy; a policy may use only a healthy
/// connection, which then may only be renamed.
#[tokio::test]
async fn test_dc_health_checks_pass_fail_with_remedies_and_gate_policies() {
    use crate::ad_support::*;
    let dc = TestDc::up().await;
    // The control plane's public address, as Cloud PCs on the organisation's network reach it.
    let public = std::net::TcpListener::bind((HOST_IP, 0)).unwrap();
    let public_url = format!("http://{HOST_IP}:{}", public.local_addr().unwrap().port());
    let s = Server::start_with(&["--public-url", &public_url], Some(ADMIN_TOKEN)).await;

    let good = s
        .create(
            NC,
            json!({
                "displayName": "Contoso HQ", "adDomainName": DOMAIN, "adDomainUsername": JOIN_USER,
                "adDomainPassword": JOIN_PASSWORD, "organizationalUnit": OU, "bridgeName": BRIDGE
            }),
        )
        .await;
    let id = good["id"].as_str().unwrap().to_string();
    let c = checked(&s, &id).await;
    println!("checks of a good connection: {:.2} s: {:?}", seconds(&c), statuses(&c));
    assert_eq!(c["healthCheckStatus"], "passed", "{c:#}");
    let names: Vec<String> = statuses(&c).into_iter().map(|(n, _)| n).collect();
    for want in [
        "Host bridge",
        "DHCP",
        "DNS",
        "Domain controller (LDAP)",
        "Kerberos and credentials",
        "Clock",
        "Domain join to the OU",
        "Machine account quota",
        "Control plane reachable",
    ] {
        assert!(names.iter().any(|n| n == want), "no '{want}' check in {names:?}");
    }
    assert_eq!(check(&c, "DHCP")["hostName"], "local");
    assert!(check(&c, "DHCP")["additionalDetails"].as_str().unwrap().contains("10.77.0."), "{c}");
    assert!(check(&c, "DNS")["additionalDetails"].as_str().unwrap().contains("dc1.corp.cloudpc.test"), "{c}");
    assert!(dc.computers("CPCHC").is_empty(), "the test computer was left: {:?}", dc.computers("CPCHC"));
    // The probe's address went back to the organisation's DHCP (dnsmasq rewrites its lease file
    // a moment after the release).
    let start = std::time::Instant::now();
    loop {
        let leases = std::fs::read_to_string(format!("{STATE}/dnsmasq.leases")).unwrap_or_default();
        if leases.trim().is_empty() {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the health checks kept their lease: {leases}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // The CLI runs them again and shows every check.
    let out = std::process::Command::new(bin())
        .args(["network-connections", "check", "Contoso HQ"])
        .env("CLOUDPC_URL", &s.url)
        .env("CLOUDPC_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("Domain join to the OU") && table.contains("Contoso HQ: passed"), "{table}");

    // Mistakes, each failing its own check with a remedy.
    let bad = |name: &str, patch: Value| {
        let mut body = json!({
            "displayName": name, "adDomainName": DOMAIN, "adDomainUsername": JOIN_USER,
            "adDomainPassword": JOIN_PASSWORD, "organizationalUnit": OU, "bridgeName": BRIDGE
        });
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        body
    };
    for (body, failing, remedy_words) in [
        (
            bad("Wrong password", json!({"adDomainPassword": "Wr0ng!Pass"})),
            "Kerberos and credentials",
            "adDomainPassword",
        ),
        (
            bad("Wrong OU", json!({"organizationalUnit": "OU=Nope,DC=corp,DC=cloudpc,DC=test"})),
            "Domain join to the OU",
            "Create the OU",
        ),
        (
            bad(
                "Wrong domain",
                json!({"adDomainName": "other.cloudpc.test", "organizationalUnit": "OU=X,DC=other,DC=cloudpc,DC=test"}),
            ),
            "DNS",
            "adDomainName",
        ),
        (bad("No bridge", json!({"bridgeName": "cpcnobr0"})), "Host bridge", "ip link add cpcnobr0 type bridge"),
        (bad("Not a VLAN bridge", json!({"vlanId": 42})), "Host bridge", "vlan_filtering"),
    ] {
        let made = s.create(NC, body.clone()).await;
        let c = checked(&s, made["id"].as_str().unwrap()).await;
        println!("{}: {:.2} s: {:?}", body["displayName"], seconds(&c), statuses(&c));
        assert_eq!(c["healthCheckStatus"], "failed", "{c:#}");
        let k = check(&c, failing);
        assert_eq!(k["status"], "failed", "{failing}: {c:#}");
        assert!(k["recommendedAction"].as_str().unwrap_or("").contains(remedy_words), "{failing}: {k:#}");
        assert!(!c.to_string().contains(JOIN_PASSWORD) && !c.to_string().contains("Wr0ng!Pass"));
    }
    assert!(dc.computers("CPCHC").is_empty(), "a failed run left a test computer: {:?}", dc.computers("CPCHC"));

    // The domain controller's clock 10 minutes ahead: the clock check fails, naming NTP.
    dc.restart(&[("CPC_DC_FAKETIME", "+10m")]);
    let c = recheck(&s, &id).await;
    assert_eq!(c["healthCheckStatus"], "failed", "{c:#}");
    assert_eq!(check(&c, "Clock")["status"], "failed", "{c:#}");
    assert!(check(&c, "Clock")["recommendedAction"].as_str().unwrap().contains("NTP"));
    dc.restart(&[]);

    // Policies: only a connection whose checks passed; a failed one is named in the refusal.
    let img = s.ready_image("Base").await;
    let policy_with = |conn: &str| {
        json!({
            "displayName": "Hybrid", "imageId": img["id"], "imageType": "custom",
            "domainJoinConfigurations": [{"domainJoinType": "hybridAzureADJoin", "onPremisesConnectionId": conn}]
        })
    };
    let (st, e) = s.post(&format!("{VE}/provisioningPolicies"), policy_with(&id)).await;
    assert_eq!(st, 400, "{e}");
    assert!(message(&e).contains("have not passed"), "{e}");
    let c = recheck(&s, &id).await;
    assert_eq!(c["healthCheckStatus"], "passed", "{c:#}");
    let (st, e) = s.post(&format!("{VE}/provisioningPolicies"), policy_with(&id)).await;
    assert_eq!(st, 201, "{e}");
    let (st, e) = s
        .post(
            &format!("{VE}/provisioningPolicies"),
            json!({"displayName": "Mismatch", "imageId": img["id"], "imageType": "custom",
                   "domainJoinConfigurations": [{"domainJoinType": "azureADJoin", "onPremisesConnectionId": id}]}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(message(&e).contains("domainJoinType"), "{e}");

    // In use: renamed only, never deleted.
    let (_, c) = s.get(&format!("{NC}/{id}")).await;
    assert_eq!(c["inUse"], true, "{c}");
    let (st, e) = s.patch(&format!("{NC}/{id}"), json!({"bridgeName": "br1"})).await;
    assert_eq!(st, 409, "{e}");
    assert!(message(&e).contains("only its name"), "{e}");
    let (st, e) = s.patch(&format!("{NC}/{id}"), json!({"displayName": "Contoso HQ (Berlin)"})).await;
    assert_eq!(st, 204, "{e}");
    let (st, e) = s.delete(&format!("{NC}/{id}")).await;
    assert_eq!(st, 409, "{e}");
    drop(public);
}

/// Provisioning on a network connection, with real VMs: a Cloud PC of a policy whose first
/// connection has become unhealthy lands on the next, healthy one, gets its NIC on the
/// organisation's bridge and its address from the organisation's DHCP (the test DC's dnsmasq); a
/// domain join with an image that has no adcli fails the core step with that reason, after the
/// retries.
#[tokio::test]
async fn test_dc_vm_cloud_pcs_on_the_organisations_network_and_a_join_without_adcli_fails() {
    use crate::ad_support::*;
    use crate::vm_support::*;
    let dc = TestDc::up().await;
    let public = std::net::TcpListener::bind((HOST_IP, 0)).unwrap();
    let public_url = format!("http://{HOST_IP}:{}", public.local_addr().unwrap().port());
    let s = VmServer::start(&["--public-url", &public_url, "--cleanup-delay-secs", "1"]).await;
    let sku = s.tiny_sku("TINY", 1, 1, 1).await;

    let hq = s
        .create(
            NC,
            json!({"displayName": "HQ", "adDomainName": DOMAIN, "adDomainUsername": JOIN_USER,
                   "adDomainPassword": JOIN_PASSWORD, "organizationalUnit": OU, "bridgeName": BRIDGE}),
        )
        .await;
    let hq_id = hq["id"].as_str().unwrap().to_string();
    let branch =
        s.create(NC, json!({"displayName": "Branch", "connectionType": "azureADJoin", "bridgeName": BRIDGE})).await;
    let branch_id = branch["id"].as_str().unwrap().to_string();
    assert_eq!(checked(&s, &hq_id).await["healthCheckStatus"], "passed");
    let c = checked(&s, &branch_id).await;
    assert_eq!(c["healthCheckStatus"], "passed", "{c:#}");

    // HQ first, Branch second; then HQ's checks fail (the domain controller's clock drifts).
    let ava = s.user("ava@contoso.com").await;
    let staff = s.group("staff").await;
    s.add_member(&staff, &ava).await;
    let policy = s
        .tiny_policy(
            "Desktops",
            json!({"domainJoinConfigurations": [
                {"domainJoinType": "hybridAzureADJoin", "onPremisesConnectionId": hq_id},
                {"domainJoinType": "azureADJoin", "onPremisesConnectionId": branch_id}
            ]}),
        )
        .await;
    dc.restart(&[("CPC_DC_FAKETIME", "+10m")]);
    assert_eq!(recheck(&s, &hq_id).await["healthCheckStatus"], "failed");
    s.assign(&policy, &[&staff]).await;
    s.license("ava@contoso.com", &sku, true).await;
    let pcs = s.wait_all(1, &["provisioned", "failed"], std::time::Duration::from_secs(240)).await;
    let pc = &pcs[0];
    assert_eq!(pc["status"], "provisioned", "{pc:#}");
    let steps = s.steps(pc).await;
    let attach = steps.iter().find(|st| st["name"] == "attachNetwork").unwrap();
    assert!(
        attach["detail"].as_str().unwrap_or("").contains("organisation's network (host bridge cpcorg0)"),
        "{attach}"
    );
    let join = steps.iter().find(|st| st["name"] == "joinDirectory").unwrap();
    assert!(!join["detail"].as_str().unwrap_or("").contains("joined"), "Branch joins no domain: {join}");
    let domain = format!("{}{}", s.prefix, pc["managedDeviceName"].as_str().unwrap().to_ascii_lowercase());
    let xml = virsh(&["dumpxml", &domain]);
    assert!(xml.contains("<source bridge='cpcorg0'/>"), "{xml}");
    // Its address came from the organisation's DHCP server, not cloudpc's.
    let mac = xml.split("<mac address='").nth(1).unwrap().split('\'').next().unwrap().to_string();
    let start = std::time::Instant::now();
    loop {
        let leases = std::fs::read_to_string(format!("{STATE}/dnsmasq.leases")).unwrap_or_default();
        if let Some(lease) = leases.lines().find(|l| l.contains(&mac)) {
            println!("the Cloud PC's lease from the organisation's DHCP: {lease}");
            assert!(lease.contains(" 10.77.0.1"), "{lease}");
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "no lease for {mac}: {leases}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // HQ healthy again: a domain join, which needs adcli in the image. The tiny image has none:
    // a core failure with that reason, after the retries.
    dc.restart(&[]);
    assert_eq!(recheck(&s, &hq_id).await["healthCheckStatus"], "passed");
    let ben = s.user("ben@contoso.com").await;
    let joiners = s.group("domain joined").await;
    s.add_member(&joiners, &ben).await;
    let hybrid = s
        .tiny_policy(
            "Domain joined",
            json!({"domainJoinConfigurations": [{"domainJoinType": "hybridAzureADJoin", "onPremisesConnectionId": hq_id}]}),
        )
        .await;
    s.assign(&hybrid, &[&joiners]).await;
    s.license("ben@contoso.com", &sku, true).await;
    // The object a join would make, made on the DC as soon as the Cloud PC has its name (the tiny
    // image cannot join): the undo of joinDirectory and the clean-up must disable it, not delete it.
    let start = std::time::Instant::now();
    let name = loop {
        let pcs = s.cloud_pcs().await;
        if let Some(n) = pcs
            .iter()
            .find(|p| p["userPrincipalName"] == "ben@contoso.com")
            .and_then(|p| p["managedDeviceName"].as_str())
        {
            break n.to_string();
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "ben's Cloud PC has no name: {pcs:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let computer: String = name.to_ascii_uppercase().chars().take(15).collect();
    dc.create_computer(&computer);
    let pcs = s.wait_all(2, &["provisioned", "failed"], std::time::Duration::from_secs(600)).await;
    let ben_pc = pcs.iter().find(|p| p["userPrincipalName"] == "ben@contoso.com").unwrap();
    assert_eq!(ben_pc["status"], "failed", "{ben_pc:#}");
    assert!(ben_pc["statusDetail"].as_str().unwrap_or("").contains("has no adcli"), "{ben_pc:#}");
    let start = std::time::Instant::now();
    loop {
        let uac = dc.account_control(&computer).expect("the computer object stays in the domain");
        if uac & 2 == 2 {
            println!("{computer} disabled (userAccountControl {uac})");
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "{computer} was not disabled ({uac})");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // Deprovisioned and cleaned up: the object is still there, disabled.
    s.license("ben@contoso.com", &sku, false).await;
    let start = std::time::Instant::now();
    while s.cloud_pcs().await.iter().any(|p| p["userPrincipalName"] == "ben@contoso.com") {
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "ben's Cloud PC was not cleaned up");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(dc.account_control(&computer).map(|u| u & 2), Some(2), "{computer} stays, disabled");
    drop(public);
}

/// The scheduled runs notice, without anyone asking, a domain controller whose DNS stopped
/// answering, and its return.
#[tokio::test]
async fn test_dc_scheduled_checks_notice_the_domains_dns_going_away_and_back() {
    use crate::ad_support::*;
    let dc = TestDc::up().await;
    let public = std::net::TcpListener::bind((HOST_IP, 0)).unwrap();
    let public_url = format!("http://{HOST_IP}:{}", public.local_addr().unwrap().port());
    let s = Server::start_with(&["--network-check-interval-secs", "2", "--public-url", &public_url], Some(ADMIN_TOKEN))
        .await;
    let made = s
        .create(
            NC,
            json!({"displayName": "HQ", "adDomainName": DOMAIN, "adDomainUsername": JOIN_USER,
                   "adDomainPassword": JOIN_PASSWORD, "organizationalUnit": OU, "bridgeName": BRIDGE}),
        )
        .await;
    let id = made["id"].as_str().unwrap().to_string();
    let until = |want: &'static str| {
        let (s, id) = (&s, id.clone());
        async move {
            let start = std::time::Instant::now();
            loop {
                let c = checked(s, &id).await;
                if c["healthCheckStatus"] == want {
                    return c;
                }
                assert!(start.elapsed() < std::time::Duration::from_secs(60), "never {want}: {c:#}");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
    };
    until("passed").await;
    dc.restart(&[("CPC_DC_SAMBA_OPTS", "--option=server services=-dns")]);
    let c = until("failed").await;
    assert_eq!(check(&c, "DNS")["status"], "failed", "{c:#}");
    dc.restart(&[]);
    until("passed").await;
    drop(public);
}
