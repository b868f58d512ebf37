//! The data-access layer: everything cloudpc remembers goes through the [`Store`] trait.
//!
//! The app layer holds an `Arc<dyn Store>` and never sees SQL. There are two backends, SQLite (the
//! embedded default for one machine) and PostgreSQL (several replicas on one database), and one
//! implementation: `sql/shared.rs` is written once and compiled for each backend's concrete sqlx
//! types, with the few dialect differences (timestamps, JSON paths, locks) in each backend's
//! module. Rules that must hold against concurrent writers (seat counts, "in use" checks, unique
//! names) are checked inside the write's own transaction under the rules lock, every change is
//! written together with its audit event, and a dropped or failed write rolls back, so a refused,
//! failed or cancelled write leaves nothing behind. Mutable records carry a version and are
//! written compare-and-swap: a stale write fails with [`StoreError::Stale`] instead of winning.

pub mod error;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
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
use cloudpc_types::policy::{ImageType, ProvisioningPolicy};
use cloudpc_types::provisioning::{CloudPcRecord, KernelBoot};

pub use error::StoreError;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Opens the store a server was told to use: a `postgres://` URL, or else the SQLite file.
pub async fn open(database_url: Option<&str>, sqlite_file: &std::path::Path) -> Result<std::sync::Arc<dyn Store>> {
    Ok(match database_url {
        Some(url) => std::sync::Arc::new(PgStore::connect(url).await?),
        None => std::sync::Arc::new(SqliteStore::open(sqlite_file).await?),
    })
}

/// Applies pending migrations, refusing a database that a newer cloudpc set up.
pub(crate) async fn migrate<DB>(migrator: &sqlx::migrate::Migrator, pool: &sqlx::Pool<DB>) -> Result<()>
where
    DB: sqlx::Database,
    <DB as sqlx::Database>::Connection: sqlx::migrate::Migrate,
{
    match migrator.run(pool).await {
        Ok(()) => Ok(()),
        Err(sqlx::migrate::MigrateError::VersionMissing(database)) => Err(StoreError::SchemaTooNew {
            database,
            binary: migrator.iter().map(|m| m.version).max().unwrap_or_default(),
        }),
        Err(e) => Err(StoreError::Migrate(e)),
    }
}

/// A license a user holds, directly (`via_group` is `None`) or through a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseGrant {
    pub user_id: Uuid,
    pub sku_id: Uuid,
    pub via_group: Option<Uuid>,
}

/// One group targeted by one policy, in the stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAssignment {
    pub policy_id: Uuid,
    pub group_id: Uuid,
    pub position: u32,
    pub assigned_at: DateTime<Utc>,
}

/// A host as stored: the admin-owned resource, and what its agent last reported and when.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub host: Host,
    pub report: Option<serde_json::Value>,
    pub heartbeat: Option<DateTime<Utc>>,
}

/// What the Cloud PCs placed on one host were promised, summed by the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    pub cloud_pcs: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub storage_gib: u64,
    /// Of `cloud_pcs`, the hibernated ones (their RAM is not in `memory_mib`).
    pub saved: u64,
}

/// What a warm-pool claim does to the machine it got; returns the audit event of the claim.
pub type ClaimFn = Box<dyn FnOnce(&mut CloudPcRecord) -> AuditEvent + Send>;

/// Holds the capacity-allocation lock until dropped (a database lock on PostgreSQL, so replicas
/// take turns too).
pub struct AllocationGuard(#[allow(dead_code)] Box<dyn Send>);

/// How long an account is locked after `failures` wrong passwords in a row (`None`: not locked).
pub type LockoutRule = fn(failures: u32) -> Option<Duration>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which database this is, for logs and `/health`: "sqlite" or "postgresql".
    fn backend(&self) -> &'static str;

    // Directory.
    async fn list_users(&self) -> Result<Vec<User>>;
    async fn get_user(&self, id: Uuid) -> Result<User>;
    async fn find_user_by_upn(&self, upn: &str) -> Result<User>;
    /// `password_hash` is the argon2 PHC string of the portal password, if one is set.
    async fn create_user(&self, user: &User, password_hash: Option<&str>, audit: &AuditEvent) -> Result<()>;
    /// Compare-and-swap on `user.row_version`. `password_hash`: `None` keeps the current password.
    async fn update_user(&self, user: &User, password_hash: Option<&str>, audit: &AuditEvent) -> Result<()>;
    /// The user and their password hash, by principal name (for sign-in).
    async fn user_credentials(&self, upn: &str) -> Result<Option<(User, Option<String>)>>;
    async fn create_session(&self, secret_sha256: &str, user: Uuid, expires: DateTime<Utc>) -> Result<()>;
    /// The session's user, if the session exists and has not expired.
    async fn find_session(&self, secret_sha256: &str) -> Result<Option<User>>;
    async fn delete_session(&self, secret_sha256: &str) -> Result<()>;
    async fn delete_user(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;

    async fn list_groups(&self) -> Result<Vec<Group>>;
    async fn get_group(&self, id: Uuid) -> Result<Group>;
    async fn create_group(&self, group: &Group, audit: &AuditEvent) -> Result<()>;
    /// Compare-and-swap on `group.row_version`.
    async fn update_group(&self, group: &Group, audit: &AuditEvent) -> Result<()>;
    /// Refused while a provisioning policy targets the group.
    async fn delete_group(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;
    /// Refused when it would give a group license to more users than the SKU has seats.
    async fn add_member(&self, group: Uuid, user: Uuid, audit: &AuditEvent) -> Result<()>;
    async fn remove_member(&self, group: Uuid, user: Uuid, audit: &AuditEvent) -> Result<()>;
    async fn list_members(&self, group: Uuid) -> Result<Vec<User>>;
    async fn list_groups_of_user(&self, user: Uuid) -> Result<Vec<Group>>;
    /// Every membership as (group, user), in one query (the reconciler reads them all).
    async fn memberships(&self) -> Result<Vec<(Uuid, Uuid)>>;

    // Licensing.
    async fn list_skus(&self) -> Result<Vec<SubscribedSku>>;
    async fn get_sku(&self, id: Uuid) -> Result<SubscribedSku>;
    async fn create_sku(&self, sku: &SubscribedSku, audit: &AuditEvent) -> Result<()>;
    /// Compare-and-swap; refused when the new seat count is below the seats in use.
    async fn update_sku(&self, sku: &SubscribedSku, audit: &AuditEvent) -> Result<()>;
    /// Refused while anyone holds the SKU.
    async fn delete_sku(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;
    /// Users holding each SKU, directly or through groups (a user counts once).
    async fn consumed_units(&self) -> Result<HashMap<Uuid, u32>>;
    /// Adds and removes direct licenses in one transaction, refused past the seat count.
    async fn change_user_licenses(&self, user: Uuid, add: &[Uuid], remove: &[Uuid], audit: &AuditEvent) -> Result<()>;
    async fn change_group_licenses(&self, group: Uuid, add: &[Uuid], remove: &[Uuid], audit: &AuditEvent)
        -> Result<()>;
    async fn group_licenses(&self, group: Uuid) -> Result<Vec<Uuid>>;
    /// Every license every user holds, direct and inherited.
    async fn license_grants(&self) -> Result<Vec<LicenseGrant>>;

    // Images.
    async fn list_gallery_images(&self) -> Result<Vec<GalleryImage>>;
    async fn get_gallery_image(&self, id: &str) -> Result<GalleryImage>;
    async fn list_device_images(&self) -> Result<Vec<DeviceImage>>;
    async fn get_device_image(&self, id: Uuid) -> Result<DeviceImage>;
    async fn create_device_image(&self, image: &DeviceImage, audit: &AuditEvent) -> Result<()>;
    /// Compare-and-swap on `image.row_version`.
    async fn update_device_image(&self, image: &DeviceImage, audit: &AuditEvent) -> Result<()>;
    /// Refused while a provisioning policy uses the image.
    async fn delete_device_image(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;

    // Provisioning policies.
    async fn list_policies(&self) -> Result<Vec<ProvisioningPolicy>>;
    async fn get_policy(&self, id: Uuid) -> Result<ProvisioningPolicy>;
    /// Fails with `NotFound` if the image it names is gone by the time of the write.
    async fn create_policy(&self, policy: &ProvisioningPolicy, audit: &AuditEvent) -> Result<()>;
    /// Compare-and-swap on `policy.row_version`.
    async fn update_policy(&self, policy: &ProvisioningPolicy, audit: &AuditEvent) -> Result<()>;
    /// Refused while the policy has assignments.
    async fn delete_policy(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;
    /// Replaces the policy's targets with `groups`, in order; groups that stay keep their
    /// original assignment time.
    async fn set_policy_assignments(&self, policy: Uuid, groups: &[Uuid], audit: &AuditEvent) -> Result<()>;
    async fn list_assignments(&self) -> Result<Vec<StoredAssignment>>;

    /// Adds or replaces a gallery image with the files it boots from.
    async fn upsert_gallery_image(
        &self,
        image: &GalleryImage,
        disk: &std::path::Path,
        boot: Option<&KernelBoot>,
    ) -> Result<()>;
    /// Removes a gallery image's registration; `Conflict` while a policy or a Cloud PC uses it.
    async fn delete_gallery_image(&self, id: &str, audit: &AuditEvent) -> Result<()>;
    /// The base disk and kernel of a gallery image.
    async fn gallery_image_files(&self, id: &str) -> Result<(std::path::PathBuf, Option<KernelBoot>)>;

    // Cloud PCs.
    async fn list_cloud_pcs(&self) -> Result<Vec<CloudPc>>;
    async fn get_cloud_pc(&self, id: Uuid) -> Result<CloudPc>;
    async fn list_cloud_pc_records(&self) -> Result<Vec<CloudPcRecord>>;
    async fn get_cloud_pc_record(&self, id: Uuid) -> Result<CloudPcRecord>;
    /// Refused (Conflict) when the user already has a Cloud PC for that license. Sets the
    /// record's version.
    async fn insert_cloud_pc(&self, record: &mut CloudPcRecord, audit: Option<&AuditEvent>) -> Result<()>;
    /// Writes the Cloud PC, and the step that moved it, in one transaction, if the row is still
    /// at `record.version` (else [`StoreError::Stale`]) and, when `lease` names a workflow owner,
    /// if that owner still holds the Cloud PC's workflow lease (else [`StoreError::LeaseLost`]).
    /// On success the record carries its new version and base.
    async fn save_cloud_pc(
        &self,
        record: &mut CloudPcRecord,
        step: Option<&ProvisioningStepRecord>,
        audit: Option<&AuditEvent>,
        lease: Option<&str>,
    ) -> Result<()>;
    async fn delete_cloud_pc(&self, id: Uuid, audit: Option<&AuditEvent>) -> Result<()>;
    /// Gives a claimable machine of a warm pool for `sku` to a user (`pool` is
    /// [`cloudpc_types::provisioning::PoolMember::claim_key`]: the policy and the fingerprint it
    /// is built to, so a stale machine is never given): the oldest one that no
    /// other claim holds this moment (`SKIP LOCKED` on PostgreSQL, the write lock on SQLite),
    /// changed by `assign` (which returns the audit event) and stored in the same transaction, so
    /// two claims never get one machine and a crash leaves it either pooled or claimed. `None`
    /// when the pool has no ready machine. Refused (Conflict) when the user already has a Cloud
    /// PC for that license.
    async fn claim_pooled(&self, pool: &str, sku: Uuid, assign: ClaimFn) -> Result<Option<CloudPcRecord>>;
    async fn list_steps(&self, cloud_pc: Uuid) -> Result<Vec<ProvisioningStepRecord>>;

    // Device records made by provisioning.
    async fn put_device(&self, device: &Device) -> Result<()>;
    async fn delete_device(&self, id: Uuid) -> Result<()>;
    async fn list_devices(&self) -> Result<Vec<Device>>;
    async fn put_managed_device(&self, device: &ManagedDevice) -> Result<()>;
    async fn get_managed_device(&self, id: Uuid) -> Result<ManagedDevice>;
    async fn delete_managed_device(&self, id: Uuid) -> Result<()>;
    async fn list_managed_devices(&self) -> Result<Vec<ManagedDevice>>;

    // Audit.
    async fn list_audit_events(&self) -> Result<Vec<AuditEvent>>;
    /// One page of events in time order, those matching every term of `filter`, and how many
    /// match in all; the database pages, so a large log is never read whole.
    async fn audit_events_page(
        &self,
        filter: &[FieldEquals],
        skip: usize,
        top: usize,
    ) -> Result<(Vec<AuditEvent>, usize)>;
    async fn get_audit_event(&self, id: Uuid) -> Result<AuditEvent>;
    /// One page of a collection in its usual order (creation), those matching every term of
    /// `filter`, and how many match in all: filtering and paging run in the database.
    async fn list_page(
        &self,
        listing: Listing,
        filter: &[FieldEquals],
        skip: usize,
        top: usize,
    ) -> Result<(Vec<serde_json::Value>, usize)>;
    /// Deletes events older than `days`; returns how many went.
    async fn prune_audit_events(&self, days: u32) -> Result<u64>;
    /// Records an event that goes with no stored change (console connections).
    async fn record_audit_event(&self, audit: &AuditEvent) -> Result<()>;

    // API tokens.
    async fn create_token(&self, token: &ApiToken, secret_sha256: &str, audit: Option<&AuditEvent>) -> Result<()>;
    async fn find_token(&self, secret_sha256: &str) -> Result<Option<ApiToken>>;
    async fn list_tokens(&self) -> Result<Vec<ApiToken>>;
    /// Deletes a token; refused when it is the last administrator token (no one could get in).
    async fn revoke_token(&self, id: Uuid, audit: &AuditEvent) -> Result<ApiToken>;
    /// Records when a token was last used.
    async fn touch_token(&self, id: Uuid, at: DateTime<Utc>) -> Result<()>;

    // Hypervisor hosts.
    async fn list_hosts(&self) -> Result<Vec<HostRow>>;
    /// Adds a host under a unique name (any case). `host.subnet_index` 0 asks for the next free
    /// index; the stored host is returned.
    async fn create_host(&self, host: &Host, audit: Option<&AuditEvent>) -> Result<Host>;
    /// Takes a join token (single use, unexpired) and adds the host in the token's region, in one
    /// transaction: a host that is refused (a duplicate name) leaves the token usable.
    async fn join_host(&self, token_sha256: &str, host: &Host, audit: &AuditEvent) -> Result<Host>;
    /// Compare-and-swap on `host.row_version`.
    async fn update_host(&self, host: &Host, audit: &AuditEvent) -> Result<()>;
    /// Refused while Cloud PCs are placed on the host.
    async fn delete_host(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;
    /// Stores what the host's agent reported, as its latest heartbeat.
    async fn record_host_report(&self, id: Uuid, report: &serde_json::Value, at: DateTime<Utc>) -> Result<()>;
    /// Per host name: the Cloud PCs placed there and the sizes they were promised.
    async fn host_usage(&self) -> Result<HashMap<String, HostUsage>>;
    async fn put_join_token(
        &self,
        secret_sha256: &str,
        region: &str,
        expires: DateTime<Utc>,
        audit: &AuditEvent,
    ) -> Result<()>;
    /// Stores `value` under `name` unless one is there already, and returns what is stored: of
    /// replicas starting together, the first writer's value wins for all.
    async fn init_secret(&self, name: &str, value: &str) -> Result<String>;

    // Identity providers (OIDC sign-in, SCIM provisioning).
    async fn list_identity_providers(&self) -> Result<Vec<IdentityProvider>>;
    /// Adds a provider under a unique name (any case), with its OIDC client secret if any.
    async fn create_identity_provider(
        &self,
        provider: &IdentityProvider,
        client_secret: Option<&str>,
        audit: &AuditEvent,
    ) -> Result<()>;
    /// Compare-and-swap on `row_version`; `client_secret` replaces the kept one when given.
    async fn update_identity_provider(
        &self,
        provider: &IdentityProvider,
        client_secret: Option<&str>,
        audit: &AuditEvent,
    ) -> Result<()>;
    /// Refused while users or groups the provider manages exist.
    async fn delete_identity_provider(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;
    async fn identity_provider_secret(&self, id: Uuid) -> Result<Option<String>>;
    /// Replaces the provider's SCIM token (the old one stops working in the same transaction).
    async fn set_scim_token(&self, provider: &IdentityProvider, secret_sha256: &str, audit: &AuditEvent) -> Result<()>;
    async fn find_provider_by_scim_token(&self, secret_sha256: &str) -> Result<Option<IdentityProvider>>;
    /// Keeps a sign-in in flight until `expires` (and forgets expired ones).
    async fn put_oidc_login(&self, state_sha256: &str, body: &serde_json::Value, expires: DateTime<Utc>) -> Result<()>;
    /// Takes a sign-in in flight, once: a second callback with the same state finds nothing.
    async fn take_oidc_login(&self, state_sha256: &str) -> Result<Option<serde_json::Value>>;
    /// Ids of users whose account is disabled (they are not entitled to Cloud PCs).
    async fn disabled_users(&self) -> Result<Vec<Uuid>>;
    /// Ends every portal session of a user.
    async fn end_sessions_of_user(&self, user: Uuid) -> Result<()>;

    // Network connections (the organisation's network and AD domain).
    async fn list_network_connections(&self) -> Result<Vec<OnPremisesConnection>>;
    /// Adds a connection under a unique name (any case), with its sealed domain password if any.
    async fn create_network_connection(
        &self,
        connection: &OnPremisesConnection,
        sealed_password: Option<&str>,
        audit: &AuditEvent,
    ) -> Result<()>;
    /// Compare-and-swap on `row_version`; `sealed_password` replaces the kept one when given.
    async fn update_network_connection(
        &self,
        connection: &OnPremisesConnection,
        sealed_password: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<()>;
    /// Refused while a provisioning policy names the connection (checked under the rules lock).
    async fn delete_network_connection(&self, id: Uuid, audit: &AuditEvent) -> Result<()>;
    async fn network_connection_password(&self, id: Uuid) -> Result<Option<String>>;

    // Work shared between replicas.
    /// Takes or renews the named lease for `owner` if it is free, expired or already `owner`'s;
    /// true when `owner` holds it now, until `ttl` from now.
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool>;
    async fn release_lease(&self, name: &str, owner: &str) -> Result<()>;
    /// Unexpired leases whose names start with `prefix`, as (name, owner).
    async fn live_leases(&self, prefix: &str) -> Result<Vec<(String, String)>>;
    /// Every lease whose name starts with `prefix`, expired or not, with when it ends or ended.
    async fn lease_ends(&self, prefix: &str) -> Result<Vec<(String, DateTime<Utc>)>>;
    /// Claims the workflow lease of one Cloud PC for `owner` (free, expired or already its own).
    async fn claim_workflow(&self, id: Uuid, owner: &str, ttl: Duration) -> Result<bool>;
    /// Claims up to `limit` Cloud PCs whose workflow has work to do and whose lease is free or
    /// expired (rows another replica is claiming this moment are skipped, not waited for).
    async fn claim_idle_workflows(&self, owner: &str, ttl: Duration, limit: usize) -> Result<Vec<Uuid>>;
    /// Extends the leases `owner` holds on these Cloud PCs; returns those it no longer holds.
    async fn renew_workflows(&self, ids: &[Uuid], owner: &str, ttl: Duration) -> Result<Vec<Uuid>>;
    async fn release_workflow(&self, id: Uuid, owner: &str) -> Result<()>;
    /// Serializes capacity allocation (across replicas on PostgreSQL) until the guard drops.
    async fn lock_allocation(&self) -> Result<AllocationGuard>;
    /// Tells every replica that something changed (PostgreSQL `NOTIFY`; nothing on SQLite).
    async fn publish_change(&self, topic: &str) -> Result<()>;
    /// Waits for the next change another replica published and returns its topic; never
    /// returns on SQLite, where there is only one process.
    async fn next_change(&self) -> Result<String>;

    // Sign-in protection and console tickets, shared by every replica.
    /// Counts a sign-in attempt for `account` before its password is checked. When the account is
    /// locked the attempt is not counted and the lock's end is returned.
    async fn count_sign_in_attempt(
        &self,
        account: &str,
        now: DateTime<Utc>,
        rule: LockoutRule,
    ) -> Result<Option<DateTime<Utc>>>;
    /// The password was right: forgets the account's failures.
    async fn clear_sign_in_failures(&self, account: &str) -> Result<()>;
    /// Accounts with remembered failures.
    async fn sign_in_failure_count(&self) -> Result<u64>;
    /// Stores a console ticket's digest with what it grants (JSON) until it expires.
    async fn put_console_ticket(
        &self,
        secret_sha256: &str,
        cloud_pc: Uuid,
        user: Option<Uuid>,
        grant: &str,
        expires: DateTime<Utc>,
    ) -> Result<()>;
    /// Takes a ticket: it is gone afterwards, whoever asked. `None` when unknown or expired.
    async fn take_console_ticket(&self, secret_sha256: &str) -> Result<Option<String>>;
    /// Refuses the outstanding tickets of a Cloud PC or of a user.
    async fn drop_console_tickets(&self, cloud_pc: Option<Uuid>, user: Option<Uuid>) -> Result<()>;
}

/// One `field eq value` condition on a stored resource's JSON body: `path` names nested fields
/// (`actor`, `userPrincipalName`); strings compare without regard to case, as Graph's do.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldEquals {
    pub path: Vec<String>,
    pub value: serde_json::Value,
}

/// The collections the database filters and pages itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Users,
    Groups,
    CloudPcs,
}

impl Listing {
    fn table(self) -> &'static str {
        match self {
            Listing::Users => "users",
            Listing::Groups => "groups",
            Listing::CloudPcs => "cloud_pcs",
        }
    }
}

/// Which table an image reference points into.
pub fn image_table(t: ImageType) -> &'static str {
    match t {
        ImageType::Gallery => "gallery_images",
        ImageType::Custom => "device_images",
    }
}
