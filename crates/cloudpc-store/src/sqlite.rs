//! The SQLite backend: the embedded default for a single machine and a single cloudpc process.
//!
//! Write transactions begin `IMMEDIATE`, so writers queue on SQLite's one write lock instead of
//! failing half way; that lock also serves as the rules lock. Timestamps are stored as RFC 3339
//! text in one fixed form (UTC, microseconds, `Z`), which sorts and compares in time order.
//! There is one process, so the capacity lock is in memory and change notices are not needed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::{AllocationGuard, Result, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
    allocation: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(8).connect_with(options).await?;
        crate::migrate(&MIGRATOR, &pool).await?;
        // One process uses a SQLite file, so leases left by an earlier process are stale: its
        // workflows resume at once instead of after their leases expire.
        sqlx::query("UPDATE cloud_pcs SET lease_owner = NULL, lease_expires_at = NULL").execute(&pool).await?;
        sqlx::query("DELETE FROM leases").execute(&pool).await?;
        Ok(Self { pool, allocation: Arc::new(tokio::sync::Mutex::new(())) })
    }
}

type Db = sqlx::Sqlite;
type Conn = sqlx::SqliteConnection;
type DbRow = sqlx::sqlite::SqliteRow;
type TheStore = SqliteStore;
type TsValue = String;
type PathValue = String;

const BACKEND: &str = "sqlite";
const BEGIN: &str = "BEGIN IMMEDIATE";
/// SQLite has one writer at a time: claiming needs no row locks.
const SKIP_LOCKED: &str = "";

fn ts(t: DateTime<Utc>) -> TsValue {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

fn get_ts(row: &DbRow, column: &str) -> Result<DateTime<Utc>> {
    parse_ts(row.get::<&str, _>(column))
}

fn get_opt_ts(row: &DbRow, column: &str) -> Result<Option<DateTime<Utc>>> {
    row.get::<Option<&str>, _>(column).map(parse_ts).transpose()
}

/// `BEGIN IMMEDIATE` already holds SQLite's single write lock.
async fn lock_rules(_conn: &mut Conn) -> Result<()> {
    Ok(())
}

fn json_path(path: &[String]) -> PathValue {
    format!("$.{}", path.iter().map(|p| format!("\"{}\"", p.replace('"', ""))).collect::<Vec<_>>().join("."))
}

/// The JSON field at the path bound as parameter `n`.
fn json_text(n: usize) -> String {
    format!("json_extract(body, ${n})")
}

/// `json_extract` gives JSON's own types back: booleans as 0/1, numbers as numbers.
fn scalar_arg(v: &serde_json::Value) -> Arg {
    match v {
        serde_json::Value::Bool(b) => Arg::Int(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Arg::Int(i),
            None => Arg::Real(n.as_f64().unwrap_or_default()),
        },
        other => Arg::Text(other.to_string()),
    }
}

async fn allocation_lock(store: &SqliteStore) -> Result<AllocationGuard> {
    Ok(AllocationGuard(Box::new(store.allocation.clone().lock_owned().await)))
}

async fn notify(_store: &SqliteStore, _topic: &str) -> Result<()> {
    Ok(())
}

async fn listen(_store: &SqliteStore) -> Result<String> {
    std::future::pending().await
}

/// The shared store code, compiled against this backend's types.
mod shared {
    use super::*;
    include!("sql/shared.rs");
}
use shared::Arg;
