// The store, written once for both backends. This file is not a module of its own: each backend
// module (`sqlite.rs`, `postgres.rs`) includes it after defining, for its database:
//   Db, Conn, DbRow: the sqlx database, connection and row types;
//   TheStore: the backend's struct, with a `pool: sqlx::Pool<Db>` field;
//   TsValue, ts(), get_ts(), get_opt_ts(): how a timestamp is bound and read;
//   BEGIN: the statement that opens a write transaction;
//   lock_rules(): the lock every rule-checking write takes first;
//   SKIP_LOCKED: the row-lock clause for claiming work;
//   PathValue, json_path(), json_text(), scalar_arg(): JSON field filters;
//   notify(): how a change is announced to other replicas.
// sqlx's generic-over-database bounds make generic code over both backends unreadable; compiling
// the same text against each backend's concrete types keeps one copy of every rule and query.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use cloudpc_types::audit::AuditEvent;
use cloudpc_types::auth::ApiToken;
use cloudpc_types::cloud_pc::{CloudPc, Device, ManagedDevice, ProvisioningStepRecord};
use cloudpc_types::directory::{Group, User};
use cloudpc_types::hosts::Host;
use cloudpc_types::identity::IdentityProvider;
use cloudpc_types::images::{DeviceImage, GalleryImage};
use cloudpc_types::licensing::SubscribedSku;
use cloudpc_types::network::OnPremisesConnection;
use cloudpc_types::policy::ProvisioningPolicy;
use cloudpc_types::provisioning::{CloudPcRecord, KernelBoot, Phase, ProvisioningState};

use crate::{
    image_table, AllocationGuard, ClaimFn, FieldEquals, HostRow, HostUsage, LicenseGrant, Listing, LockoutRule, Result,
    Store, StoreError, StoredAssignment,
};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One bound value of a dynamically built query.
// PostgreSQL compares JSON fields as text, so only SQLite binds numbers.
#[allow(dead_code)]
pub(super) enum Arg {
    Text(String),
    Int(i64),
    Real(f64),
    Path(PathValue),
}

/// Records written compare-and-swap: their version lives in a column, not in the JSON body.
trait Versioned: DeserializeOwned {
    fn set_row_version(&mut self, v: u64);
}

macro_rules! versioned {
    ($($t:ty),*) => { $(impl Versioned for $t { fn set_row_version(&mut self, v: u64) { self.row_version = v; } })* };
}
versioned!(User, Group, SubscribedSku, ProvisioningPolicy, DeviceImage, Host, IdentityProvider, OnPremisesConnection);

impl TheStore {
    /// Runs `f` in a transaction with the audit event, on a task of its own. A caller that goes
    /// away (a cancelled request) does not cancel the write half way: sqlx cannot undo a `BEGIN`
    /// whose future was dropped before it returned, and the connection went back to the pool
    /// inside an open transaction, holding SQLite's write lock (the cancellation test caught it).
    /// The write runs to its end, committed or rolled back as a whole; the transaction still rolls
    /// back if dropped (an error, a panic).
    async fn write<T, F>(&self, audit: Option<&AuditEvent>, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut Conn) -> BoxFuture<'c, Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        let audit = audit.cloned();
        let task = tokio::spawn(async move {
            let mut tx = pool.begin_with(BEGIN).await?;
            let value = f(&mut tx).await?;
            if let Some(audit) = &audit {
                insert_audit(&mut tx, audit).await?;
            }
            tx.commit().await?;
            Ok(value)
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StoreError::Database(sqlx::Error::Io(std::io::Error::other(e)))),
        }
    }

    /// One page of a table's JSON bodies in `order`, matching every `field eq value` term, and
    /// how many match in all. Field paths are bound, not spliced: they come from API callers.
    async fn page_bodies(
        &self,
        table: &str,
        order: &str,
        filter: &[FieldEquals],
        skip: usize,
        top: usize,
    ) -> Result<(Vec<String>, usize)> {
        let mut clause = String::from("1 = 1");
        let mut args: Vec<Arg> = Vec::new();
        for term in filter {
            args.push(Arg::Path(json_path(&term.path)));
            let field = json_text(args.len());
            match &term.value {
                serde_json::Value::Null => clause.push_str(&format!(" AND {field} IS NULL")),
                serde_json::Value::String(s) => {
                    args.push(Arg::Text(s.clone()));
                    clause.push_str(&format!(" AND lower({field}) = lower(${})", args.len()));
                }
                other => {
                    args.push(scalar_arg(other));
                    clause.push_str(&format!(" AND {field} = ${}", args.len()));
                }
            }
        }
        let count_sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE {clause}");
        let page_sql = format!(
            "SELECT body FROM {table} WHERE {clause} ORDER BY {order} LIMIT ${} OFFSET ${}",
            args.len() + 1,
            args.len() + 2
        );
        let total: i64 = bind_args(sqlx::query(&count_sql), &args).fetch_one(&self.pool).await?.get("n");
        let limit = i64::try_from(top).unwrap_or(i64::MAX);
        let offset = i64::try_from(skip).unwrap_or(i64::MAX);
        let rows = bind_args(sqlx::query(&page_sql), &args).bind(limit).bind(offset).fetch_all(&self.pool).await?;
        let bodies = rows.iter().map(|r| r.get::<String, _>("body")).collect();
        Ok((bodies, usize::try_from(total).unwrap_or(0)))
    }

    async fn list_bodies<T: DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>> {
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter().map(|r| decode(r.get::<&str, _>("body"))).collect()
    }

    async fn list_versioned<T: Versioned>(&self, table: &str) -> Result<Vec<T>> {
        let sql = format!("SELECT body, version FROM {table} ORDER BY created_at, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(versioned_from_row).collect()
    }

    async fn get_body<T: DeserializeOwned>(&self, table: &str, kind: &'static str, id: &str) -> Result<T> {
        let sql = format!("SELECT body FROM {table} WHERE id = $1");
        match sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await? {
            Some(row) => decode(row.get::<&str, _>("body")),
            None => Err(StoreError::not_found(kind, id)),
        }
    }

    async fn get_versioned<T: Versioned>(&self, table: &str, kind: &'static str, id: &str) -> Result<T> {
        let sql = format!("SELECT body, version FROM {table} WHERE id = $1");
        match sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await? {
            Some(row) => versioned_from_row(&row),
            None => Err(StoreError::not_found(kind, id)),
        }
    }

    /// Inserts or replaces a row of a device table (idempotent, for provisioning steps).
    async fn put_row(&self, table: &str, id: Uuid, cloud_pc: Uuid, body: String) -> Result<()> {
        let sql = format!(
            "INSERT INTO {table} (id, cloud_pc_id, body) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET body = excluded.body"
        );
        sqlx::query(&sql).bind(id.to_string()).bind(cloud_pc.to_string()).bind(body).execute(&self.pool).await?;
        Ok(())
    }

    /// Shared body of user and group license changes; `table`/`column` name the grant table.
    #[allow(clippy::too_many_arguments)]
    async fn change_licenses(
        &self,
        owner_table: &'static str,
        owner_kind: &'static str,
        table: &'static str,
        column: &'static str,
        owner: Uuid,
        add: &[Uuid],
        remove: &[Uuid],
        audit: &AuditEvent,
    ) -> Result<()> {
        let owner = owner.to_string();
        let add: Vec<String> = add.iter().map(Uuid::to_string).collect();
        let remove: Vec<String> = remove.iter().map(Uuid::to_string).collect();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, owner_table, owner_kind, &owner).await?;
                for sku in &remove {
                    require(c, "skus", "subscribedSku", sku).await?;
                    let sql = format!("DELETE FROM {table} WHERE {column} = $1 AND sku_id = $2");
                    let done = sqlx::query(&sql).bind(&owner).bind(sku).execute(&mut *c).await?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::Conflict(format!(
                            "license '{sku}' cannot be removed because the {owner_kind} does not hold it directly"
                        )));
                    }
                }
                for sku in &add {
                    require(c, "skus", "subscribedSku", sku).await?;
                    let sql = format!(
                        "INSERT INTO {table} ({column}, sku_id, assigned_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
                    );
                    sqlx::query(&sql).bind(&owner).bind(sku).bind(ts(Utc::now())).execute(&mut *c).await?;
                }
                check_seats(c).await
            })
        })
        .await
    }
}

fn decode<T: DeserializeOwned>(body: &str) -> Result<T> {
    serde_json::from_str(body).map_err(StoreError::Corrupt)
}

fn encode<T: Serialize>(v: &T) -> String {
    // Serializing our own plain data types cannot fail.
    serde_json::to_string(v).expect("resource serializes to JSON")
}

fn versioned_from_row<T: Versioned>(row: &DbRow) -> Result<T> {
    let mut v: T = decode(row.get::<&str, _>("body"))?;
    v.set_row_version(row.get::<i64, _>("version") as u64);
    Ok(v)
}

fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::from_str(s).map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

fn phase_name(p: Phase) -> String {
    encode(&p).trim_matches('"').to_string()
}

async fn insert_audit(conn: &mut Conn, audit: &AuditEvent) -> Result<()> {
    sqlx::query("INSERT INTO audit_events (id, at, body) VALUES ($1, $2, $3)")
        .bind(audit.id.to_string())
        .bind(ts(audit.activity_date_time))
        .bind(encode(audit))
        .execute(conn)
        .await?;
    Ok(())
}

/// Turns a uniqueness violation into a sentence; anything else stays a database error.
fn unique_violation(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Database(e),
    }
}

async fn exists(conn: &mut Conn, table: &str, id: &str) -> Result<bool> {
    let sql = format!("SELECT 1 AS one FROM {table} WHERE id = $1");
    Ok(sqlx::query(&sql).bind(id).fetch_optional(conn).await?.is_some())
}

async fn require(conn: &mut Conn, table: &str, kind: &'static str, id: &str) -> Result<()> {
    if exists(conn, table, id).await? {
        Ok(())
    } else {
        Err(StoreError::not_found(kind, id))
    }
}

/// Compare-and-swap write of a versioned body: `Stale` when the row moved on, `NotFound` when
/// it is gone.
async fn update_versioned(
    conn: &mut Conn,
    table: &str,
    kind: &'static str,
    id: &str,
    version: u64,
    body: String,
) -> Result<()> {
    let sql = format!("UPDATE {table} SET body = $2, version = version + 1 WHERE id = $1 AND version = $3");
    let done = sqlx::query(&sql).bind(id).bind(body).bind(version as i64).execute(&mut *conn).await?;
    cas_outcome(conn, done.rows_affected(), table, kind, id).await
}

async fn cas_outcome(conn: &mut Conn, rows: u64, table: &str, kind: &'static str, id: &str) -> Result<()> {
    if rows == 1 {
        return Ok(());
    }
    if exists(conn, table, id).await? {
        Err(StoreError::Stale { kind, id: id.to_string() })
    } else {
        Err(StoreError::not_found(kind, id))
    }
}

async fn delete_row(conn: &mut Conn, table: &str, kind: &'static str, id: &str) -> Result<()> {
    let sql = format!("DELETE FROM {table} WHERE id = $1");
    let done = sqlx::query(&sql).bind(id).execute(conn).await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::not_found(kind, id));
    }
    Ok(())
}

const CONSUMED_SQL: &str = "SELECT sku_id, COUNT(DISTINCT user_id) AS n FROM (
        SELECT user_id, sku_id FROM user_licenses
        UNION ALL
        SELECT m.user_id, g.sku_id FROM group_licenses g JOIN group_members m ON m.group_id = g.group_id
    ) AS grants GROUP BY sku_id";

/// Fails if any SKU now has more holders than seats. Run inside a write, under the rules lock,
/// after it changed grants.
async fn check_seats(conn: &mut Conn) -> Result<()> {
    let sql = format!(
        "SELECT s.part_number, s.seats, c.n FROM skus s JOIN ({CONSUMED_SQL}) c ON c.sku_id = s.id WHERE c.n > s.seats LIMIT 1"
    );
    if let Some(row) = sqlx::query(&sql).fetch_optional(conn).await? {
        return Err(StoreError::SeatsExceeded {
            sku_part_number: row.get("part_number"),
            seats: row.get::<i64, _>("seats") as u32,
            needed: row.get::<i64, _>("n") as u32,
        });
    }
    Ok(())
}

async fn policy_names_using(conn: &mut Conn, where_sql: &str, id: &str) -> Result<Vec<String>> {
    let sql = format!("SELECT body FROM provisioning_policies WHERE {where_sql}");
    let rows = sqlx::query(&sql).bind(id).fetch_all(conn).await?;
    rows.iter().map(|r| decode::<ProvisioningPolicy>(r.get::<&str, _>("body")).map(|p| p.display_name)).collect()
}

async fn assigned_policy_names(conn: &mut Conn, group: &str) -> Result<Vec<String>> {
    policy_names_using(conn, "id IN (SELECT policy_id FROM policy_assignments WHERE group_id = $1)", group).await
}

/// Cloud PCs keep the image they were built from (their overlays sit on its files).
async fn refuse_if_cloud_pcs_use(conn: &mut Conn, image_id: &str) -> Result<()> {
    let rows = sqlx::query("SELECT id, body FROM cloud_pcs WHERE image_id = $1 ORDER BY created_at, id")
        .bind(image_id)
        .fetch_all(conn)
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut names = Vec::new();
    for r in &rows {
        let pc: CloudPc = decode(r.get::<&str, _>("body"))?;
        names.push(pc.managed_device_name.unwrap_or_else(|| r.get::<String, _>("id")));
    }
    Err(StoreError::Conflict(format!(
        "the image is used by Cloud PC {}; reprovision it from another image or let it be removed first",
        quoted(&names)
    )))
}

/// Inserts a host under the rules lock, with the next free subnet index unless it names one.
async fn insert_host(conn: &mut Conn, host: &Host) -> Result<Host> {
    lock_rules(conn).await?;
    let mut host = host.clone();
    if host.subnet_index == 0 && host.agent_address.is_some() {
        let row =
            sqlx::query("SELECT COALESCE(MAX(subnet_index), 0) + 1 AS n FROM hosts").fetch_one(&mut *conn).await?;
        host.subnet_index = row.get::<i64, _>("n") as u32;
    }
    let name = host.display_name.clone();
    sqlx::query("INSERT INTO hosts (id, name, subnet_index, created_at, body, version) VALUES ($1, $2, $3, $4, $5, 1)")
        .bind(host.id.to_string())
        .bind(&host.display_name)
        .bind(host.subnet_index as i64)
        .bind(ts(host.created_date_time))
        .bind(encode(&host))
        .execute(conn)
        .await
        .map_err(|e| unique_violation(e, || format!("a host named '{name}' exists already; choose another name")))?;
    host.row_version = 1;
    Ok(host)
}

fn quoted(names: &[String]) -> String {
    names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
}

/// What a Cloud PC takes of its host (vCPUs, MiB, GiB), for the per-host sums. A hibernated one
/// takes no vCPU or RAM; its save file (at most its RAM) takes disk next to its own.
fn size(r: &CloudPcRecord) -> (i64, i64, i64) {
    let Some(s) = r.state.spec.as_ref() else { return (0, 0, 0) };
    if saved(r) {
        return (0, 0, (s.storage_gib + s.memory_mib.div_ceil(1024)) as i64);
    }
    (i64::from(s.vcpus), s.memory_mib as i64, s.storage_gib as i64)
}

fn saved(r: &CloudPcRecord) -> bool {
    r.pc.power_state_detail == Some(cloudpc_types::cloud_pc::PowerStateDetail::Saved)
}

/// The warm pool (policy and fingerprint) the Cloud PC waits in, while it is claimable.
fn pool_ready_for(r: &CloudPcRecord) -> Option<String> {
    r.claimable_as()
}

fn record_from_row(row: &DbRow) -> Result<CloudPcRecord> {
    let pc: CloudPc = decode(row.get::<&str, _>("body"))?;
    let state: ProvisioningState = decode(row.get::<&str, _>("state"))?;
    let mut rec = CloudPcRecord::new(pc, state);
    rec.version = row.get::<i64, _>("version") as u64;
    rec.base = Some(std::sync::Arc::new((rec.pc.clone(), rec.state.clone())));
    Ok(rec)
}

fn token_from_row(row: &DbRow) -> Result<ApiToken> {
    let mut token: ApiToken = decode(row.get::<&str, _>("body"))?;
    if let Some(at) = get_opt_ts(row, "last_used_at")? {
        token.last_used_date_time = Some(at);
    }
    Ok(token)
}

fn bind_args<'q>(
    mut q: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>>,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s.as_str()),
            Arg::Int(i) => q.bind(*i),
            Arg::Real(f) => q.bind(*f),
            Arg::Path(p) => q.bind(p.clone()),
        };
    }
    q
}

#[async_trait]
impl Store for TheStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        self.list_versioned("users").await
    }

    async fn get_user(&self, id: Uuid) -> Result<User> {
        self.get_versioned("users", "user", &id.to_string()).await
    }

    async fn find_user_by_upn(&self, upn: &str) -> Result<User> {
        match sqlx::query("SELECT body, version FROM users WHERE lower(upn) = lower($1)")
            .bind(upn)
            .fetch_optional(&self.pool)
            .await?
        {
            Some(row) => versioned_from_row(&row),
            None => Err(StoreError::not_found("user", upn)),
        }
    }

    async fn create_user(&self, user: &User, password_hash: Option<&str>, audit: &AuditEvent) -> Result<()> {
        let (id, upn, at, body) =
            (user.id.to_string(), user.user_principal_name.clone(), ts(user.created_date_time), encode(user));
        let hash = password_hash.map(str::to_string);
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO users (id, upn, created_at, body, password_hash) VALUES ($1, $2, $3, $4, $5)")
                    .bind(id)
                    .bind(&upn)
                    .bind(at)
                    .bind(body)
                    .bind(hash)
                    .execute(c)
                    .await
                    .map_err(|e| {
                        unique_violation(e, || format!("a user with userPrincipalName '{upn}' already exists"))
                    })?;
                Ok(())
            })
        })
        .await
    }

    async fn update_user(&self, user: &User, password_hash: Option<&str>, audit: &AuditEvent) -> Result<()> {
        let (id, upn, body, version) =
            (user.id.to_string(), user.user_principal_name.clone(), encode(user), user.row_version);
        let hash = password_hash.map(str::to_string);
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE users SET upn = $2, body = $3, password_hash = COALESCE($4, password_hash), version = version + 1
                     WHERE id = $1 AND version = $5",
                )
                .bind(&id)
                .bind(&upn)
                .bind(body)
                .bind(hash.clone())
                .bind(version as i64)
                .execute(&mut *c)
                .await
                .map_err(|e| unique_violation(e, || format!("a user with userPrincipalName '{upn}' already exists")))?;
                cas_outcome(c, done.rows_affected(), "users", "user", &id).await?;
                if hash.is_some() {
                    // A new password ends every session signed in with the old one.
                    sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(&id).execute(&mut *c).await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn user_credentials(&self, upn: &str) -> Result<Option<(User, Option<String>)>> {
        let row = sqlx::query("SELECT body, version, password_hash FROM users WHERE lower(upn) = lower($1)")
            .bind(upn)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((versioned_from_row(&r)?, r.get::<Option<String>, _>("password_hash")))).transpose()
    }

    async fn create_session(&self, secret_sha256: &str, user: Uuid, expires: DateTime<Utc>) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE expires_at < $1").bind(ts(Utc::now())).execute(&self.pool).await?;
        sqlx::query("INSERT INTO sessions (secret_sha256, user_id, expires_at) VALUES ($1, $2, $3)")
            .bind(secret_sha256)
            .bind(user.to_string())
            .bind(ts(expires))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn find_session(&self, secret_sha256: &str) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.body, u.version FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.secret_sha256 = $1 AND s.expires_at > $2",
        )
        .bind(secret_sha256)
        .bind(ts(Utc::now()))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| versioned_from_row(&r)).transpose()
    }

    async fn delete_session(&self, secret_sha256: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE secret_sha256 = $1").bind(secret_sha256).execute(&self.pool).await?;
        Ok(())
    }

    async fn delete_user(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                // Rows that name the user go first (PostgreSQL checks references per statement).
                for sql in [
                    "DELETE FROM sessions WHERE user_id = $1",
                    "DELETE FROM group_members WHERE user_id = $1",
                    "DELETE FROM user_licenses WHERE user_id = $1",
                ] {
                    sqlx::query(sql).bind(&id).execute(&mut *c).await?;
                }
                delete_row(c, "users", "user", &id).await
            })
        })
        .await
    }

    async fn list_groups(&self) -> Result<Vec<Group>> {
        self.list_versioned("groups").await
    }

    async fn get_group(&self, id: Uuid) -> Result<Group> {
        self.get_versioned("groups", "group", &id.to_string()).await
    }

    async fn create_group(&self, group: &Group, audit: &AuditEvent) -> Result<()> {
        let (id, at, body) = (group.id.to_string(), ts(group.created_date_time), encode(group));
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO groups (id, created_at, body) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(at)
                    .bind(body)
                    .execute(c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn update_group(&self, group: &Group, audit: &AuditEvent) -> Result<()> {
        let (id, body, version) = (group.id.to_string(), encode(group), group.row_version);
        self.write(Some(audit), move |c| {
            Box::pin(async move { update_versioned(c, "groups", "group", &id, version, body).await })
        })
        .await
    }

    async fn delete_group(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, "groups", "group", &id).await?;
                let policies = assigned_policy_names(c, &id).await?;
                if !policies.is_empty() {
                    return Err(StoreError::Conflict(format!(
                        "the group is assigned to provisioning policy {}; remove it from the policy's assignments first",
                        quoted(&policies)
                    )));
                }
                for sql in ["DELETE FROM group_members WHERE group_id = $1", "DELETE FROM group_licenses WHERE group_id = $1"]
                {
                    sqlx::query(sql).bind(&id).execute(&mut *c).await?;
                }
                delete_row(c, "groups", "group", &id).await
            })
        })
        .await
    }

    async fn add_member(&self, group: Uuid, user: Uuid, audit: &AuditEvent) -> Result<()> {
        let (group, user) = (group.to_string(), user.to_string());
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, "groups", "group", &group).await?;
                require(c, "users", "user", &user).await?;
                sqlx::query("INSERT INTO group_members (group_id, user_id, added_at) VALUES ($1, $2, $3)")
                    .bind(&group)
                    .bind(&user)
                    .bind(ts(Utc::now()))
                    .execute(&mut *c)
                    .await
                    .map_err(|e| unique_violation(e, || format!("user '{user}' is already a member of the group")))?;
                check_seats(c).await
            })
        })
        .await
    }

    async fn remove_member(&self, group: Uuid, user: Uuid, audit: &AuditEvent) -> Result<()> {
        let (group, user) = (group.to_string(), user.to_string());
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                require(c, "groups", "group", &group).await?;
                let done = sqlx::query("DELETE FROM group_members WHERE group_id = $1 AND user_id = $2")
                    .bind(&group)
                    .bind(&user)
                    .execute(c)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::not_found("member", user));
                }
                Ok(())
            })
        })
        .await
    }

    async fn list_members(&self, group: Uuid) -> Result<Vec<User>> {
        let group = group.to_string();
        let mut conn = self.pool.acquire().await?;
        require(&mut conn, "groups", "group", &group).await?;
        let rows = sqlx::query(
            "SELECT u.body, u.version FROM group_members m JOIN users u ON u.id = m.user_id WHERE m.group_id = $1 ORDER BY m.added_at, u.id",
        )
        .bind(group)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(versioned_from_row).collect()
    }

    async fn list_groups_of_user(&self, user: Uuid) -> Result<Vec<Group>> {
        let user = user.to_string();
        let mut conn = self.pool.acquire().await?;
        require(&mut conn, "users", "user", &user).await?;
        let rows = sqlx::query(
            "SELECT g.body, g.version FROM group_members m JOIN groups g ON g.id = m.group_id WHERE m.user_id = $1 ORDER BY g.created_at, g.id",
        )
        .bind(user)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(versioned_from_row).collect()
    }

    async fn memberships(&self) -> Result<Vec<(Uuid, Uuid)>> {
        let rows = sqlx::query("SELECT group_id, user_id FROM group_members").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((parse_uuid(r.get("group_id"))?, parse_uuid(r.get("user_id"))?))).collect()
    }

    async fn list_skus(&self) -> Result<Vec<SubscribedSku>> {
        self.list_versioned("skus").await
    }

    async fn get_sku(&self, id: Uuid) -> Result<SubscribedSku> {
        self.get_versioned("skus", "subscribedSku", &id.to_string()).await
    }

    async fn create_sku(&self, sku: &SubscribedSku, audit: &AuditEvent) -> Result<()> {
        let (id, part, seats, body) =
            (sku.id.to_string(), sku.sku_part_number.clone(), sku.prepaid_units.enabled, encode(sku));
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO skus (id, part_number, seats, created_at, body) VALUES ($1, $2, $3, $4, $5)")
                    .bind(id)
                    .bind(&part)
                    .bind(seats as i64)
                    .bind(ts(Utc::now()))
                    .bind(body)
                    .execute(c)
                    .await
                    .map_err(|e| unique_violation(e, || format!("a SKU with skuPartNumber '{part}' already exists")))?;
                Ok(())
            })
        })
        .await
    }

    async fn update_sku(&self, sku: &SubscribedSku, audit: &AuditEvent) -> Result<()> {
        let (id, part, seats, body, version) =
            (sku.id.to_string(), sku.sku_part_number.clone(), sku.prepaid_units.enabled, encode(sku), sku.row_version);
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                let done = sqlx::query(
                    "UPDATE skus SET part_number = $2, seats = $3, body = $4, version = version + 1 WHERE id = $1 AND version = $5",
                )
                .bind(&id)
                .bind(&part)
                .bind(seats as i64)
                .bind(body)
                .bind(version as i64)
                .execute(&mut *c)
                .await
                .map_err(|e| unique_violation(e, || format!("a SKU with skuPartNumber '{part}' already exists")))?;
                cas_outcome(c, done.rows_affected(), "skus", "subscribedSku", &id).await?;
                check_seats(c).await
            })
        })
        .await
    }

    async fn delete_sku(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, "skus", "subscribedSku", &id).await?;
                let held = sqlx::query(
                    "SELECT (SELECT COUNT(*) FROM user_licenses WHERE sku_id = $1) + (SELECT COUNT(*) FROM group_licenses WHERE sku_id = $1) AS n",
                )
                .bind(&id)
                .fetch_one(&mut *c)
                .await?
                .get::<i64, _>("n");
                if held > 0 {
                    return Err(StoreError::Conflict(format!(
                        "the SKU is still assigned {held} time(s); remove it from every user and group first"
                    )));
                }
                delete_row(c, "skus", "subscribedSku", &id).await
            })
        })
        .await
    }

    async fn consumed_units(&self) -> Result<HashMap<Uuid, u32>> {
        let rows = sqlx::query(CONSUMED_SQL).fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((parse_uuid(r.get("sku_id"))?, r.get::<i64, _>("n") as u32))).collect()
    }

    async fn change_user_licenses(&self, user: Uuid, add: &[Uuid], remove: &[Uuid], audit: &AuditEvent) -> Result<()> {
        self.change_licenses("users", "user", "user_licenses", "user_id", user, add, remove, audit).await
    }

    async fn change_group_licenses(
        &self,
        group: Uuid,
        add: &[Uuid],
        remove: &[Uuid],
        audit: &AuditEvent,
    ) -> Result<()> {
        self.change_licenses("groups", "group", "group_licenses", "group_id", group, add, remove, audit).await
    }

    async fn group_licenses(&self, group: Uuid) -> Result<Vec<Uuid>> {
        let rows = sqlx::query("SELECT sku_id FROM group_licenses WHERE group_id = $1 ORDER BY assigned_at, sku_id")
            .bind(group.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| parse_uuid(r.get("sku_id"))).collect()
    }

    async fn license_grants(&self) -> Result<Vec<LicenseGrant>> {
        let rows = sqlx::query(
            "SELECT user_id, sku_id, NULL AS group_id, assigned_at FROM user_licenses
             UNION ALL
             SELECT m.user_id, g.sku_id, g.group_id, g.assigned_at FROM group_licenses g JOIN group_members m ON m.group_id = g.group_id
             ORDER BY assigned_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LicenseGrant {
                    user_id: parse_uuid(r.get("user_id"))?,
                    sku_id: parse_uuid(r.get("sku_id"))?,
                    via_group: r.get::<Option<&str>, _>("group_id").map(parse_uuid).transpose()?,
                })
            })
            .collect()
    }

    async fn list_gallery_images(&self) -> Result<Vec<GalleryImage>> {
        self.list_bodies("SELECT body FROM gallery_images ORDER BY id").await
    }

    async fn get_gallery_image(&self, id: &str) -> Result<GalleryImage> {
        self.get_body("gallery_images", "galleryImage", id).await
    }

    async fn list_device_images(&self) -> Result<Vec<DeviceImage>> {
        self.list_versioned("device_images").await
    }

    async fn get_device_image(&self, id: Uuid) -> Result<DeviceImage> {
        self.get_versioned("device_images", "deviceImage", &id.to_string()).await
    }

    async fn create_device_image(&self, image: &DeviceImage, audit: &AuditEvent) -> Result<()> {
        let (id, body) = (image.id.to_string(), encode(image));
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO device_images (id, created_at, body) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(ts(Utc::now()))
                    .bind(body)
                    .execute(c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn update_device_image(&self, image: &DeviceImage, audit: &AuditEvent) -> Result<()> {
        let (id, body, version) = (image.id.to_string(), encode(image), image.row_version);
        self.write(Some(audit), move |c| {
            Box::pin(async move { update_versioned(c, "device_images", "deviceImage", &id, version, body).await })
        })
        .await
    }

    async fn delete_device_image(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, "device_images", "deviceImage", &id).await?;
                let users = policy_names_using(c, "image_type = 'custom' AND image_id = $1", &id).await?;
                if !users.is_empty() {
                    return Err(StoreError::Conflict(format!(
                        "the image is used by provisioning policy {}; point the policy at another image first",
                        quoted(&users)
                    )));
                }
                refuse_if_cloud_pcs_use(c, &id).await?;
                delete_row(c, "device_images", "deviceImage", &id).await
            })
        })
        .await
    }

    async fn list_policies(&self) -> Result<Vec<ProvisioningPolicy>> {
        self.list_versioned("provisioning_policies").await
    }

    async fn get_policy(&self, id: Uuid) -> Result<ProvisioningPolicy> {
        self.get_versioned("provisioning_policies", "provisioningPolicy", &id.to_string()).await
    }

    async fn create_policy(&self, policy: &ProvisioningPolicy, audit: &AuditEvent) -> Result<()> {
        let p = policy.clone();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, image_table(p.image_type), "image", &p.image_id).await?;
                sqlx::query(
                    "INSERT INTO provisioning_policies (id, image_type, image_id, created_at, body) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(p.id.to_string())
                .bind(encode(&p.image_type).trim_matches('"').to_string())
                .bind(&p.image_id)
                .bind(ts(p.created_date_time))
                .bind(encode(&p))
                .execute(c)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn update_policy(&self, policy: &ProvisioningPolicy, audit: &AuditEvent) -> Result<()> {
        let p = policy.clone();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, image_table(p.image_type), "image", &p.image_id).await?;
                let id = p.id.to_string();
                let done = sqlx::query(
                    "UPDATE provisioning_policies SET image_type = $2, image_id = $3, body = $4, version = version + 1
                     WHERE id = $1 AND version = $5",
                )
                .bind(&id)
                .bind(encode(&p.image_type).trim_matches('"').to_string())
                .bind(&p.image_id)
                .bind(encode(&p))
                .bind(p.row_version as i64)
                .execute(&mut *c)
                .await?;
                cas_outcome(c, done.rows_affected(), "provisioning_policies", "provisioningPolicy", &id).await
            })
        })
        .await
    }

    async fn delete_policy(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, "provisioning_policies", "provisioningPolicy", &id).await?;
                let n = sqlx::query("SELECT COUNT(*) AS n FROM policy_assignments WHERE policy_id = $1")
                    .bind(&id)
                    .fetch_one(&mut *c)
                    .await?
                    .get::<i64, _>("n");
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "the policy is still assigned to {n} group(s); assign it to no groups before deleting it"
                    )));
                }
                delete_row(c, "provisioning_policies", "provisioningPolicy", &id).await
            })
        })
        .await
    }

    async fn set_policy_assignments(&self, policy: Uuid, groups: &[Uuid], audit: &AuditEvent) -> Result<()> {
        let policy = policy.to_string();
        let groups: Vec<String> = groups.iter().map(Uuid::to_string).collect();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, "provisioning_policies", "provisioningPolicy", &policy).await?;
                let rows = sqlx::query("SELECT group_id, assigned_at FROM policy_assignments WHERE policy_id = $1")
                    .bind(&policy)
                    .fetch_all(&mut *c)
                    .await?;
                let mut kept: HashMap<String, DateTime<Utc>> = HashMap::new();
                for r in &rows {
                    kept.insert(r.get("group_id"), get_ts(r, "assigned_at")?);
                }
                sqlx::query("DELETE FROM policy_assignments WHERE policy_id = $1")
                    .bind(&policy)
                    .execute(&mut *c)
                    .await?;
                let at = Utc::now();
                for (position, group) in groups.iter().enumerate() {
                    require(c, "groups", "group", group).await?;
                    let assigned_at = kept.get(group).copied().unwrap_or(at);
                    sqlx::query(
                        "INSERT INTO policy_assignments (policy_id, group_id, position, assigned_at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(&policy)
                    .bind(group)
                    .bind(position as i64)
                    .bind(ts(assigned_at))
                    .execute(&mut *c)
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn list_assignments(&self) -> Result<Vec<StoredAssignment>> {
        let rows = sqlx::query(
            "SELECT policy_id, group_id, position, assigned_at FROM policy_assignments ORDER BY assigned_at, policy_id, position",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredAssignment {
                    policy_id: parse_uuid(r.get("policy_id"))?,
                    group_id: parse_uuid(r.get("group_id"))?,
                    position: r.get::<i64, _>("position") as u32,
                    assigned_at: get_ts(r, "assigned_at")?,
                })
            })
            .collect()
    }

    async fn upsert_gallery_image(&self, image: &GalleryImage, disk: &Path, boot: Option<&KernelBoot>) -> Result<()> {
        sqlx::query(
            "INSERT INTO gallery_images (id, body, disk, boot) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, disk = excluded.disk, boot = excluded.boot",
        )
        .bind(&image.id)
        .bind(encode(image))
        .bind(disk.to_string_lossy().to_string())
        .bind(boot.map(encode))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_gallery_image(&self, id: &str, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                require(c, "gallery_images", "galleryImage", &id).await?;
                let users = policy_names_using(c, "image_type = 'gallery' AND image_id = $1", &id).await?;
                if !users.is_empty() {
                    return Err(StoreError::Conflict(format!(
                        "the image is used by provisioning policy {}; point the policy at another image first",
                        quoted(&users)
                    )));
                }
                refuse_if_cloud_pcs_use(c, &id).await?;
                delete_row(c, "gallery_images", "galleryImage", &id).await
            })
        })
        .await
    }

    async fn gallery_image_files(&self, id: &str) -> Result<(std::path::PathBuf, Option<KernelBoot>)> {
        let row = sqlx::query("SELECT disk, boot FROM gallery_images WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("galleryImage", id))?;
        let boot = row.get::<Option<&str>, _>("boot").map(decode).transpose()?;
        Ok((std::path::PathBuf::from(row.get::<&str, _>("disk")), boot))
    }

    async fn list_cloud_pcs(&self) -> Result<Vec<CloudPc>> {
        self.list_bodies("SELECT body FROM cloud_pcs ORDER BY created_at, id").await
    }

    async fn get_cloud_pc(&self, id: Uuid) -> Result<CloudPc> {
        self.get_body("cloud_pcs", "cloudPC", &id.to_string()).await
    }

    async fn list_cloud_pc_records(&self) -> Result<Vec<CloudPcRecord>> {
        let rows = sqlx::query("SELECT body, state, version FROM cloud_pcs ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(record_from_row).collect()
    }

    async fn get_cloud_pc_record(&self, id: Uuid) -> Result<CloudPcRecord> {
        let row = sqlx::query("SELECT body, state, version FROM cloud_pcs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("cloudPC", id))?;
        record_from_row(&row)
    }

    async fn insert_cloud_pc(&self, record: &mut CloudPcRecord, audit: Option<&AuditEvent>) -> Result<()> {
        let r = record.clone();
        self.write(audit, move |c| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO cloud_pcs (id, user_id, sku_id, policy_id, created_at, body, state, image_id, phase, version,
                                            host, vcpus, memory_mib, storage_gib, saved, pool_ready_for)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, $12, $13, $14, $15)",
                )
                .bind(r.pc.id.to_string())
                .bind(r.state.user_id.to_string())
                .bind(r.state.sku_id.to_string())
                .bind(r.pc.provisioning_policy_id.map(|p| p.to_string()))
                .bind(ts(Utc::now()))
                .bind(encode(&r.pc))
                .bind(encode(&r.state))
                .bind(r.state.spec.as_ref().map(|s| s.image_id.clone()))
                .bind(phase_name(r.state.phase))
                .bind(r.state.resources.host.clone())
                .bind(size(&r).0)
                .bind(size(&r).1)
                .bind(size(&r).2)
                .bind(i64::from(saved(&r)))
                .bind(pool_ready_for(&r))
                .execute(c)
                .await
                .map_err(|e| unique_violation(e, || "the user already has a Cloud PC for this license".into()))?;
                Ok(())
            })
        })
        .await?;
        record.version = 1;
        record.base = Some(std::sync::Arc::new((record.pc.clone(), record.state.clone())));
        Ok(())
    }

    async fn claim_pooled(&self, pool: &str, sku: Uuid, assign: ClaimFn) -> Result<Option<CloudPcRecord>> {
        let (pool, sku) = (pool.to_string(), sku.to_string());
        self.write(None, move |c| {
            Box::pin(async move {
                let sql = format!(
                    "SELECT id, body, state, version FROM cloud_pcs WHERE pool_ready_for = $1 AND sku_id = $2
                     ORDER BY created_at, id LIMIT 1{SKIP_LOCKED}"
                );
                let Some(row) = sqlx::query(&sql).bind(&pool).bind(&sku).fetch_optional(&mut *c).await? else {
                    return Ok(None);
                };
                let mut r = record_from_row(&row)?;
                let audit = assign(&mut r);
                sqlx::query(
                    "UPDATE cloud_pcs SET user_id = $2, policy_id = $3, body = $4, state = $5, phase = $6,
                                          pool_ready_for = $7, version = version + 1
                     WHERE id = $1",
                )
                .bind(r.pc.id.to_string())
                .bind(r.state.user_id.to_string())
                .bind(r.pc.provisioning_policy_id.map(|p| p.to_string()))
                .bind(encode(&r.pc))
                .bind(encode(&r.state))
                .bind(phase_name(r.state.phase))
                .bind(pool_ready_for(&r))
                .execute(&mut *c)
                .await
                .map_err(|e| unique_violation(e, || "the user already has a Cloud PC for this license".into()))?;
                insert_audit(&mut *c, &audit).await?;
                r.version += 1;
                r.base = Some(std::sync::Arc::new((r.pc.clone(), r.state.clone())));
                Ok(Some(r))
            })
        })
        .await
    }

    async fn save_cloud_pc(
        &self,
        record: &mut CloudPcRecord,
        step: Option<&ProvisioningStepRecord>,
        audit: Option<&AuditEvent>,
        lease: Option<&str>,
    ) -> Result<()> {
        let r = record.clone();
        let step = step.cloned();
        let lease = lease.map(str::to_string);
        self.write(audit, move |c| {
            Box::pin(async move {
                let id = r.pc.id.to_string();
                let done = sqlx::query(
                    "UPDATE cloud_pcs SET policy_id = $2, body = $3, state = $4, image_id = $5, phase = $6, version = version + 1,
                                          host = $10, vcpus = $11, memory_mib = $12, storage_gib = $13, saved = $14,
                                          pool_ready_for = $15
                     WHERE id = $1 AND version = $7 AND ($8 IS NULL OR (lease_owner = $8 AND lease_expires_at > $9))",
                )
                .bind(&id)
                .bind(r.pc.provisioning_policy_id.map(|p| p.to_string()))
                .bind(encode(&r.pc))
                .bind(encode(&r.state))
                .bind(r.state.spec.as_ref().map(|s| s.image_id.clone()))
                .bind(phase_name(r.state.phase))
                .bind(r.version as i64)
                .bind(lease.clone())
                .bind(ts(Utc::now()))
                .bind(r.state.resources.host.clone())
                .bind(size(&r).0)
                .bind(size(&r).1)
                .bind(size(&r).2)
                .bind(i64::from(saved(&r)))
                .bind(pool_ready_for(&r))
                .execute(&mut *c)
                .await?;
                if done.rows_affected() == 0 {
                    let row = sqlx::query("SELECT version, lease_owner FROM cloud_pcs WHERE id = $1")
                        .bind(&id)
                        .fetch_optional(&mut *c)
                        .await?;
                    return Err(match row {
                        None => StoreError::not_found("cloudPC", &id),
                        Some(row) if row.get::<i64, _>("version") as u64 != r.version => {
                            StoreError::Stale { kind: "cloudPC", id }
                        }
                        Some(_) => StoreError::LeaseLost(id),
                    });
                }
                if let Some(s) = step {
                    sqlx::query(
                        "INSERT INTO provisioning_steps (cloud_pc_id, generation, attempt, name, started_at, body) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (cloud_pc_id, generation, attempt, name) DO UPDATE SET body = excluded.body",
                    )
                    .bind(s.cloud_pc_id.to_string())
                    .bind(s.generation as i64)
                    .bind(s.attempt as i64)
                    .bind(&s.name)
                    .bind(ts(s.start_date_time))
                    .bind(encode(&s))
                    .execute(&mut *c)
                    .await?;
                }
                Ok(())
            })
        })
        .await?;
        record.version += 1;
        record.base = Some(std::sync::Arc::new((record.pc.clone(), record.state.clone())));
        Ok(())
    }

    async fn delete_cloud_pc(&self, id: Uuid, audit: Option<&AuditEvent>) -> Result<()> {
        let id = id.to_string();
        self.write(audit, move |c| {
            Box::pin(async move {
                sqlx::query("DELETE FROM provisioning_steps WHERE cloud_pc_id = $1").bind(&id).execute(&mut *c).await?;
                sqlx::query("DELETE FROM console_tickets WHERE cloud_pc_id = $1").bind(&id).execute(&mut *c).await?;
                // Its console's in-use mark (a named lease, `console:<id>`; see cloudpc-control's
                // console.rs) goes with it.
                sqlx::query("DELETE FROM leases WHERE name = $1")
                    .bind(format!("console:{id}"))
                    .execute(&mut *c)
                    .await?;
                delete_row(c, "cloud_pcs", "cloudPC", &id).await
            })
        })
        .await
    }

    async fn list_steps(&self, cloud_pc: Uuid) -> Result<Vec<ProvisioningStepRecord>> {
        let rows = sqlx::query(
            "SELECT body FROM provisioning_steps WHERE cloud_pc_id = $1 ORDER BY generation, attempt, started_at, name",
        )
        .bind(cloud_pc.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| decode(r.get::<&str, _>("body"))).collect()
    }

    async fn put_device(&self, device: &Device) -> Result<()> {
        self.put_row("devices", device.id, device.cloud_pc_id, encode(device)).await
    }

    async fn delete_device(&self, id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM devices WHERE id = $1").bind(id.to_string()).execute(&self.pool).await?;
        Ok(())
    }

    async fn list_devices(&self) -> Result<Vec<Device>> {
        self.list_bodies("SELECT body FROM devices ORDER BY id").await
    }

    async fn put_managed_device(&self, device: &ManagedDevice) -> Result<()> {
        self.put_row("managed_devices", device.id, device.cloud_pc_id, encode(device)).await
    }

    async fn get_managed_device(&self, id: Uuid) -> Result<ManagedDevice> {
        self.get_body("managed_devices", "managedDevice", &id.to_string()).await
    }

    async fn delete_managed_device(&self, id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM managed_devices WHERE id = $1").bind(id.to_string()).execute(&self.pool).await?;
        Ok(())
    }

    async fn list_managed_devices(&self) -> Result<Vec<ManagedDevice>> {
        self.list_bodies("SELECT body FROM managed_devices ORDER BY id").await
    }

    async fn record_audit_event(&self, audit: &AuditEvent) -> Result<()> {
        self.write(Some(audit), |_| Box::pin(async { Ok(()) })).await
    }

    async fn list_audit_events(&self) -> Result<Vec<AuditEvent>> {
        self.list_bodies("SELECT body FROM audit_events ORDER BY seq").await
    }

    async fn audit_events_page(
        &self,
        filter: &[FieldEquals],
        skip: usize,
        top: usize,
    ) -> Result<(Vec<AuditEvent>, usize)> {
        let (bodies, total) = self.page_bodies("audit_events", "seq", filter, skip, top).await?;
        Ok((bodies.iter().map(|b| decode(b)).collect::<Result<Vec<_>>>()?, total))
    }

    async fn list_page(
        &self,
        listing: Listing,
        filter: &[FieldEquals],
        skip: usize,
        top: usize,
    ) -> Result<(Vec<serde_json::Value>, usize)> {
        let (bodies, total) = self.page_bodies(listing.table(), "created_at, id", filter, skip, top).await?;
        Ok((bodies.iter().map(|b| decode(b)).collect::<Result<Vec<_>>>()?, total))
    }

    async fn get_audit_event(&self, id: Uuid) -> Result<AuditEvent> {
        self.get_body("audit_events", "auditEvent", &id.to_string()).await
    }

    async fn prune_audit_events(&self, days: u32) -> Result<u64> {
        let days = i64::from(days.max(1));
        let cutoff = Utc::now() - chrono::Duration::days(days);
        self.write(None, move |c| {
            Box::pin(async move {
                sqlx::query("UPDATE audit_retention SET days = $1 WHERE id = 1").bind(days).execute(&mut *c).await?;
                let done =
                    sqlx::query("DELETE FROM audit_events WHERE at < $1").bind(ts(cutoff)).execute(&mut *c).await?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    async fn revoke_token(&self, id: Uuid, audit: &AuditEvent) -> Result<ApiToken> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                let row = sqlx::query("SELECT body, last_used_at FROM api_tokens WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(&mut *c)
                    .await?;
                let Some(row) = row else { return Err(StoreError::not_found("apiToken", &id)) };
                let token = token_from_row(&row)?;
                sqlx::query("DELETE FROM api_tokens WHERE id = $1").bind(&id).execute(&mut *c).await?;
                // Tokens that expire (a console signed in through a provider) do not keep anyone in
                // for good, so only lasting administrator tokens count.
                let sql = format!(
                    "SELECT COUNT(*) AS n FROM api_tokens WHERE role = 'cloudPcAdministrator' AND {} IS NULL",
                    json_text(1)
                );
                let args = [Arg::Path(json_path(&["expirationDateTime".to_string()]))];
                let admins: i64 = bind_args(sqlx::query(&sql), &args).fetch_one(&mut *c).await?.get("n");
                if admins == 0 {
                    return Err(StoreError::Conflict(
                        "this is the last administrator token that does not expire; create another before revoking it"
                            .into(),
                    ));
                }
                Ok(token)
            })
        })
        .await
    }

    async fn touch_token(&self, id: Uuid, at: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(ts(at))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_token(&self, token: &ApiToken, secret_sha256: &str, audit: Option<&AuditEvent>) -> Result<()> {
        let (id, hash, at, body) =
            (token.id.to_string(), secret_sha256.to_string(), ts(token.created_date_time), encode(token));
        let role = encode(&token.role).trim_matches('"').to_string();
        self.write(audit, move |c| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO api_tokens (id, secret_sha256, created_at, body, role) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(hash)
                .bind(at)
                .bind(body)
                .bind(role)
                .execute(c)
                .await
                .map_err(|e| unique_violation(e, || "a token with this secret already exists".into()))?;
                Ok(())
            })
        })
        .await
    }

    async fn find_token(&self, secret_sha256: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query("SELECT body, last_used_at FROM api_tokens WHERE secret_sha256 = $1")
            .bind(secret_sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| token_from_row(&r)).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query("SELECT body, last_used_at FROM api_tokens ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn list_hosts(&self) -> Result<Vec<HostRow>> {
        let rows = sqlx::query("SELECT body, version, report, heartbeat_at FROM hosts ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(HostRow {
                    host: versioned_from_row(r)?,
                    report: r.get::<Option<String>, _>("report").map(|t| decode(&t)).transpose()?,
                    heartbeat: get_opt_ts(r, "heartbeat_at")?,
                })
            })
            .collect()
    }

    async fn create_host(&self, host: &Host, audit: Option<&AuditEvent>) -> Result<Host> {
        let host = host.clone();
        self.write(audit, move |c| Box::pin(async move { insert_host(c, &host).await })).await
    }

    async fn join_host(&self, token_sha256: &str, host: &Host, audit: &AuditEvent) -> Result<Host> {
        let (hash, host) = (token_sha256.to_string(), host.clone());
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                // DELETE … RETURNING: of two hosts joining with one token, one gets the row.
                let row = sqlx::query("DELETE FROM host_join_tokens WHERE secret_sha256 = $1 RETURNING region, expires_at")
                    .bind(&hash)
                    .fetch_optional(&mut *c)
                    .await?;
                let refused = || StoreError::Conflict("the join token is not valid: it is unknown, used already, or expired; ask an administrator for a new one".into());
                let Some(row) = row else { return Err(refused()) };
                if get_ts(&row, "expires_at")? <= Utc::now() {
                    return Err(refused());
                }
                let mut host = host;
                host.region = row.get::<String, _>("region");
                insert_host(c, &host).await
            })
        })
        .await
    }

    async fn update_host(&self, host: &Host, audit: &AuditEvent) -> Result<()> {
        let (id, body, version) = (host.id.to_string(), encode(host), host.row_version);
        self.write(Some(audit), move |c| {
            Box::pin(async move { update_versioned(c, "hosts", "host", &id, version, body).await })
        })
        .await
    }

    async fn delete_host(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                let row = sqlx::query("SELECT name FROM hosts WHERE id = $1").bind(&id).fetch_optional(&mut *c).await?;
                let Some(row) = row else { return Err(StoreError::not_found("host", &id)) };
                let name = row.get::<String, _>("name");
                let n = sqlx::query("SELECT COUNT(*) AS n FROM cloud_pcs WHERE host = $1")
                    .bind(&name)
                    .fetch_one(&mut *c)
                    .await?
                    .get::<i64, _>("n");
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "host '{name}' still has {n} Cloud PC(s); drain or evacuate it first"
                    )));
                }
                delete_row(c, "hosts", "host", &id).await
            })
        })
        .await
    }

    async fn record_host_report(&self, id: Uuid, report: &serde_json::Value, at: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE hosts SET report = $2, heartbeat_at = $3 WHERE id = $1")
            .bind(id.to_string())
            .bind(report.to_string())
            .bind(ts(at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn host_usage(&self) -> Result<HashMap<String, HostUsage>> {
        let rows = sqlx::query(
            "SELECT host, COUNT(*) AS n, CAST(SUM(vcpus) AS BIGINT) AS vcpus, CAST(SUM(memory_mib) AS BIGINT) AS memory_mib,
                    CAST(SUM(storage_gib) AS BIGINT) AS storage_gib, CAST(SUM(saved) AS BIGINT) AS saved
             FROM cloud_pcs WHERE host IS NOT NULL GROUP BY host",
        )
        .fetch_all(&self.pool)
        .await?;
        let num = |r: &DbRow, c: &str| {
            r.try_get::<i64, _>(c).or_else(|_| r.try_get::<Option<i64>, _>(c).map(Option::unwrap_or_default))
        };
        rows.iter()
            .map(|r| {
                Ok((
                    r.get::<String, _>("host"),
                    HostUsage {
                        cloud_pcs: num(r, "n")? as u64,
                        vcpus: num(r, "vcpus")? as u64,
                        memory_mib: num(r, "memory_mib")? as u64,
                        storage_gib: num(r, "storage_gib")? as u64,
                        saved: num(r, "saved")? as u64,
                    },
                ))
            })
            .collect()
    }

    async fn put_join_token(
        &self,
        secret_sha256: &str,
        region: &str,
        expires: DateTime<Utc>,
        audit: &AuditEvent,
    ) -> Result<()> {
        let (hash, region) = (secret_sha256.to_string(), region.to_string());
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                sqlx::query("DELETE FROM host_join_tokens WHERE expires_at < $1")
                    .bind(ts(Utc::now()))
                    .execute(&mut *c)
                    .await?;
                sqlx::query("INSERT INTO host_join_tokens (secret_sha256, region, expires_at) VALUES ($1, $2, $3)")
                    .bind(hash)
                    .bind(region)
                    .bind(ts(expires))
                    .execute(c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn init_secret(&self, name: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM secrets WHERE name = $1").bind(name).fetch_one(&self.pool).await?;
        Ok(row.get::<String, _>("value"))
    }

    async fn list_network_connections(&self) -> Result<Vec<OnPremisesConnection>> {
        self.list_versioned("network_connections").await
    }

    async fn create_network_connection(
        &self,
        connection: &OnPremisesConnection,
        sealed_password: Option<&str>,
        audit: &AuditEvent,
    ) -> Result<()> {
        let (id, name, at, body) = (
            connection.id.to_string(),
            connection.display_name.clone(),
            ts(connection.created_date_time),
            encode(connection),
        );
        let sealed = sealed_password.map(str::to_string);
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO network_connections (id, name, created_at, body, sealed_password) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(&name)
                .bind(at)
                .bind(body)
                .bind(sealed)
                .execute(c)
                .await
                .map_err(|e| unique_violation(e, || format!("a network connection named '{name}' already exists")))?;
                Ok(())
            })
        })
        .await
    }

    async fn update_network_connection(
        &self,
        connection: &OnPremisesConnection,
        sealed_password: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<()> {
        let (id, name, body, version) =
            (connection.id.to_string(), connection.display_name.clone(), encode(connection), connection.row_version);
        let sealed = sealed_password.map(str::to_string);
        self.write(audit, move |c| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE network_connections SET name = $2, body = $3,
                     sealed_password = COALESCE($4, sealed_password), version = version + 1
                     WHERE id = $1 AND version = $5",
                )
                .bind(&id)
                .bind(&name)
                .bind(body)
                .bind(sealed)
                .bind(version as i64)
                .execute(&mut *c)
                .await
                .map_err(|e| unique_violation(e, || format!("a network connection named '{name}' already exists")))?;
                cas_outcome(c, done.rows_affected(), "network_connections", "onPremisesConnection", &id).await
            })
        })
        .await
    }

    async fn delete_network_connection(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                // A policy names the connection by id inside its body; ids are UUIDs, so a quoted
                // match cannot hit anything else.
                let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM provisioning_policies WHERE body LIKE $1")
                    .bind(format!("%\"{id}\"%"))
                    .fetch_one(&mut *c)
                    .await?
                    .get("n");
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "the connection is used by {n} provisioning polic{}; remove it from {} first",
                        if n == 1 { "y" } else { "ies" },
                        if n == 1 { "that policy" } else { "those policies" }
                    )));
                }
                delete_row(c, "network_connections", "onPremisesConnection", &id).await
            })
        })
        .await
    }

    async fn network_connection_password(&self, id: Uuid) -> Result<Option<String>> {
        let row = sqlx::query("SELECT sealed_password FROM network_connections WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(r.get::<Option<String>, _>("sealed_password")),
            None => Err(StoreError::not_found("onPremisesConnection", id.to_string())),
        }
    }

    async fn list_identity_providers(&self) -> Result<Vec<IdentityProvider>> {
        self.list_versioned("identity_providers").await
    }

    async fn create_identity_provider(
        &self,
        provider: &IdentityProvider,
        client_secret: Option<&str>,
        audit: &AuditEvent,
    ) -> Result<()> {
        let (id, name, at, body) =
            (provider.id.to_string(), provider.display_name.clone(), ts(provider.created_date_time), encode(provider));
        let secret = client_secret.map(str::to_string);
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO identity_providers (id, name, created_at, body, client_secret) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(&name)
                .bind(at)
                .bind(body)
                .bind(secret)
                .execute(c)
                .await
                .map_err(|e| unique_violation(e, || format!("an identity provider named '{name}' already exists")))?;
                Ok(())
            })
        })
        .await
    }

    async fn update_identity_provider(
        &self,
        provider: &IdentityProvider,
        client_secret: Option<&str>,
        audit: &AuditEvent,
    ) -> Result<()> {
        let (id, name, body, version) =
            (provider.id.to_string(), provider.display_name.clone(), encode(provider), provider.row_version);
        let secret = client_secret.map(str::to_string);
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE identity_providers SET name = $2, body = $3, client_secret = COALESCE($4, client_secret),
                     version = version + 1 WHERE id = $1 AND version = $5",
                )
                .bind(&id)
                .bind(&name)
                .bind(body)
                .bind(secret)
                .bind(version as i64)
                .execute(&mut *c)
                .await
                .map_err(|e| unique_violation(e, || format!("an identity provider named '{name}' already exists")))?;
                cas_outcome(c, done.rows_affected(), "identity_providers", "identityProvider", &id).await
            })
        })
        .await
    }

    async fn delete_identity_provider(&self, id: Uuid, audit: &AuditEvent) -> Result<()> {
        let id = id.to_string();
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                let path = json_path(&["identityProviderId".to_string()]);
                let mut managed = Vec::new();
                for table in ["users", "groups"] {
                    let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE {} = $2", json_text(1));
                    let args = [Arg::Path(path.clone()), Arg::Text(id.clone())];
                    let n = bind_args(sqlx::query(&sql), &args).fetch_one(&mut *c).await?.get::<i64, _>("n");
                    if n > 0 {
                        managed.push(format!("{n} {}", if n == 1 { &table[..table.len() - 1] } else { table }));
                    }
                }
                if !managed.is_empty() {
                    return Err(StoreError::Conflict(format!(
                        "the provider still manages {}; remove them through the provider (or its SCIM connection) first",
                        managed.join(" and ")
                    )));
                }
                delete_row(c, "identity_providers", "identityProvider", &id).await
            })
        })
        .await
    }

    async fn identity_provider_secret(&self, id: Uuid) -> Result<Option<String>> {
        let row = sqlx::query("SELECT client_secret FROM identity_providers WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| r.get::<Option<String>, _>("client_secret")))
    }

    async fn set_scim_token(&self, provider: &IdentityProvider, secret_sha256: &str, audit: &AuditEvent) -> Result<()> {
        let (id, body, version, hash) =
            (provider.id.to_string(), encode(provider), provider.row_version, secret_sha256.to_string());
        self.write(Some(audit), move |c| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE identity_providers SET scim_token_sha256 = $2, body = $3, version = version + 1
                     WHERE id = $1 AND version = $4",
                )
                .bind(&id)
                .bind(hash)
                .bind(body)
                .bind(version as i64)
                .execute(&mut *c)
                .await?;
                cas_outcome(c, done.rows_affected(), "identity_providers", "identityProvider", &id).await
            })
        })
        .await
    }

    async fn find_provider_by_scim_token(&self, secret_sha256: &str) -> Result<Option<IdentityProvider>> {
        let row = sqlx::query("SELECT body, version FROM identity_providers WHERE scim_token_sha256 = $1")
            .bind(secret_sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| versioned_from_row(&r)).transpose()
    }

    async fn put_oidc_login(&self, state_sha256: &str, body: &serde_json::Value, expires: DateTime<Utc>) -> Result<()> {
        sqlx::query("DELETE FROM oidc_logins WHERE expires_at < $1").bind(ts(Utc::now())).execute(&self.pool).await?;
        sqlx::query("INSERT INTO oidc_logins (state_sha256, body, expires_at) VALUES ($1, $2, $3)")
            .bind(state_sha256)
            .bind(body.to_string())
            .bind(ts(expires))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn take_oidc_login(&self, state_sha256: &str) -> Result<Option<serde_json::Value>> {
        let row = sqlx::query("DELETE FROM oidc_logins WHERE state_sha256 = $1 RETURNING body, expires_at")
            .bind(state_sha256)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        if get_ts(&row, "expires_at")? <= Utc::now() {
            return Ok(None);
        }
        Ok(Some(decode(row.get::<&str, _>("body"))?))
    }

    async fn disabled_users(&self) -> Result<Vec<Uuid>> {
        let sql = format!("SELECT id FROM users WHERE {} = $2", json_text(1));
        let args = [Arg::Path(json_path(&["accountEnabled".to_string()])), scalar_arg(&serde_json::Value::Bool(false))];
        let rows = bind_args(sqlx::query(&sql), &args).fetch_all(&self.pool).await?;
        rows.iter().map(|r| parse_uuid(r.get("id"))).collect()
    }

    async fn end_sessions_of_user(&self, user: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(user.to_string()).execute(&self.pool).await?;
        Ok(())
    }

    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        let done = sqlx::query(
            "INSERT INTO leases (name, owner, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
             WHERE leases.owner = excluded.owner OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(owner)
        .bind(ts(until))
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(&self, name: &str, owner: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND owner = $2")
            .bind(name)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn live_leases(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let rows =
            sqlx::query("SELECT name, owner FROM leases WHERE substr(name, 1, length($1)) = $1 AND expires_at > $2")
                .bind(prefix)
                .bind(ts(Utc::now()))
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(|r| (r.get::<String, _>("name"), r.get::<String, _>("owner"))).collect())
    }

    async fn lease_ends(&self, prefix: &str) -> Result<Vec<(String, DateTime<Utc>)>> {
        let rows = sqlx::query("SELECT name, expires_at FROM leases WHERE substr(name, 1, length($1)) = $1")
            .bind(prefix)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.get::<String, _>("name"), get_ts(r, "expires_at")?))).collect()
    }

    async fn claim_workflow(&self, id: Uuid, owner: &str, ttl: Duration) -> Result<bool> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        let done = sqlx::query(
            "UPDATE cloud_pcs SET lease_owner = $2, lease_expires_at = $3
             WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_expires_at < $4)",
        )
        .bind(id.to_string())
        .bind(owner)
        .bind(ts(until))
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim_idle_workflows(&self, owner: &str, ttl: Duration, limit: usize) -> Result<Vec<Uuid>> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        let owner = owner.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let ids: Vec<String> = self
            .write(None, move |c| {
                Box::pin(async move {
                    let sql = format!(
                        "SELECT id FROM cloud_pcs WHERE phase <> 'idle' AND (lease_owner IS NULL OR lease_expires_at < $1)
                         ORDER BY created_at LIMIT $2{SKIP_LOCKED}"
                    );
                    let rows = sqlx::query(&sql).bind(ts(now)).bind(limit).fetch_all(&mut *c).await?;
                    let ids: Vec<String> = rows.iter().map(|r| r.get::<String, _>("id")).collect();
                    for id in &ids {
                        sqlx::query("UPDATE cloud_pcs SET lease_owner = $2, lease_expires_at = $3 WHERE id = $1")
                            .bind(id)
                            .bind(&owner)
                            .bind(ts(until))
                            .execute(&mut *c)
                            .await?;
                    }
                    Ok(ids)
                })
            })
            .await?;
        ids.iter().map(|s| parse_uuid(s)).collect()
    }

    async fn renew_workflows(&self, ids: &[Uuid], owner: &str, ttl: Duration) -> Result<Vec<Uuid>> {
        let until = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
        let mut held = std::collections::HashSet::new();
        // A few hundred ids per statement: one round trip each, well below both databases'
        // limits on bound parameters.
        for chunk in ids.chunks(500) {
            let list = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "UPDATE cloud_pcs SET lease_expires_at = $2 WHERE lease_owner = $1 AND id IN ({list}) RETURNING id"
            );
            let mut q = sqlx::query(&sql).bind(owner).bind(ts(until));
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for row in q.fetch_all(&self.pool).await? {
                held.insert(parse_uuid(row.get::<&str, _>("id"))?);
            }
        }
        Ok(ids.iter().copied().filter(|id| !held.contains(id)).collect())
    }

    async fn release_workflow(&self, id: Uuid, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE cloud_pcs SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn lock_allocation(&self) -> Result<AllocationGuard> {
        allocation_lock(self).await
    }

    async fn publish_change(&self, topic: &str) -> Result<()> {
        notify(self, topic).await
    }

    async fn next_change(&self) -> Result<String> {
        listen(self).await
    }

    async fn count_sign_in_attempt(
        &self,
        account: &str,
        now: DateTime<Utc>,
        rule: LockoutRule,
    ) -> Result<Option<DateTime<Utc>>> {
        let account = account.to_lowercase();
        self.write(None, move |c| {
            Box::pin(async move {
                lock_rules(c).await?;
                let row = sqlx::query("SELECT failures, locked_until FROM sign_in_failures WHERE account = $1")
                    .bind(&account)
                    .fetch_optional(&mut *c)
                    .await?;
                let (failures, locked_until) = match &row {
                    Some(r) => (r.get::<i64, _>("failures") as u32, get_opt_ts(r, "locked_until")?),
                    None => (0, None),
                };
                if let Some(until) = locked_until.filter(|u| *u > now) {
                    return Ok(Some(until));
                }
                let failures = failures.saturating_add(1);
                let lock = rule(failures).map(|d| now + chrono::Duration::from_std(d).unwrap_or_default());
                sqlx::query(
                    "INSERT INTO sign_in_failures (account, failures, locked_until, last_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (account) DO UPDATE SET failures = excluded.failures, locked_until = excluded.locked_until, last_at = excluded.last_at",
                )
                .bind(&account)
                .bind(i64::from(failures))
                .bind(lock.map(ts))
                .bind(ts(now))
                .execute(&mut *c)
                .await?;
                if row.is_none() {
                    // Names come from unauthenticated callers: the table keeps at most
                    // MAX_SIGN_IN_ACCOUNTS, forgetting the stalest unlocked ones first.
                    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM sign_in_failures").fetch_one(&mut *c).await?.get("n");
                    if n > MAX_SIGN_IN_ACCOUNTS {
                        sqlx::query(
                            "DELETE FROM sign_in_failures WHERE account IN (SELECT account FROM sign_in_failures
                             WHERE locked_until IS NULL OR locked_until < $1 ORDER BY last_at LIMIT $2)",
                        )
                        .bind(ts(now))
                        .bind(n - MAX_SIGN_IN_ACCOUNTS)
                        .execute(&mut *c)
                        .await?;
                    }
                }
                Ok(None)
            })
        })
        .await
    }

    async fn clear_sign_in_failures(&self, account: &str) -> Result<()> {
        sqlx::query("DELETE FROM sign_in_failures WHERE account = $1")
            .bind(account.to_lowercase())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn sign_in_failure_count(&self) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM sign_in_failures").fetch_one(&self.pool).await?.get("n");
        Ok(n as u64)
    }

    async fn put_console_ticket(
        &self,
        secret_sha256: &str,
        cloud_pc: Uuid,
        user: Option<Uuid>,
        grant: &str,
        expires: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query("DELETE FROM console_tickets WHERE expires_at < $1")
            .bind(ts(Utc::now()))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO console_tickets (secret_sha256, cloud_pc_id, user_id, grant_body, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(secret_sha256)
        .bind(cloud_pc.to_string())
        .bind(user.map(|u| u.to_string()))
        .bind(grant)
        .bind(ts(expires))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_console_ticket(&self, secret_sha256: &str) -> Result<Option<String>> {
        // DELETE … RETURNING: of two replicas redeeming one ticket, exactly one gets the row.
        let row = sqlx::query("DELETE FROM console_tickets WHERE secret_sha256 = $1 RETURNING grant_body, expires_at")
            .bind(secret_sha256)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        if get_ts(&row, "expires_at")? <= Utc::now() {
            return Ok(None);
        }
        Ok(Some(row.get::<String, _>("grant_body")))
    }

    async fn drop_console_tickets(&self, cloud_pc: Option<Uuid>, user: Option<Uuid>) -> Result<()> {
        sqlx::query("DELETE FROM console_tickets WHERE cloud_pc_id = $1 OR user_id = $2")
            .bind(cloud_pc.map(|u| u.to_string()))
            .bind(user.map(|u| u.to_string()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Failed sign-ins are remembered for at most this many accounts.
const MAX_SIGN_IN_ACCOUNTS: i64 = 10_000;
