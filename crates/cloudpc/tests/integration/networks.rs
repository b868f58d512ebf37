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
    let (public, public_url) = public_listener();
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
    let (public, public_url) = public_listener();
    let s = VmServer::start(&["--public-url", &public_url, "--cleanup-delay-secs", "1"]).await;
    let sku = s.tiny_sku("TINY", 1, 1, 1).await;

    let hq = s.create(NC, hq_connection()).await;
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
    // Anti-spoofing on the organisation's network: it reaches the DC from its own address (once
    // libvirt has learnt it from the DHCP exchange), never from another.
    // (cloudpc-block-rdp-org when the policy blocks remote desktop, as by default: it includes it)
    assert!(
        xml.contains("<filterref filter='cloudpc-org'>") || xml.contains("<filterref filter='cloudpc-block-rdp-org'>"),
        "{xml}"
    );
    let sh = |cmd: String| {
        let d = domain.clone();
        async move { guest_output(&d, "/bin/sh", &["-c", &format!("{cmd} 2>&1")]).await }
    };
    let start = std::time::Instant::now();
    while !sh("ping -c 1 -W 2 10.77.0.10; echo rc=$?".into()).await.contains("rc=0") {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "the Cloud PC does not reach the DC");
    }
    let spoofed = sh(
        "ip addr add 10.77.0.250/24 dev eth0; ping -c 2 -W 2 -I 10.77.0.250 10.77.0.10; echo rc=$?; ip addr del 10.77.0.250/24 dev eth0"
            .into(),
    )
    .await;
    assert!(
        spoofed.contains("rc=1") && spoofed.contains("0 packets received"),
        "a spoofed packet got through: {spoofed}"
    );
    // libvirt gives cloudpc's filters back as they were defined (else cloudpc would define them
    // again, rebuilding every NIC's rules, at each use).
    use cloudpc_hypervisor::xml;
    for (name, doc) in [
        (xml::ISOLATION_FILTER, xml::isolation_filter()),
        (xml::ORG_FILTER, xml::org_filter()),
        (xml::BLOCK_RDP_FILTER, xml::block_rdp_filter()),
        (xml::BLOCK_RDP_ORG_FILTER, xml::block_rdp_org_filter()),
    ] {
        let defined = virsh(&["nwfilter-dumpxml", name]);
        assert_eq!(xml::filter_fingerprint(&defined), xml::filter_fingerprint(&doc), "{defined}");
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

/// The admin console's Network connections page in Chromium, against the test DC: a connection
/// added through the form passes its checks, a broken one fails with a remedy, the policy form
/// offers only the healthy one, and a reader changes nothing (web/tests/networks.mjs).
#[tokio::test]
async fn test_dc_admin_console_network_connections_page() {
    use crate::ad_support::*;
    use crate::vm_support::*;
    let _dc = TestDc::up().await;
    let (public, public_url) = public_listener();
    let web = crate::vm::web_dir();
    let s = VmServer::start(&["--public-url", &public_url, "--web-dir", web.join("dist").to_str().unwrap()]).await;
    let reader = s.reader_token().await;
    crate::vm::browser_test(
        "networks.mjs",
        &[
            ("CLOUDPC_URL", &s.url),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("READER_TOKEN", &reader),
            ("BRIDGE", BRIDGE),
            ("DOMAIN", DOMAIN),
            ("OU", OU),
            ("JOIN_USER", JOIN_USER),
            ("JOIN_PASSWORD", JOIN_PASSWORD),
        ],
        "admin-networks.png",
    )
    .await;
    // What the browser did, as the API sees it.
    let (_, conns) = s.get(NC).await;
    let names: Vec<&str> =
        conns["value"].as_array().unwrap().iter().filter_map(|c| c["displayName"].as_str()).collect();
    assert_eq!(names, vec!["HQ"], "Nowhere was deleted: {conns}");
    assert_eq!(conns["value"][0]["healthCheckStatus"], "passed");
    assert_eq!(conns["value"][0]["inUse"], true, "the browser's policy uses HQ");
    drop(public);
}

/// The VLAN of a libvirt domain's bridge port (`bridge -j vlan show`): its VLANs and flags.
fn port_vlans(port: &str) -> Vec<(u64, Vec<String>)> {
    let out = std::process::Command::new("bridge").args(["-j", "vlan", "show", "dev", port]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["vlans"].as_array().cloned().unwrap_or_default())
        .map(|l| {
            let flags = l["flags"].as_array().into_iter().flatten().filter_map(|f| f.as_str().map(str::to_string));
            (l["vlan"].as_u64().unwrap_or(0), flags.collect())
        })
        .collect()
}

/// Whether this kernel's bridges can filter VLANs (`CONFIG_BRIDGE_VLAN_FILTERING`): Debian's
/// kernels can; the kernel of the machine cloudpc is developed and tested on cannot (nor has it
/// 802.1Q), so there a Cloud PC cannot be put on a VLAN at all.
fn kernel_filters_vlans() -> bool {
    let sh = |c: &str| std::process::Command::new("sh").arg("-c").arg(c).status().is_ok_and(|s| s.success());
    let can = sh("ip link add cpcvlprobe0 type bridge vlan_filtering 1 2>/dev/null");
    sh("ip link del cpcvlprobe0 2>/dev/null");
    can
}

/// A connection on VLAN 42 of the organisation's bridge, where the test DC (and its DHCP) is
/// reached on that VLAN only. The health checks pass through the VLAN; a Cloud PC's port carries
/// VLAN 42 alone, untagged to the guest (cloudpc tags it: libvirt 9 tags only Open vSwitch
/// ports), so it gets its address from the organisation's DHCP and reaches the DC; after a power
/// off and on, libvirt's new port is tagged again. On a kernel whose bridges cannot filter VLANs
/// the checks fail with that reason and its remedy, and no policy may use the connection: what
/// this machine's kernel allows is what runs (and the test says which).
#[tokio::test]
async fn test_dc_vm_cloud_pcs_on_a_vlan_of_the_organisations_bridge() {
    use crate::ad_support::*;
    use crate::vm_support::*;
    use std::time::{Duration, Instant};
    if !kernel_filters_vlans() {
        println!("this kernel's bridges cannot filter VLANs: checking that cloudpc refuses the VLAN");
        let _dc = TestDc::up().await;
        let s = VmServer::start(&[]).await;
        let conn = s
            .create(
                NC,
                json!({"displayName": "Branch VLAN", "connectionType": "azureADJoin", "bridgeName": BRIDGE, "vlanId": 42}),
            )
            .await;
        let id = conn["id"].as_str().unwrap().to_string();
        let c = checked(&s, &id).await;
        assert_eq!(c["healthCheckStatus"], "failed", "{c:#}");
        let bridge = check(&c, "Host bridge");
        assert_eq!(bridge["status"], "failed", "{bridge}");
        assert!(bridge["additionalDetails"].as_str().unwrap().contains("does not filter VLANs"), "{bridge}");
        assert!(bridge["recommendedAction"].as_str().unwrap().contains("vlan_filtering 1"), "{bridge}");
        let (st, e) = s
            .post(
                &format!("{VE}/provisioningPolicies"),
                json!({"displayName": "VLAN desktops", "imageId": s.gallery_image_id().await, "imageType": "gallery",
                       "domainJoinConfigurations": [{"domainJoinType": "azureADJoin", "onPremisesConnectionId": id}]}),
            )
            .await;
        assert_eq!(st, 400, "{e}");
        return;
    }
    let _dc = TestDc::up_with(&[("CPC_DC_VLAN", "42")]).await;
    let (public, public_url) = public_listener();
    let s = VmServer::start(&["--public-url", &public_url]).await;
    let sku = s.tiny_sku("TINY", 1, 1, 1).await;
    let conn = s
        .create(
            NC,
            json!({"displayName": "Branch VLAN", "connectionType": "azureADJoin", "bridgeName": BRIDGE, "vlanId": 42}),
        )
        .await;
    let id = conn["id"].as_str().unwrap().to_string();
    let c = checked(&s, &id).await;
    assert_eq!(c["healthCheckStatus"], "passed", "{:#?}", statuses(&c));
    println!("checks through VLAN 42 in {:.1} s", seconds(&c));
    let ivy = s.user("ivy@contoso.com").await;
    let staff = s.group("staff").await;
    s.add_member(&staff, &ivy).await;
    let policy = s
        .tiny_policy(
            "VLAN desktops",
            json!({"domainJoinConfigurations": [{"domainJoinType": "azureADJoin", "onPremisesConnectionId": id}]}),
        )
        .await;
    s.assign(&policy, &[&staff]).await;
    s.license("ivy@contoso.com", &sku, true).await;
    let pc = s.wait_all(1, &["provisioned", "failed"], Duration::from_secs(240)).await.remove(0);
    assert_eq!(pc["status"], "provisioned", "{pc:#}");
    let domain = domain_of(&pc, &s.prefix);

    let tagged = |why: &str| {
        let xml = virsh(&["dumpxml", &domain]);
        assert!(xml.contains("<alias name='ua-cloudpc-vlan42'/>"), "{xml}");
        let port = xml.split("<target dev='").nth(1).unwrap().split('\'').next().unwrap().to_string();
        let vlans = port_vlans(&port);
        assert_eq!(
            vlans,
            vec![(42, vec!["PVID".to_string(), "Egress Untagged".to_string()])],
            "{why}: port {port} carries VLAN 42 only"
        );
        port
    };
    let first = tagged("after provisioning");
    let mac =
        virsh(&["dumpxml", &domain]).split("<mac address='").nth(1).unwrap().split('\'').next().unwrap().to_string();
    let reaches_dc = || async {
        let start = Instant::now();
        loop {
            let out =
                guest_output(&domain, "/bin/sh", &["-c", "ping -c 1 -W 2 10.77.0.10 >/dev/null; echo rc=$?"]).await;
            if out.contains("rc=0") {
                return start.elapsed();
            }
            assert!(start.elapsed() < Duration::from_secs(90), "the Cloud PC does not reach the DC: {out}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    println!("reached the DC on VLAN 42 after {:?}", reaches_dc().await);
    let leases = std::fs::read_to_string(format!("{STATE}/dnsmasq.leases")).unwrap_or_default();
    assert!(leases.contains(&mac), "the organisation's DHCP (only on VLAN 42) gave {mac} its address: {leases}");

    assert_eq!(s.action(&pc, "powerOff").await.0, 204);
    assert_eq!(s.action(&pc, "powerOn").await.0, 204);
    let second = tagged("after power off and on");
    println!("ports {first}, then {second}");
    println!("reached the DC again after {:?}", reaches_dc().await);
    drop(public);
}

/// A desktop Cloud PC on a connection joins the test domain for real, from inside the guest: the
/// computer object (which an earlier clean-up left disabled) is taken over and enabled in the OU,
/// the guest holds the machine's Kerberos keys, the Cloud PC's user is the domain account of the
/// same name (no local account), its desktop session runs as that account, and no other domain
/// account may sign in. Clean-up disables the computer object and leaves it in place.
#[tokio::test]
async fn test_dc_vm_desktop_joins_the_domain_and_its_session_runs_as_the_domain_account() {
    use crate::ad_support::*;
    use crate::vm_support::*;
    use std::time::{Duration, Instant};
    assert!(newest_build("desktop").is_some(), "the desktop image is not built: run scripts/test.sh");
    let dc = TestDc::up().await;
    dc.create_user("gina", "Gina!Pass-9c1e");
    let (public, public_url) = public_listener();
    let s = VmServer::start(&["--public-url", &public_url, "--cleanup-delay-secs", "1"]).await;
    let sku = s.tiny_sku("DESK", 2, 2, 8).await;
    let hq = s.create(NC, hq_connection()).await;
    let hq_id = hq["id"].as_str().unwrap().to_string();
    assert_eq!(checked(&s, &hq_id).await["healthCheckStatus"], "passed");
    let gina = s.user("gina@contoso.com").await;
    let staff = s.group("staff").await;
    s.add_member(&staff, &gina).await;
    let policy = s
        .create(
            &format!("{VE}/provisioningPolicies"),
            json!({"displayName": "Domain desktops", "imageId": s.gallery_image("desktop").await,
                   "imageType": "gallery",
                   "domainJoinConfigurations": [{"domainJoinType": "hybridAzureADJoin", "onPremisesConnectionId": hq_id}]}),
        )
        .await;
    s.assign(&policy, &[&staff]).await;
    s.license("gina@contoso.com", &sku, true).await;

    // The object an earlier Cloud PC of that name left behind, disabled, made as soon as the name
    // is known (the guest boots for far longer than that).
    let start = Instant::now();
    let name = loop {
        if let Some(n) = s.cloud_pcs().await.first().and_then(|p| p["managedDeviceName"].as_str().map(str::to_string)) {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the Cloud PC has no name");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let computer: String = name.to_ascii_uppercase().chars().take(15).collect();
    dc.create_computer(&computer);
    dc.disable_account(&format!("{computer}$"));
    assert_eq!(dc.account_control(&computer).map(|u| u & 2), Some(2));

    let pc =
        s.wait_all(1, &["provisioned", "provisionedWithWarnings", "failed"], Duration::from_secs(600)).await.remove(0);
    let steps = s.steps(&pc).await;
    assert_eq!(pc["status"], "provisioned", "{pc:#}\n{steps:#?}");
    let detail = |step: &str| {
        steps.iter().find(|st| st["name"] == step).and_then(|st| st["detail"].as_str()).unwrap_or("").to_string()
    };
    let join = detail("joinDirectory");
    println!("joinDirectory: {join}");
    for step in ["joinDirectory", "createUserAccount"] {
        let ms = steps.iter().rev().find(|st| st["name"] == step).map(|st| st["durationInMilliseconds"].clone());
        println!("{step} took {} ms", ms.unwrap_or_default());
    }
    assert!(join.contains(&format!("joined {DOMAIN}: computer object CN={computer},{OU}")), "{join}");
    assert_eq!(detail("createUserAccount"), format!("domain account gina of {DOMAIN}"));
    let uac = dc.account_control(&computer).expect("the computer object");
    assert_eq!(uac & 2, 0, "the join enabled the computer object again ({uac})");

    let domain = domain_of(&pc, &s.prefix);
    let sh = |cmd: &str| {
        let (d, c) = (domain.clone(), format!("{cmd} 2>&1"));
        async move { guest_output(&d, "/bin/sh", &["-c", &c]).await }
    };
    let keys = sh("klist -k").await;
    assert!(keys.contains(&format!("{computer}$@CORP.CLOUDPC.TEST")), "the machine's keys: {keys}");
    let entry = sh("getent passwd gina").await;
    assert!(entry.starts_with("gina:") && entry.trim_end().ends_with(":/home/gina:/bin/bash"), "{entry}");
    assert!(!sh("cat /etc/passwd").await.contains("gina:"), "no local account for gina");
    assert_eq!(sh("cat /etc/cloudpc/primary-user").await.trim(), "gina");
    // sssd's access rule: the primary user may sign in, another domain account may not.
    assert_eq!(sh("su -s /bin/sh -c 'id -un' gina").await.trim(), "gina");
    let other = sh("su -s /bin/sh -c 'id -un' cpcjoin; echo rc=$?").await;
    assert!(!other.contains("rc=0"), "{other}");
    let (status, e) =
        s.post(&format!("{VE}/cloudPCs/{}/getInitialPassword", pc["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status.as_u16(), 409, "the domain's password is gina's, there is no one-time one: {e}");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let procs = sh("ps -eo user:32,comm").await;
        if procs.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["gina", "jwm"]) {
            break;
        }
        assert!(Instant::now() < deadline, "no desktop session of gina:\n{procs}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Clean-up: the computer object stays, disabled.
    s.license("gina@contoso.com", &sku, false).await;
    let start = Instant::now();
    let graced = loop {
        let pcs = s.cloud_pcs().await;
        if pcs[0]["status"] == "inGracePeriod" {
            break pcs[0].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{pcs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s.action(&graced, "endGracePeriod").await.0, 204);
    s.wait_all(0, &["provisioned"], Duration::from_secs(120)).await;
    assert_eq!(dc.account_control(&computer).map(|u| u & 2), Some(2), "{computer} stays, disabled");
    drop(public);
}

/// The scheduled runs notice, without anyone asking, a domain controller whose DNS stopped
/// answering, and its return.
#[tokio::test]
async fn test_dc_scheduled_checks_notice_the_domains_dns_going_away_and_back() {
    use crate::ad_support::*;
    let dc = TestDc::up().await;
    let (public, public_url) = public_listener();
    let s = Server::start_with(&["--network-check-interval-secs", "2", "--public-url", &public_url], Some(ADMIN_TOKEN))
        .await;
    let made = s.create(NC, hq_connection()).await;
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
