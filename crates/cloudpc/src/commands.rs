//! The admin subcommands: each turns flags into one or a few API calls and prints the answer.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Map, Value};

use crate::cli::*;
use crate::client::{encode, Client, Failure};
use crate::output::{self, Column};

const VE: &str = "/v1.0/deviceManagement/virtualEndpoint";

const USER_COLUMNS: &[Column] = &[
    ("ID", "/id"),
    ("USER PRINCIPAL NAME", "/userPrincipalName"),
    ("DISPLAY NAME", "/displayName"),
    ("ENABLED", "/accountEnabled"),
];
const GROUP_COLUMNS: &[Column] = &[("ID", "/id"), ("DISPLAY NAME", "/displayName"), ("DESCRIPTION", "/description")];
const SKU_COLUMNS: &[Column] = &[
    ("ID", "/id"),
    ("PART NUMBER", "/skuPartNumber"),
    ("VCPU", "/vCpuCount"),
    ("RAM GB", "/ramInGB"),
    ("DISK GB", "/storageInGB"),
    ("SEATS", "/prepaidUnits/enabled"),
    ("USED", "/consumedUnits"),
];
const IMAGE_COLUMNS: &[Column] = &[
    ("ID", "/id"),
    ("DISPLAY NAME", "/displayName"),
    ("VERSION", "/version"),
    ("STATUS", "/status"),
    ("ERROR", "/errorCode"),
    ("SIZE GB", "/sizeInGb"),
];
const GALLERY_COLUMNS: &[Column] =
    &[("ID", "/id"), ("DISPLAY NAME", "/displayName"), ("STATUS", "/status"), ("SIZE GB", "/sizeInGB")];
const POLICY_COLUMNS: &[Column] = &[
    ("ID", "/id"),
    ("DISPLAY NAME", "/displayName"),
    ("IMAGE", "/imageDisplayName"),
    ("TYPE", "/provisioningType"),
    ("NAMING TEMPLATE", "/cloudPcNamingTemplate"),
];
const CLOUD_PC_COLUMNS: &[Column] = &[
    ("ID", "/id"),
    ("NAME", "/managedDeviceName"),
    ("USER", "/userPrincipalName"),
    ("POLICY", "/provisioningPolicyName"),
    ("STATUS", "/status"),
    ("DETAIL", "/statusDetail"),
];
const AUDIT_COLUMNS: &[Column] = &[
    ("WHEN", "/activityDateTime"),
    ("ACTIVITY", "/activity"),
    ("BY", "/actor/userPrincipalName|/actor/applicationDisplayName"),
    ("RESOURCE", "/resources/0/displayName"),
];
const STEP_COLUMNS: &[Column] = &[
    ("ATTEMPT", "/attempt"),
    ("STEP", "/name"),
    ("STAGE", "/stage"),
    ("STATUS", "/status"),
    ("STARTED", "/startDateTime"),
    ("MS", "/durationInMilliseconds"),
    ("ERROR / DETAIL", "/message"),
];
const TOKEN_COLUMNS: &[Column] = &[
    ("ID", "/id"),
    ("DISPLAY NAME", "/displayName"),
    ("ROLE", "/role"),
    ("CREATED", "/createdDateTime"),
    ("EXPIRES", "/expirationDateTime"),
    ("LAST USED", "/lastUsedDateTime"),
];
const IDP_COLUMNS: &[Column] = &[
    ("NAME", "/displayName"),
    ("ISSUER", "/issuer"),
    ("CLIENT", "/clientId"),
    ("SCIM", "/hasScimToken"),
    ("ID", "/id"),
];

const NET_COLUMNS: &[Column] = &[
    ("NAME", "/displayName"),
    ("TYPE", "/connectionType"),
    ("DOMAIN", "/adDomainName"),
    ("BRIDGE", "/bridgeName"),
    ("HEALTH", "/healthCheckStatus"),
    ("IN USE", "/inUse"),
    ("ID", "/id"),
];

const CHECK_COLUMNS: &[Column] = &[
    ("HOST", "/hostName"),
    ("CHECK", "/displayName"),
    ("RESULT", "/status"),
    ("DETAILS", "/additionalDetails"),
    ("WHAT TO DO", "/recommendedAction"),
];

const HOST_COLUMNS: &[Column] = &[
    ("NAME", "/displayName"),
    ("REGION", "/region"),
    ("STATE", "/state"),
    ("ACCEL", "/accelerator"),
    ("CLOUD PCS", "/cloudPcCount"),
    ("SAVED", "/savedCloudPcCount"),
    ("VCPU USED/ALL", "/used/vCpuCount"),
    ("/", "/capacity/vCpuCount"),
    ("MB FREE", "/free/memoryInMB"),
    ("GB FREE", "/free/diskInGB"),
    ("LAST REPORT", "/lastHeartbeatDateTime"),
];
const LICENSE_COLUMNS: &[Column] = &[
    ("SKU", "/skuId"),
    ("PART NUMBER", "/skuPartNumber"),
    ("VIA GROUP", "/licenseAssignmentStates/0/assignedByGroup"),
];
const ASSIGNMENT_COLUMNS: &[Column] =
    &[("ORDER", "/order"), ("GROUP", "/target/groupId"), ("ASSIGNED", "/assignedDateTime")];

pub async fn run(global: Global, command: Command) -> ExitCode {
    let client = Client::new(&global.url, global.token.clone());
    match dispatch(&client, global.output, command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

type Out = Result<(), Failure>;

fn list_path(base: &str, args: &ListArgs) -> String {
    let mut path = base.to_string();
    let mut sep = if base.contains('?') { '&' } else { '?' };
    if let Some(f) = &args.filter {
        path.push_str(&format!("{sep}$filter={}", encode(f)));
        sep = '&';
    }
    if let Some(n) = args.top {
        path.push_str(&format!("{sep}$top={}", n.min(999)));
    }
    path
}

async fn show_list(c: &Client, fmt: OutputFormat, base: &str, args: &ListArgs, cols: &[Column]) -> Out {
    let items = c.list(&list_path(base, args), args.top).await?;
    output::list(fmt, &items, cols);
    Ok(())
}

fn is_id(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Finds the one item whose `field` equals `name`, unless `name` already is an id.
async fn resolve(c: &Client, set: &str, field: &str, kind: &str, name: &str) -> Result<String, Failure> {
    if is_id(name) {
        return Ok(name.to_string());
    }
    let filter = format!("{field} eq '{}'", name.replace('\'', "''"));
    let found = c.list(&format!("{set}?$filter={}", encode(&filter)), None).await?;
    match found.as_slice() {
        [one] => Ok(one["id"].as_str().unwrap_or_default().to_string()),
        [] => Err(Failure::not_found(format!("no {kind} named '{name}'"))),
        _ => Err(Failure::refused(format!("several {kind}s are named '{name}'; use the id"))),
    }
}

async fn group_id(c: &Client, g: &str) -> Result<String, Failure> {
    resolve(c, "/v1.0/groups", "displayName", "group", g).await
}

async fn sku_id(c: &Client, s: &str) -> Result<String, Failure> {
    resolve(c, "/v1.0/subscribedSkus", "skuPartNumber", "SKU", s).await
}

async fn policy_id(c: &Client, p: &str) -> Result<String, Failure> {
    resolve(c, &format!("{VE}/provisioningPolicies"), "displayName", "provisioning policy", p).await
}

async fn user_id(c: &Client, u: &str) -> Result<String, Failure> {
    let user = c.get(&format!("/v1.0/users/{}", encode(u))).await?;
    Ok(user["id"].as_str().unwrap_or_default().to_string())
}

/// A JSON object from optional fields: `None` values are left out, so PATCH changes only those.
fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    let map: Map<String, Value> = fields.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect();
    Value::Object(map)
}

fn nonempty_patch(body: &Value) -> Out {
    if body.as_object().is_some_and(|m| m.is_empty()) {
        return Err(Failure::usage("nothing to change: give at least one option"));
    }
    Ok(())
}

async fn license_body(c: &Client, add: &[String], remove: &[String]) -> Result<Value, Failure> {
    if add.is_empty() && remove.is_empty() {
        return Err(Failure::usage("give --add SKU and/or --remove SKU"));
    }
    let mut adds = Vec::new();
    for s in add {
        adds.push(json!({ "skuId": sku_id(c, s).await?, "disabledPlans": [] }));
    }
    let mut removes = Vec::new();
    for s in remove {
        removes.push(Value::String(sku_id(c, s).await?));
    }
    Ok(json!({ "addLicenses": adds, "removeLicenses": removes }))
}

async fn dispatch(c: &Client, fmt: OutputFormat, command: Command) -> Out {
    match command {
        Command::Server(_) | Command::HostAgent(_) => unreachable!("handled in main"),
        Command::Hosts(cmd) => hosts(c, fmt, cmd).await,
        Command::IdentityProviders(cmd) => identity_providers(c, fmt, cmd).await,
        Command::NetworkConnections(cmd) => network_connections(c, fmt, cmd).await,
        Command::Users(cmd) => users(c, fmt, cmd).await,
        Command::Groups(cmd) => groups(c, fmt, cmd).await,
        Command::Skus(cmd) => skus(c, fmt, cmd).await,
        Command::Images(cmd) => images(c, fmt, cmd).await,
        Command::Policies(cmd) => policies(c, fmt, cmd).await,
        Command::CloudPcs(cmd) => cloud_pcs(c, fmt, cmd).await,
        Command::Audit(AuditCmd::List(a)) => show_list(c, fmt, &format!("{VE}/auditEvents"), &a, AUDIT_COLUMNS).await,
        Command::Tokens(cmd) => match cmd {
            TokensCmd::List => {
                output::list(fmt, &c.list("/cloudpc/tokens", None).await?, TOKEN_COLUMNS);
                Ok(())
            }
            TokensCmd::Create { name, role, expires_in_days } => {
                let role = match role {
                    RoleArg::Administrator => "cloudPcAdministrator",
                    RoleArg::Reader => "cloudPcReader",
                };
                let expires = expires_in_days.map(|d| chrono::Utc::now() + chrono::Duration::days(i64::from(d)));
                let body = json!({ "displayName": name, "role": role, "expirationDateTime": expires });
                let t = c.call(Method::POST, "/cloudpc/tokens", Some(&body)).await?;
                if fmt == OutputFormat::Json {
                    output::entity(fmt, &t);
                } else {
                    println!(
                        "Token '{}' ({role}) created. Its secret, shown only now:",
                        t["displayName"].as_str().unwrap_or_default()
                    );
                    println!("{}", t["secret"].as_str().unwrap_or_default());
                }
                Ok(())
            }
            TokensCmd::Revoke { id } => {
                c.call(Method::DELETE, &format!("/cloudpc/tokens/{id}"), None).await?;
                if fmt != OutputFormat::Json {
                    println!("Token {id} revoked.");
                }
                Ok(())
            }
        },
    }
}

/// A host by id or by name (names are unique, in any case).
async fn host_id(c: &Client, host: &str) -> Result<String, Failure> {
    if host.len() == 36 && host.chars().filter(|ch| *ch == '-').count() == 4 {
        return Ok(host.to_string());
    }
    let all = c.list("/cloudpc/hosts", None).await?;
    all.iter()
        .find(|h| h["displayName"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(host)))
        .and_then(|h| h["id"].as_str().map(str::to_string))
        .ok_or_else(|| Failure::not_found(format!("no host is named '{host}'")))
}

async fn hosts(c: &Client, fmt: OutputFormat, cmd: HostsCmd) -> Out {
    let set_state = |host: String, state: &'static str| async move {
        let id = host_id(c, &host).await?;
        let h = c.call(Method::PATCH, &format!("/cloudpc/hosts/{id}"), Some(&json!({ "state": state }))).await?;
        if fmt == OutputFormat::Json {
            output::entity(fmt, &h);
        } else {
            println!(
                "Host {} is {}.",
                h["displayName"].as_str().unwrap_or_default(),
                h["state"].as_str().unwrap_or_default()
            );
        }
        Ok(())
    };
    match cmd {
        HostsCmd::List(a) => show_list(c, fmt, "/cloudpc/hosts", &a, HOST_COLUMNS).await,
        HostsCmd::Get { host } => {
            let id = host_id(c, &host).await?;
            output::entity(fmt, &c.get(&format!("/cloudpc/hosts/{id}")).await?);
            Ok(())
        }
        HostsCmd::JoinToken { region, valid_minutes } => {
            let body = json!({ "region": region, "validForMinutes": valid_minutes });
            let t = c.call(Method::POST, "/cloudpc/hosts/joinTokens", Some(&body)).await?;
            if fmt == OutputFormat::Json {
                output::entity(fmt, &t);
            } else {
                eprintln!(
                    "Join token for region {region}, valid once until {} (shown only now). On the new host run:\n  \
                     cloudpc host-agent --join {} --token <token>",
                    t["expirationDateTime"].as_str().unwrap_or_default(),
                    c.base()
                );
                println!("{}", t["token"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        HostsCmd::Maintenance { host } => set_state(host, "maintenance").await,
        HostsCmd::Ready { host } => set_state(host, "ready").await,
        HostsCmd::Drain { host } => set_state(host, "draining").await,
        HostsCmd::Evacuate { host, yes } => {
            let id = host_id(c, &host).await?;
            let v = c
                .call(Method::POST, &format!("/cloudpc/hosts/{id}/evacuate"), Some(&json!({ "confirmDataLoss": yes })))
                .await?;
            if fmt == OutputFormat::Json {
                output::entity(fmt, &v);
            } else {
                println!(
                    "Host {host} evacuated: {} Cloud PC(s) are being recreated on other hosts.",
                    v["value"].as_array().map_or(0, Vec::len)
                );
            }
            Ok(())
        }
        HostsCmd::Delete { host } => {
            let id = host_id(c, &host).await?;
            c.call(Method::DELETE, &format!("/cloudpc/hosts/{id}"), None).await?;
            output::done(fmt, &format!("Host {host} removed."));
            Ok(())
        }
    }
}

const NET_BASE: &str = "/v1.0/deviceManagement/virtualEndpoint/onPremisesConnections";

/// A connection by id or by name (names are unique, in any case).
async fn connection_id(c: &Client, name: &str) -> Result<String, Failure> {
    if name.len() == 36 && name.chars().filter(|ch| *ch == '-').count() == 4 {
        return Ok(name.to_string());
    }
    let all = c.list(NET_BASE, None).await?;
    all.iter()
        .find(|x| x["displayName"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|x| x["id"].as_str().map(str::to_string))
        .ok_or_else(|| Failure::not_found(format!("no network connection is named '{name}'")))
}

async fn network_connections(c: &Client, fmt: OutputFormat, cmd: NetCmd) -> Out {
    match cmd {
        NetCmd::List(a) => show_list(c, fmt, NET_BASE, &a, NET_COLUMNS).await,
        NetCmd::Get { connection } => {
            let id = connection_id(c, &connection).await?;
            output::entity(fmt, &c.get(&format!("{NET_BASE}/{id}")).await?);
            Ok(())
        }
        NetCmd::Add { name, bridge, vlan, region, domain, username, password_env, ou } => {
            let password = match password_env {
                Some(var) => Some(
                    std::env::var(&var)
                        .map_err(|_| Failure::usage(format!("--password-env names {var}, which is not set")))?,
                ),
                None => None,
            };
            let kind = if domain.is_some() { "hybridAzureADJoin" } else { "azureADJoin" };
            let body = object(vec![
                ("displayName", Some(json!(name))),
                ("connectionType", Some(json!(kind))),
                ("bridgeName", Some(json!(bridge))),
                ("vlanId", vlan.map(Value::from)),
                ("regionName", region.map(Value::from)),
                ("adDomainName", domain.map(Value::from)),
                ("adDomainUsername", username.map(Value::from)),
                ("adDomainPassword", password.map(Value::from)),
                ("organizationalUnit", ou.map(Value::from)),
            ]);
            output::entity(fmt, &c.call(Method::POST, NET_BASE, Some(&body)).await?);
            Ok(())
        }
        NetCmd::Check { connection } => {
            let id = connection_id(c, &connection).await?;
            let path = format!("{NET_BASE}/{id}");
            let before = c.get(&path).await?;
            let last_start = before.pointer("/healthCheckStatusDetail/startDateTime").cloned();
            c.call(Method::POST, &format!("{path}/runHealthChecks"), None).await?;
            // Waits for a run that started after the request and has ended.
            let started = std::time::Instant::now();
            let done = loop {
                let now = c.get(&path).await?;
                let detail = now.get("healthCheckStatusDetail");
                let fresh = detail.and_then(|d| d.get("startDateTime")).cloned() != last_start;
                let ended = detail.and_then(|d| d.get("endDateTime")).is_some_and(|e| !e.is_null());
                if fresh && ended && now["healthCheckStatus"] != "running" {
                    break now;
                }
                if started.elapsed() > std::time::Duration::from_secs(120) {
                    return Err(Failure::refused("the health checks did not finish within 120 s"));
                }
                if fmt != OutputFormat::Json {
                    eprint!("\rchecking {connection}: {} s", started.elapsed().as_secs());
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            };
            if fmt == OutputFormat::Json {
                output::entity(fmt, &done);
            } else {
                eprintln!();
                let checks = done.pointer("/healthCheckStatusDetail/healthChecks").and_then(Value::as_array);
                output::list(fmt, checks.map(Vec::as_slice).unwrap_or(&[]), CHECK_COLUMNS);
                println!("{connection}: {}", done["healthCheckStatus"].as_str().unwrap_or("?"));
            }
            if done["healthCheckStatus"] == "failed" {
                return Err(Failure { code: 1, message: format!("the health checks of {connection} failed") });
            }
            Ok(())
        }
        NetCmd::Delete { connection } => {
            let id = connection_id(c, &connection).await?;
            c.call(Method::DELETE, &format!("{NET_BASE}/{id}"), None).await?;
            output::done(fmt, &format!("Network connection {connection} removed."));
            Ok(())
        }
    }
}

/// A provider by id or by name (names are unique, in any case).
async fn provider_id(c: &Client, p: &str) -> Result<String, Failure> {
    if p.len() == 36 && p.chars().filter(|ch| *ch == '-').count() == 4 {
        return Ok(p.to_string());
    }
    let all = c.list("/cloudpc/identityProviders", None).await?;
    all.iter()
        .find(|x| x["displayName"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(p)))
        .and_then(|x| x["id"].as_str().map(str::to_string))
        .ok_or_else(|| Failure::not_found(format!("no identity provider is named '{p}'")))
}

async fn identity_providers(c: &Client, fmt: OutputFormat, cmd: IdpCmd) -> Out {
    const BASE: &str = "/cloudpc/identityProviders";
    match cmd {
        IdpCmd::List(a) => show_list(c, fmt, BASE, &a, IDP_COLUMNS).await,
        IdpCmd::Get { provider } => {
            let id = provider_id(c, &provider).await?;
            output::entity(fmt, &c.get(&format!("{BASE}/{id}")).await?);
            Ok(())
        }
        IdpCmd::Add {
            name,
            issuer,
            client_id,
            client_secret_env,
            admin_groups,
            reader_groups,
            username_claim,
            groups_claim,
            scopes,
        } => {
            let secret = match client_secret_env {
                Some(var) => Some(
                    std::env::var(&var)
                        .map_err(|_| Failure::usage(format!("--client-secret-env names {var}, which is not set")))?,
                ),
                None => None,
            };
            let body = object(vec![
                ("displayName", Some(json!(name))),
                ("issuer", Some(json!(issuer))),
                ("clientId", Some(json!(client_id))),
                ("clientSecret", secret.map(Value::from)),
                ("administratorGroups", Some(json!(admin_groups))),
                ("readerGroups", Some(json!(reader_groups))),
                ("usernameClaim", username_claim.map(Value::from)),
                ("groupsClaim", groups_claim.map(Value::from)),
                ("scopes", (!scopes.is_empty()).then(|| json!(scopes))),
            ]);
            output::entity(fmt, &c.call(Method::POST, BASE, Some(&body)).await?);
            Ok(())
        }
        IdpCmd::ScimToken { provider } => {
            let id = provider_id(c, &provider).await?;
            let t = c.call(Method::POST, &format!("{BASE}/{id}/scimToken"), None).await?;
            if fmt == OutputFormat::Json {
                output::entity(fmt, &t);
            } else {
                eprintln!(
                    "SCIM token for {provider} (shown only now). In the provider's provisioning settings use
                       Tenant URL: {}
  Secret token:",
                    t["scimBaseUrl"].as_str().unwrap_or_default()
                );
                println!("{}", t["secret"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        IdpCmd::Delete { provider } => {
            let id = provider_id(c, &provider).await?;
            c.call(Method::DELETE, &format!("{BASE}/{id}"), None).await?;
            output::done(fmt, &format!("Identity provider {provider} removed."));
            Ok(())
        }
    }
}

async fn users(c: &Client, fmt: OutputFormat, cmd: UsersCmd) -> Out {
    match cmd {
        UsersCmd::List(a) => show_list(c, fmt, "/v1.0/users", &a, USER_COLUMNS).await,
        UsersCmd::Get { user } => {
            output::entity(fmt, &c.get(&format!("/v1.0/users/{}", encode(&user))).await?);
            Ok(())
        }
        UsersCmd::Create { upn, name, mail, disabled } => {
            let body = object(vec![
                ("userPrincipalName", Some(json!(upn))),
                ("displayName", Some(json!(name))),
                ("mail", mail.map(Value::from)),
                ("accountEnabled", Some(json!(!disabled))),
            ]);
            output::entity(fmt, &c.call(Method::POST, "/v1.0/users", Some(&body)).await?);
            Ok(())
        }
        UsersCmd::Update { user, upn, name, mail, enabled } => {
            let body = object(vec![
                ("userPrincipalName", upn.map(Value::from)),
                ("displayName", name.map(Value::from)),
                ("mail", mail.map(Value::from)),
                ("accountEnabled", enabled.map(Value::from)),
            ]);
            nonempty_patch(&body)?;
            let id = user_id(c, &user).await?;
            c.call(Method::PATCH, &format!("/v1.0/users/{id}"), Some(&body)).await?;
            output::entity(fmt, &c.get(&format!("/v1.0/users/{id}")).await?);
            Ok(())
        }
        UsersCmd::Delete { user } => {
            c.call(Method::DELETE, &format!("/v1.0/users/{}", encode(&user)), None).await?;
            output::done(fmt, &format!("Deleted user {user}."));
            Ok(())
        }
        UsersCmd::AssignLicense { user, add, remove } => {
            let body = license_body(c, &add, &remove).await?;
            c.call(Method::POST, &format!("/v1.0/users/{}/assignLicense", encode(&user)), Some(&body)).await?;
            let details = c.list(&format!("/v1.0/users/{}/licenseDetails", encode(&user)), None).await?;
            output::list(fmt, &details, LICENSE_COLUMNS);
            Ok(())
        }
        UsersCmd::Licenses { user } => {
            output::list(
                fmt,
                &c.list(&format!("/v1.0/users/{}/licenseDetails", encode(&user)), None).await?,
                LICENSE_COLUMNS,
            );
            Ok(())
        }
        UsersCmd::Groups { user } => {
            output::list(fmt, &c.list(&format!("/v1.0/users/{}/memberOf", encode(&user)), None).await?, GROUP_COLUMNS);
            Ok(())
        }
    }
}

async fn groups(c: &Client, fmt: OutputFormat, cmd: GroupsCmd) -> Out {
    match cmd {
        GroupsCmd::List(a) => show_list(c, fmt, "/v1.0/groups", &a, GROUP_COLUMNS).await,
        GroupsCmd::Get { group } => {
            let id = group_id(c, &group).await?;
            output::entity(fmt, &c.get(&format!("/v1.0/groups/{id}")).await?);
            Ok(())
        }
        GroupsCmd::Create { name, description } => {
            let body = object(vec![("displayName", Some(json!(name))), ("description", description.map(Value::from))]);
            output::entity(fmt, &c.call(Method::POST, "/v1.0/groups", Some(&body)).await?);
            Ok(())
        }
        GroupsCmd::Update { group, name, description } => {
            let body =
                object(vec![("displayName", name.map(Value::from)), ("description", description.map(Value::from))]);
            nonempty_patch(&body)?;
            let id = group_id(c, &group).await?;
            c.call(Method::PATCH, &format!("/v1.0/groups/{id}"), Some(&body)).await?;
            output::entity(fmt, &c.get(&format!("/v1.0/groups/{id}")).await?);
            Ok(())
        }
        GroupsCmd::Delete { group } => {
            let id = group_id(c, &group).await?;
            c.call(Method::DELETE, &format!("/v1.0/groups/{id}"), None).await?;
            output::done(fmt, &format!("Deleted group {group}."));
            Ok(())
        }
        GroupsCmd::Members { group } => {
            let id = group_id(c, &group).await?;
            output::list(fmt, &c.list(&format!("/v1.0/groups/{id}/members"), None).await?, USER_COLUMNS);
            Ok(())
        }
        GroupsCmd::AddMember { group, user } => {
            let (gid, uid) = (group_id(c, &group).await?, user_id(c, &user).await?);
            let body = json!({ "@odata.id": format!("https://graph.microsoft.com/v1.0/directoryObjects/{uid}") });
            c.call(Method::POST, &format!("/v1.0/groups/{gid}/members/$ref"), Some(&body)).await?;
            output::done(fmt, &format!("Added {user} to {group}."));
            Ok(())
        }
        GroupsCmd::RemoveMember { group, user } => {
            let (gid, uid) = (group_id(c, &group).await?, user_id(c, &user).await?);
            c.call(Method::DELETE, &format!("/v1.0/groups/{gid}/members/{uid}/$ref"), None).await?;
            output::done(fmt, &format!("Removed {user} from {group}."));
            Ok(())
        }
        GroupsCmd::AssignLicense { group, add, remove } => {
            let gid = group_id(c, &group).await?;
            let body = license_body(c, &add, &remove).await?;
            c.call(Method::POST, &format!("/v1.0/groups/{gid}/assignLicense"), Some(&body)).await?;
            output::list(fmt, &c.list(&format!("/v1.0/groups/{gid}/assignedLicenses"), None).await?, SKU_COLUMNS);
            Ok(())
        }
    }
}

async fn skus(c: &Client, fmt: OutputFormat, cmd: SkusCmd) -> Out {
    match cmd {
        SkusCmd::List(a) => show_list(c, fmt, "/v1.0/subscribedSkus", &a, SKU_COLUMNS).await,
        SkusCmd::Get { sku } => {
            let id = sku_id(c, &sku).await?;
            output::entity(fmt, &c.get(&format!("/v1.0/subscribedSkus/{id}")).await?);
            Ok(())
        }
        SkusCmd::Create { part_number, name, seats, vcpu, ram_gb, storage_gb } => {
            let body = object(vec![
                ("skuPartNumber", Some(json!(part_number))),
                ("displayName", name.map(Value::from)),
                ("prepaidUnits", Some(json!({ "enabled": seats }))),
                ("vCpuCount", Some(json!(vcpu))),
                ("ramInGB", Some(json!(ram_gb))),
                ("storageInGB", Some(json!(storage_gb))),
            ]);
            output::entity(fmt, &c.call(Method::POST, "/v1.0/subscribedSkus", Some(&body)).await?);
            Ok(())
        }
        SkusCmd::Update { sku, name, seats, vcpu, ram_gb, storage_gb } => {
            let body = object(vec![
                ("displayName", name.map(Value::from)),
                ("prepaidUnits", seats.map(|s| json!({ "enabled": s }))),
                ("vCpuCount", vcpu.map(Value::from)),
                ("ramInGB", ram_gb.map(Value::from)),
                ("storageInGB", storage_gb.map(Value::from)),
            ]);
            nonempty_patch(&body)?;
            let id = sku_id(c, &sku).await?;
            c.call(Method::PATCH, &format!("/v1.0/subscribedSkus/{id}"), Some(&body)).await?;
            output::entity(fmt, &c.get(&format!("/v1.0/subscribedSkus/{id}")).await?);
            Ok(())
        }
        SkusCmd::Delete { sku } => {
            let id = sku_id(c, &sku).await?;
            c.call(Method::DELETE, &format!("/v1.0/subscribedSkus/{id}"), None).await?;
            output::done(fmt, &format!("Deleted SKU {sku}."));
            Ok(())
        }
    }
}

async fn images(c: &Client, fmt: OutputFormat, cmd: ImagesCmd) -> Out {
    match cmd {
        ImagesCmd::Gallery(a) => show_list(c, fmt, &format!("{VE}/galleryImages"), &a, GALLERY_COLUMNS).await,
        ImagesCmd::GalleryDelete { image } => {
            c.call(Method::DELETE, &format!("{VE}/galleryImages/{}", encode(&image)), None).await?;
            output::done(fmt, &format!("Deleted gallery image {image}."));
            Ok(())
        }
        ImagesCmd::List(a) => show_list(c, fmt, &format!("{VE}/deviceImages"), &a, IMAGE_COLUMNS).await,
        ImagesCmd::Get { image } => {
            output::entity(fmt, &c.get(&format!("{VE}/deviceImages/{}", encode(&image))).await?);
            Ok(())
        }
        ImagesCmd::Create { name, version, file, format, wait } => {
            let body = json!({ "displayName": name, "version": version, "sourceImageResourceId": file, "sourceImageFormat": format.name() });
            let created = c.call(Method::POST, &format!("{VE}/deviceImages"), Some(&body)).await?;
            finish_image(c, fmt, created, &version, wait).await
        }
        ImagesCmd::Upload { file, format, name, version, os, wait } => {
            let mut path = format!(
                "{VE}/deviceImages/upload?displayName={}&version={}&format={}",
                encode(&name),
                encode(&version),
                format.name()
            );
            if let Some(os) = os {
                path.push_str(&format!("&operatingSystem={}", encode(&os)));
            }
            let created = c.upload(&path, &file, fmt == OutputFormat::Table).await?;
            finish_image(c, fmt, created, &version, wait).await
        }
        ImagesCmd::AddVersion { image, version, file, upload, format, wait } => {
            let base = format!("{VE}/deviceImages/{}/versions", encode(&image));
            let updated = match (file, upload) {
                (_, Some(local)) => {
                    let path = format!("{base}/upload?version={}&format={}", encode(&version), format.name());
                    c.upload(&path, &local, fmt == OutputFormat::Table).await?
                }
                (Some(f), None) => {
                    let body =
                        json!({ "version": version, "sourceImageResourceId": f, "sourceImageFormat": format.name() });
                    c.call(Method::POST, &base, Some(&body)).await?
                }
                (None, None) => return Err(Failure::usage("give --file or --upload")),
            };
            finish_image(c, fmt, updated, &version, wait).await
        }
        ImagesCmd::Delete { image } => {
            c.call(Method::DELETE, &format!("{VE}/deviceImages/{}", encode(&image)), None).await?;
            output::done(fmt, &format!("Deleted image {image}."));
            Ok(())
        }
        ImagesCmd::DeleteVersion { image, version } => {
            let path = format!("{VE}/deviceImages/{}/versions/{}", encode(&image), encode(&version));
            c.call(Method::DELETE, &path, None).await?;
            output::done(fmt, &format!("Deleted version {version} of image {image}."));
            Ok(())
        }
    }
}

/// Prints the image, or waits for `version` to be checked first; a failed check exits non-zero.
async fn finish_image(c: &Client, fmt: OutputFormat, image: Value, version: &str, wait: bool) -> Out {
    if !wait {
        output::entity(fmt, &image);
        return Ok(());
    }
    let id = image["id"].as_str().unwrap_or_default().to_string();
    let (image, v) = wait_for_image(c, fmt, &id, version).await?;
    output::entity(fmt, &image);
    if v["status"] == "failed" {
        return Err(Failure::refused(format!(
            "image check failed ({}): {}",
            v["errorCode"].as_str().unwrap_or("unknown"),
            v["statusDetails"].as_str().unwrap_or("")
        )));
    }
    Ok(())
}

/// Polls until the version is no longer pending, showing elapsed time on stderr so stdout stays
/// clean for scripts. Returns the image and the version's entry.
async fn wait_for_image(c: &Client, fmt: OutputFormat, id: &str, version: &str) -> Result<(Value, Value), Failure> {
    let start = Instant::now();
    loop {
        let image = c.get(&format!("{VE}/deviceImages/{id}")).await?;
        let entry = image["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["version"] == version))
            .cloned()
            .ok_or_else(|| Failure::not_found(format!("image {id} has no version {version}")))?;
        if entry["status"] != "pending" {
            if fmt == OutputFormat::Table {
                eprintln!(
                    "\rchecking image {version}: {} after {:.1}s",
                    entry["status"].as_str().unwrap_or("?"),
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok((image, entry));
        }
        if fmt == OutputFormat::Table {
            // The step the server is at (staging, inspecting, copying, testBoot), padded so that a
            // shorter line overwrites a longer one.
            let step = entry["checkStep"].as_str().unwrap_or("queued");
            eprint!("\rchecking image {version}: {step:<10} ({:.0}s)   ", start.elapsed().as_secs_f64());
            let _ = std::io::stderr().flush();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn image_type(k: ImageKind) -> &'static str {
    match k {
        ImageKind::Gallery => "gallery",
        ImageKind::Custom => "custom",
    }
}

async fn policies(c: &Client, fmt: OutputFormat, cmd: PoliciesCmd) -> Out {
    let set = format!("{VE}/provisioningPolicies");
    match cmd {
        PoliciesCmd::List(a) => show_list(c, fmt, &set, &a, POLICY_COLUMNS).await,
        PoliciesCmd::Get { policy } => {
            let id = policy_id(c, &policy).await?;
            let p = c.get(&format!("{set}/{id}?$expand=assignments")).await?;
            output::entity(fmt, &p);
            Ok(())
        }
        PoliciesCmd::Create {
            name,
            description,
            image,
            image_type: kind,
            naming_template,
            local_admin,
            region,
            locale,
            hibernate_after_minutes,
            warm_pool_size,
        } => {
            let body = object(vec![
                ("displayName", Some(json!(name))),
                ("description", description.map(Value::from)),
                ("imageId", Some(json!(image))),
                ("imageType", Some(json!(image_type(kind)))),
                ("cloudPcNamingTemplate", naming_template.map(Value::from)),
                ("localAdminEnabled", Some(json!(local_admin))),
                (
                    "domainJoinConfigurations",
                    region.map(|r| json!([{ "domainJoinType": "azureADJoin", "regionName": r }])),
                ),
                ("windowsSetting", locale.map(|l| json!({ "locale": l }))),
                ("hibernateAfterMinutes", hibernate_after_minutes.map(Value::from)),
                ("warmPoolSize", warm_pool_size.map(Value::from)),
            ]);
            output::entity(fmt, &c.call(Method::POST, &set, Some(&body)).await?);
            Ok(())
        }
        PoliciesCmd::Update {
            policy,
            name,
            description,
            image,
            image_type: kind,
            naming_template,
            local_admin,
            locale,
            hibernate_after_minutes,
            warm_pool_size,
        } => {
            let body = object(vec![
                ("displayName", name.map(Value::from)),
                ("description", description.map(Value::from)),
                ("imageId", image.map(Value::from)),
                ("imageType", kind.map(|k| json!(image_type(k)))),
                ("cloudPcNamingTemplate", naming_template.map(Value::from)),
                ("localAdminEnabled", local_admin.map(Value::from)),
                ("windowsSetting", locale.map(|l| json!({ "locale": l }))),
                ("hibernateAfterMinutes", hibernate_after_minutes.map(Value::from)),
                ("warmPoolSize", warm_pool_size.map(Value::from)),
            ]);
            nonempty_patch(&body)?;
            let id = policy_id(c, &policy).await?;
            c.call(Method::PATCH, &format!("{set}/{id}"), Some(&body)).await?;
            output::entity(fmt, &c.get(&format!("{set}/{id}")).await?);
            Ok(())
        }
        PoliciesCmd::Delete { policy } => {
            let id = policy_id(c, &policy).await?;
            c.call(Method::DELETE, &format!("{set}/{id}"), None).await?;
            output::done(fmt, &format!("Deleted provisioning policy {policy}."));
            Ok(())
        }
        PoliciesCmd::Assign { policy, groups } => {
            let id = policy_id(c, &policy).await?;
            let mut assignments = Vec::new();
            for g in &groups {
                let gid = group_id(c, g).await?;
                assignments.push(json!({ "target": { "@odata.type": "#microsoft.graph.cloudPcManagementGroupAssignmentTarget", "groupId": gid } }));
            }
            c.call(Method::POST, &format!("{set}/{id}/assign"), Some(&json!({ "assignments": assignments }))).await?;
            let mut list = c.list(&format!("{set}/{id}/assignments"), None).await?;
            for (i, a) in list.iter_mut().enumerate() {
                a["order"] = json!(i + 1);
            }
            output::list(fmt, &list, ASSIGNMENT_COLUMNS);
            Ok(())
        }
    }
}

async fn cloud_pcs(c: &Client, fmt: OutputFormat, cmd: CloudPcsCmd) -> Out {
    let pc_path = |id: &str| format!("{VE}/cloudPCs/{}", encode(id));
    let action = |id: &str, name: &str| format!("{VE}/cloudPCs/{}/{name}", encode(id));
    match cmd {
        CloudPcsCmd::List(a) => show_list(c, fmt, &format!("{VE}/cloudPCs"), &a, CLOUD_PC_COLUMNS).await,
        CloudPcsCmd::Get { cloud_pc } => {
            output::entity(fmt, &c.get(&pc_path(&cloud_pc)).await?);
            Ok(())
        }
        CloudPcsCmd::Steps { cloud_pc } => {
            let mut steps = c.list(&format!("{}/provisioningSteps", pc_path(&cloud_pc)), None).await?;
            for st in &mut steps {
                let msg = st["error"].as_str().or(st["detail"].as_str()).unwrap_or("").to_string();
                st["message"] = json!(msg);
            }
            output::list(fmt, &steps, STEP_COLUMNS);
            Ok(())
        }
        CloudPcsCmd::Wait { cloud_pc, timeout } => wait_for_cloud_pc(c, fmt, &cloud_pc, timeout).await,
        CloudPcsCmd::Rename { cloud_pc, name } => {
            c.call(Method::POST, &action(&cloud_pc, "rename"), Some(&json!({ "displayName": name }))).await?;
            output::entity(fmt, &c.get(&pc_path(&cloud_pc)).await?);
            Ok(())
        }
        CloudPcsCmd::InitialPassword { cloud_pc } => {
            let v = c.call(Method::POST, &action(&cloud_pc, "getInitialPassword"), None).await?;
            if fmt == OutputFormat::Json {
                output::entity(fmt, &v);
            } else {
                println!("user name: {}", v["userName"].as_str().unwrap_or_default());
                println!("one-time password (shown only now): {}", v["password"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        other => {
            let (id, name) = match other {
                CloudPcsCmd::Reprovision { cloud_pc } => (cloud_pc, "reprovision"),
                CloudPcsCmd::Retry { cloud_pc } => (cloud_pc, "retry"),
                CloudPcsCmd::Reboot { cloud_pc } => (cloud_pc, "reboot"),
                CloudPcsCmd::PowerOff { cloud_pc } => (cloud_pc, "powerOff"),
                CloudPcsCmd::PowerOn { cloud_pc } => (cloud_pc, "powerOn"),
                CloudPcsCmd::Hibernate { cloud_pc } => (cloud_pc, "hibernate"),
                CloudPcsCmd::Resume { cloud_pc } => (cloud_pc, "resume"),
                CloudPcsCmd::EndGracePeriod { cloud_pc } => (cloud_pc, "endGracePeriod"),
                _ => unreachable!("handled above"),
            };
            c.call(Method::POST, &action(&id, name), None).await?;
            output::entity(fmt, &c.get(&pc_path(&id)).await?);
            Ok(())
        }
    }
}

/// Shows the step a Cloud PC is on (on stderr, so stdout stays clean) until provisioning ends.
async fn wait_for_cloud_pc(c: &Client, fmt: OutputFormat, id: &str, timeout: u64) -> Out {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let pc = c.get(&format!("{VE}/cloudPCs/{}", encode(id))).await?;
        let status = pc["status"].as_str().unwrap_or("").to_string();
        let steps = c.list(&format!("{VE}/cloudPCs/{}/provisioningSteps", encode(id)), None).await?;
        let current = steps
            .last()
            .map(|s| format!("{} ({})", s["name"].as_str().unwrap_or("?"), s["status"].as_str().unwrap_or("?")))
            .unwrap_or_default();
        let line = format!("{status}: {current}");
        if line != last && fmt == OutputFormat::Table {
            eprintln!("[{:>5.1}s] {line}", start.elapsed().as_secs_f64());
            last = line;
        }
        match status.as_str() {
            "provisioned" | "provisionedWithWarnings" => {
                output::entity(fmt, &pc);
                return Ok(());
            }
            "failed" => {
                output::entity(fmt, &pc);
                return Err(Failure::refused(format!(
                    "provisioning failed: {}",
                    pc["statusDetail"].as_str().unwrap_or("")
                )));
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            return Err(Failure { code: 1, message: format!("still {status} after {timeout}s") });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
