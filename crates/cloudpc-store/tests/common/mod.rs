//! Store tests run against both backends: a fresh SQLite file, and a fresh PostgreSQL database
//! made from `CLOUDPC_TEST_DATABASE_URL` (a role that may create databases; `scripts/test.sh`
//! starts PostgreSQL and sets it). "Two replicas" are two stores opened on the same database.
#![allow(dead_code)]

use std::sync::Arc;

use chrono::Utc;
use uuid::Uuid;

use cloudpc_store::{PgStore, SqliteStore, Store};
use cloudpc_types::audit::{AuditActor, AuditEvent, AuditOperationType, AuditResult};
use cloudpc_types::cloud_pc::CloudPc;
use cloudpc_types::directory::{Group, User};
use cloudpc_types::licensing::SubscribedSku;
use cloudpc_types::provisioning::{CloudPcRecord, ProvisioningState};

/// One database, and how to open another store (another "replica") on it.
pub struct TestDb {
    pub name: &'static str,
    sqlite: Option<(tempfile::TempDir, std::path::PathBuf)>,
    pg_url: Option<String>,
}

impl TestDb {
    pub async fn open(&self) -> Arc<dyn Store> {
        match (&self.sqlite, &self.pg_url) {
            (Some((_, path)), _) => Arc::new(SqliteStore::open(path).await.expect("open SQLite")),
            (_, Some(url)) => Arc::new(PgStore::connect(url).await.expect("open PostgreSQL")),
            _ => unreachable!(),
        }
    }

    pub fn pg_url(&self) -> Option<&str> {
        self.pg_url.as_deref()
    }

    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        self.sqlite.as_ref().map(|(_, p)| p.as_path())
    }
}

/// The PostgreSQL server tests use; required, so a missing database fails loudly instead of
/// skipping half the suite.
pub fn pg_admin_url() -> String {
    std::env::var("CLOUDPC_TEST_DATABASE_URL").expect(
        "CLOUDPC_TEST_DATABASE_URL must name a PostgreSQL role that may create databases \
         (./scripts/test.sh starts PostgreSQL and sets it)",
    )
}

/// Creates an empty database on the test server and returns its URL.
pub async fn fresh_pg_database() -> String {
    use sqlx::Connection;
    let admin = pg_admin_url();
    let name = format!("cloudpc_test_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("database URL ends in /<database>");
    format!("{base}/{name}")
}

/// A fresh database of each backend.
pub async fn backends() -> Vec<TestDb> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cloudpc.db");
    vec![
        TestDb { name: "sqlite", sqlite: Some((dir, path)), pg_url: None },
        TestDb { name: "postgresql", sqlite: None, pg_url: Some(fresh_pg_database().await) },
    ]
}

pub fn audit(activity: &str) -> AuditEvent {
    AuditEvent {
        id: Uuid::new_v4(),
        display_name: activity.into(),
        component_name: "Test".into(),
        activity: activity.into(),
        activity_date_time: Utc::now(),
        activity_type: activity.into(),
        activity_operation_type: AuditOperationType::Other,
        activity_result: AuditResult::Success,
        correlation_id: Uuid::new_v4(),
        category: "cloudPC".into(),
        actor: AuditActor {
            actor_type: "itPro".into(),
            user_id: None,
            user_principal_name: Some("admin@contoso.com".into()),
            application_display_name: None,
            ip_address: None,
            user_permissions: vec![],
        },
        resources: vec![],
    }
}

pub fn user(n: usize) -> User {
    serde_json::from_value(serde_json::json!({
        "id": Uuid::new_v4(), "userPrincipalName": format!("user{n}@contoso.com"), "displayName": format!("User {n}"),
        "mail": null, "mailNickname": format!("user{n}"), "accountEnabled": true, "createdDateTime": Utc::now()
    }))
    .expect("a user")
}

pub fn group(name: &str) -> Group {
    serde_json::from_value(serde_json::json!({
        "id": Uuid::new_v4(), "displayName": name, "description": null, "mailNickname": null,
        "securityEnabled": true, "mailEnabled": false, "createdDateTime": Utc::now()
    }))
    .expect("a group")
}

pub fn sku(part: &str, seats: u32) -> SubscribedSku {
    serde_json::from_value(serde_json::json!({
        "id": Uuid::new_v4(), "skuId": Uuid::new_v4(), "skuPartNumber": part, "displayName": part,
        "appliesTo": "User", "capabilityStatus": "Enabled", "consumedUnits": 0,
        "prepaidUnits": {"enabled": seats}, "vCpuCount": 2, "ramInGB": 4, "storageInGB": 64, "servicePlans": []
    }))
    .expect("a SKU")
}

pub fn cloud_pc(user: Uuid, sku: Uuid) -> CloudPcRecord {
    let pc: CloudPc = serde_json::from_value(serde_json::json!({
        "id": Uuid::new_v4(), "displayName": "CPC", "userPrincipalName": "user@contoso.com",
        "servicePlanId": Uuid::new_v4(), "servicePlanName": "plan", "provisioningType": "dedicated",
        "status": "provisioning", "powerState": "unknown", "lastModifiedDateTime": Utc::now(),
        "userAccountType": "standardUser"
    }))
    .expect("a Cloud PC");
    CloudPcRecord::new(pc, ProvisioningState::new(user, sku, Utc::now()))
}
