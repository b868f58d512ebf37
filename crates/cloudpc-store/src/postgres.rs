//! The PostgreSQL backend: one database shared by any number of cloudpc replicas.
//!
//! Writes run at READ COMMITTED; writes that check a rule across rows (seats, "in use") first
//! take one transaction-scoped advisory lock, the rules lock, so two replicas checking seats at
//! the same moment take turns (serializable transactions would also do, at the price of retries
//! everywhere). Capacity allocation takes a second advisory lock for as long as a workflow picks
//! its host. Changes are announced with `NOTIFY cloudpc_changes`, and every replica listens.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};

use crate::{AllocationGuard, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Advisory lock keys (any two fixed numbers; these spell "cpcrules" and "cpcalloc").
const RULES_LOCK: i64 = 0x6370_6372_756c_6573;
const ALLOCATION_LOCK: i64 = 0x6370_6361_6c6c_6f63;
const CHANNEL: &str = "cloudpc_changes";

pub struct PgStore {
    pool: PgPool,
    listener: tokio::sync::Mutex<Option<PgListener>>,
}

impl PgStore {
    /// Connects and applies pending migrations. Replicas starting together apply them once:
    /// sqlx holds an advisory lock while it migrates.
    pub async fn connect(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        crate::migrate(&MIGRATOR, &pool).await?;
        Ok(Self { pool, listener: tokio::sync::Mutex::new(None) })
    }
}

type Db = sqlx::Postgres;
type Conn = sqlx::PgConnection;
type DbRow = sqlx::postgres::PgRow;
type TheStore = PgStore;
type TsValue = DateTime<Utc>;
type PathValue = Vec<String>;

const BACKEND: &str = "postgresql";
const BEGIN: &str = "BEGIN";
/// Rows another replica is claiming right now are skipped, not waited for.
const SKIP_LOCKED: &str = " FOR UPDATE SKIP LOCKED";

fn ts(t: DateTime<Utc>) -> TsValue {
    t
}

fn get_ts(row: &DbRow, column: &str) -> Result<DateTime<Utc>> {
    Ok(row.try_get::<DateTime<Utc>, _>(column)?)
}

fn get_opt_ts(row: &DbRow, column: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(row.try_get::<Option<DateTime<Utc>>, _>(column)?)
}

async fn lock_rules(conn: &mut Conn) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(RULES_LOCK).execute(conn).await?;
    Ok(())
}

fn json_path(path: &[String]) -> PathValue {
    path.to_vec()
}

/// The JSON field at the path bound as parameter `n`, as text.
fn json_text(n: usize) -> String {
    format!("(body::jsonb #>> ${n})")
}

/// `#>>` gives text: compare with the value's JSON text (`true`, `5`).
fn scalar_arg(v: &serde_json::Value) -> Arg {
    Arg::Text(v.to_string())
}

async fn allocation_lock(store: &PgStore) -> Result<AllocationGuard> {
    // The lock lives as long as the transaction, which the guard holds; dropping it rolls back
    // (nothing was written in it) and so releases the lock, also if the replica dies.
    let mut tx = store.pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ALLOCATION_LOCK).execute(&mut *tx).await?;
    Ok(AllocationGuard(Box::new(tx)))
}

async fn notify(store: &PgStore, topic: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(topic).execute(&store.pool).await?;
    Ok(())
}

async fn listen(store: &PgStore) -> Result<String> {
    let mut guard = store.listener.lock().await;
    if guard.is_none() {
        let mut listener = PgListener::connect_with(&store.pool).await?;
        listener.listen(CHANNEL).await?;
        *guard = Some(listener);
    }
    let listener = guard.as_mut().expect("listener was just set");
    // PgListener reconnects by itself; a notice lost while it does is caught by the resync.
    Ok(listener.recv().await?.payload().to_string())
}

/// The shared store code, compiled against this backend's types.
mod shared {
    use super::*;
    include!("sql/shared.rs");
}
use shared::Arg;
