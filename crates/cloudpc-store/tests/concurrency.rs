//! What two replicas (two stores on one database) may do at the same moment, on both backends:
//! seats are never oversold, a stale write never wins, a cancelled write leaves nothing behind,
//! leases and console tickets have one holder, sign-in failures count across replicas, and a
//! warm-pool machine goes to one user only.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use cloudpc_store::{Store, StoreError};
use common::{audit, backends, cloud_pc, group, sku, user};

#[tokio::test]
async fn test_two_replicas_assigning_the_last_seats_never_exceed_the_seat_count() {
    for db in backends().await {
        let (a, b) = (db.open().await, db.open().await);
        let s = sku("RACE", 5);
        a.create_sku(&s, &audit("Create SKU")).await.unwrap();
        let mut users = Vec::new();
        for n in 0..16 {
            let u = user(n);
            a.create_user(&u, None, &audit("Create User")).await.unwrap();
            users.push(u.id);
        }
        // Sixteen direct assignments and group memberships race for five seats, half per replica.
        let g = group("Race");
        a.create_group(&g, &audit("Create Group")).await.unwrap();
        a.change_group_licenses(g.id, &[s.id], &[], &audit("Assign")).await.unwrap();
        let mut tasks = Vec::new();
        for (i, u) in users.iter().copied().enumerate() {
            let store: Arc<dyn Store> = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (sid, gid) = (s.id, g.id);
            tasks.push(tokio::spawn(async move {
                if i % 4 < 2 {
                    store.change_user_licenses(u, &[sid], &[], &audit("Assign")).await
                } else {
                    store.add_member(gid, u, &audit("Add member")).await
                }
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(StoreError::SeatsExceeded { seats: 5, .. }) => {}
                Err(e) => panic!("{}: unexpected error {e:?}", db.name),
            }
        }
        let consumed = a.consumed_units().await.unwrap()[&s.id];
        assert_eq!((ok, consumed), (5, 5), "{}: exactly the five seats were given", db.name);
    }
}

#[tokio::test]
async fn test_a_stale_write_is_refused_not_applied() {
    for db in backends().await {
        let (a, b) = (db.open().await, db.open().await);
        let mut u = user(1);
        a.create_user(&u, None, &audit("Create User")).await.unwrap();
        u = a.get_user(u.id).await.unwrap();
        let mut theirs = b.get_user(u.id).await.unwrap();
        theirs.display_name = "Renamed by B".into();
        b.update_user(&theirs, None, &audit("Update User")).await.unwrap();
        u.display_name = "Renamed by A from a stale copy".into();
        let e = a.update_user(&u, None, &audit("Update User")).await.unwrap_err();
        assert!(matches!(e, StoreError::Stale { .. }), "{}: {e:?}", db.name);
        assert_eq!(a.get_user(u.id).await.unwrap().display_name, "Renamed by B");

        // Cloud PCs: the same, and the version moves with every save.
        let s = sku("CAS", 1);
        a.create_sku(&s, &audit("Create SKU")).await.unwrap();
        let mut rec = cloud_pc(u.id, s.id);
        a.insert_cloud_pc(&mut rec, None).await.unwrap();
        let mut other = b.get_cloud_pc_record(rec.pc.id).await.unwrap();
        other.pc.display_name = "Renamed".into();
        b.save_cloud_pc(&mut other, None, None, None).await.unwrap();
        rec.state.next_step = "joinDirectory".into();
        let e = a.save_cloud_pc(&mut rec, None, None, None).await.unwrap_err();
        assert!(matches!(e, StoreError::Stale { .. }), "{}: {e:?}", db.name);
        // Rebased on the newer row, the write goes through and keeps both changes.
        let (mut merged, conflicts) = rec.rebase(&a.get_cloud_pc_record(rec.pc.id).await.unwrap());
        assert!(conflicts.is_empty());
        a.save_cloud_pc(&mut merged, None, None, None).await.unwrap();
        let now = a.get_cloud_pc_record(rec.pc.id).await.unwrap();
        assert_eq!(
            (now.pc.display_name.as_str(), now.state.next_step.as_str(), now.version),
            ("Renamed", "joinDirectory", 3)
        );
    }
}

#[tokio::test]
async fn test_a_cancelled_write_leaves_nothing_half_written_and_the_store_usable() {
    for db in backends().await {
        let store = db.open().await;
        let image = "tiny-test";
        let gallery: cloudpc_types::images::GalleryImage = serde_json::from_value(serde_json::json!({
            "id": image, "displayName": "Tiny", "publisherName": "cloudpc", "offerName": "tiny", "skuName": "tiny",
            "status": "supported", "sizeInGb": 1,
            "startDate": "2026-01-01", "endDate": "2030-01-01", "expirationDate": "2030-01-01"
        }))
        .unwrap_or_else(|e| panic!("gallery image: {e}"));
        store.upsert_gallery_image(&gallery, std::path::Path::new("/nonexistent"), None).await.unwrap();
        let policy: cloudpc_types::policy::ProvisioningPolicy = policy_json(image);
        store.create_policy(&policy, &audit("Create policy")).await.unwrap();
        let mut groups = Vec::new();
        for i in 0..40 {
            let g = group(&format!("G{i}"));
            store.create_group(&g, &audit("Create Group")).await.unwrap();
            groups.push(g.id);
        }
        let mut cancelled = 0;
        for step in 0..60u64 {
            // Drop the write after a growing pause: some land before, some in the middle of, and
            // some after the transaction.
            let event = audit("Assign");
            let write = store.set_policy_assignments(policy.id, &groups, &event);
            if tokio::time::timeout(Duration::from_micros(100 + step * 150), write).await.is_err() {
                cancelled += 1;
            }
            let n = store.list_assignments().await.unwrap().len();
            assert!(n == 0 || n == groups.len(), "{}: {n} of {} assignments written", db.name, groups.len());
            // The next writer is not stuck behind a transaction left open.
            let probe = group("probe");
            tokio::time::timeout(Duration::from_secs(5), store.create_group(&probe, &audit("Create Group")))
                .await
                .unwrap_or_else(|_| panic!("{}: a write after a cancelled one hung", db.name))
                .unwrap();
            store.delete_group(probe.id, &audit("Delete Group")).await.unwrap();
            if n == groups.len() {
                store.set_policy_assignments(policy.id, &[], &audit("Unassign")).await.unwrap();
            }
        }
        assert!(cancelled > 0, "{}: no write was cancelled; the test proved nothing", db.name);
    }
}

fn policy_json(image: &str) -> cloudpc_types::policy::ProvisioningPolicy {
    serde_json::from_value(serde_json::json!({
        "id": Uuid::new_v4(), "displayName": "Policy", "description": "", "imageId": image,
        "imageDisplayName": "Tiny", "imageType": "gallery", "provisioningType": "dedicated",
        "cloudPcNamingTemplate": null, "domainJoinConfigurations": [], "enableSingleSignOn": false,
        "localAdminEnabled": false, "createdDateTime": Utc::now(), "lastModifiedDateTime": Utc::now(),
        "gracePeriodInHours": null, "timeZone": null, "windowsSetting": {"locale": "en-US"}, "managedBy": "windows365"
    }))
    .unwrap_or_else(|e| panic!("policy: {e}"))
}

#[tokio::test]
async fn test_leases_have_one_holder_until_they_expire() {
    for db in backends().await {
        let (a, b) = (db.open().await, db.open().await);
        let ttl = Duration::from_millis(600);
        assert!(a.try_lease("reconciler", "A", ttl).await.unwrap());
        assert!(!b.try_lease("reconciler", "B", ttl).await.unwrap(), "{}: B took A's lease", db.name);
        assert!(b.try_lease("replica:B", "B", ttl).await.unwrap());
        assert_eq!(
            a.live_leases("replica:").await.unwrap(),
            vec![("replica:B".to_string(), "B".to_string())],
            "{}: live leases by name prefix",
            db.name
        );
        assert!(a.try_lease("reconciler", "A", ttl).await.unwrap(), "renewing one's own lease works");
        tokio::time::sleep(ttl + Duration::from_millis(200)).await;
        assert!(b.try_lease("reconciler", "B", ttl).await.unwrap(), "{}: an expired lease is taken over", db.name);
        assert!(!a.try_lease("reconciler", "A", ttl).await.unwrap());

        // Workflow leases: claimed by one, a write by the other is refused, taken over on expiry.
        let (u, s) = (user(1), sku("L", 1));
        a.create_user(&u, None, &audit("u")).await.unwrap();
        a.create_sku(&s, &audit("s")).await.unwrap();
        let mut rec = cloud_pc(u.id, s.id);
        rec.state.phase = cloudpc_types::provisioning::Phase::Forward;
        a.insert_cloud_pc(&mut rec, None).await.unwrap();
        let claimed_a = a.claim_idle_workflows("A", ttl, 10).await.unwrap();
        let claimed_b = b.claim_idle_workflows("B", ttl, 10).await.unwrap();
        assert_eq!((claimed_a, claimed_b), (vec![rec.pc.id], vec![]), "{}", db.name);
        assert!(!b.claim_workflow(rec.pc.id, "B", ttl).await.unwrap());
        let mut theirs = b.get_cloud_pc_record(rec.pc.id).await.unwrap();
        let e = b.save_cloud_pc(&mut theirs, None, None, Some("B")).await.unwrap_err();
        assert!(matches!(e, StoreError::LeaseLost(_)), "{}: {e:?}", db.name);
        a.save_cloud_pc(&mut rec, None, None, Some("A")).await.unwrap();
        assert!(a.renew_workflows(&[rec.pc.id], "A", ttl).await.unwrap().is_empty());
        tokio::time::sleep(ttl + Duration::from_millis(200)).await;
        assert_eq!(b.claim_idle_workflows("B", ttl, 10).await.unwrap(), vec![rec.pc.id]);
        assert_eq!(a.renew_workflows(&[rec.pc.id], "A", ttl).await.unwrap(), vec![rec.pc.id], "A lost it");
        let e = a.save_cloud_pc(&mut rec, None, None, Some("A")).await.unwrap_err();
        assert!(matches!(e, StoreError::LeaseLost(_)), "{}: {e:?}", db.name);
    }
}

#[tokio::test]
async fn test_a_console_ticket_is_taken_once_across_replicas() {
    for db in backends().await {
        let (a, b) = (db.open().await, db.open().await);
        let pc = Uuid::new_v4();
        let expires = Utc::now() + chrono::Duration::seconds(30);
        a.put_console_ticket("digest-1", pc, None, "{\"grant\":1}", expires).await.unwrap();
        let (x, y) = tokio::join!(a.take_console_ticket("digest-1"), b.take_console_ticket("digest-1"));
        let taken = [x.unwrap(), y.unwrap()];
        assert_eq!(taken.iter().filter(|t| t.is_some()).count(), 1, "{}: {taken:?}", db.name);
        a.put_console_ticket("digest-2", pc, None, "{}", Utc::now() - chrono::Duration::seconds(1)).await.unwrap();
        assert_eq!(b.take_console_ticket("digest-2").await.unwrap(), None, "expired tickets are refused");
        a.put_console_ticket("digest-3", pc, Some(Uuid::new_v4()), "{}", expires).await.unwrap();
        b.drop_console_tickets(Some(pc), None).await.unwrap();
        assert_eq!(a.take_console_ticket("digest-3").await.unwrap(), None);
    }
}

fn five_then_lock(failures: u32) -> Option<Duration> {
    (failures >= 5).then_some(Duration::from_secs(30))
}

#[tokio::test]
async fn test_wrong_passwords_spread_over_replicas_lock_the_account() {
    for db in backends().await {
        let (a, b) = (db.open().await, db.open().await);
        let now = Utc::now();
        for i in 0..5 {
            let store = if i % 2 == 0 { &a } else { &b };
            assert_eq!(store.count_sign_in_attempt("Someone@Contoso.com", now, five_then_lock).await.unwrap(), None);
        }
        let locked = b.count_sign_in_attempt("someone@contoso.com", now, five_then_lock).await.unwrap();
        assert!(locked.is_some_and(|t| t > now), "{}: five failures over two replicas lock the account", db.name);
        a.clear_sign_in_failures("SOMEONE@contoso.com").await.unwrap();
        assert_eq!(b.sign_in_failure_count().await.unwrap(), 0);
    }
}

#[tokio::test]
async fn test_replicas_starting_together_migrate_once_and_an_older_binary_refuses_a_newer_schema() {
    let url = common::fresh_pg_database().await;
    let (x, y, z) = tokio::join!(
        cloudpc_store::PgStore::connect(&url),
        cloudpc_store::PgStore::connect(&url),
        cloudpc_store::PgStore::connect(&url)
    );
    x.unwrap();
    y.unwrap();
    z.unwrap();
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (9999, 'from a newer cloudpc', true, '\\x00', 1)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    match cloudpc_store::PgStore::connect(&url).await {
        Err(e @ StoreError::SchemaTooNew { database: 9999, .. }) => {
            assert!(e.to_string().contains("newer than this cloudpc knows"), "{e}")
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("an older binary opened a newer schema"),
    }
}

/// Many users claiming from one warm pool at once, half on each replica: every machine goes to
/// one user, and the users without one get `None`. Only machines that are claimable are taken:
/// booted, idle, of the policy, and built to its current fingerprint.
#[tokio::test]
async fn test_warm_pool_claims_across_replicas_never_give_one_machine_twice() {
    use cloudpc_types::cloud_pc::CloudPcStatus;
    use cloudpc_types::provisioning::{Phase, PoolMember};
    for db in backends().await {
        let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
        let (policy, sku) = (Uuid::new_v4(), Uuid::new_v4());
        let key = PoolMember::claim_key(policy, "f");
        let pooled = |policy: Uuid, fingerprint: &str, ready: bool| {
            let mut rec = cloud_pc(Uuid::new_v4(), sku);
            rec.state.user_id = rec.pc.id;
            rec.pc.status = if ready { CloudPcStatus::Pooled } else { CloudPcStatus::Provisioning };
            rec.state.pool = Some(PoolMember { policy_id: policy, fingerprint: fingerprint.into(), ready });
            rec
        };
        let mut machines = Vec::new();
        for _ in 0..3 {
            let mut rec = pooled(policy, "f", true);
            a.insert_cloud_pc(&mut rec, None).await.unwrap();
            assert_eq!(rec.claimable_as().as_deref(), Some(key.as_str()));
            machines.push(rec.pc.id);
        }
        // None of these is claimable here: another policy's, one still booting, a stale one (built
        // to settings the policy no longer has), and one whose workflow runs (being rebuilt).
        let mut others =
            vec![pooled(Uuid::new_v4(), "f", true), pooled(policy, "f", false), pooled(policy, "old", true)];
        let mut rebuilding = pooled(policy, "f", true);
        rebuilding.state.phase = Phase::UndoThenRestart;
        others.push(rebuilding);
        for rec in &mut others {
            a.insert_cloud_pc(rec, None).await.unwrap();
        }

        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (user, key) = (Uuid::new_v4(), key.clone());
            tasks.push(tokio::spawn(async move {
                let claim = Box::new(move |rec: &mut cloudpc_types::provisioning::CloudPcRecord| {
                    rec.state.user_id = user;
                    rec.state.pool = None;
                    audit("Claim pooled CloudPc")
                });
                store.claim_pooled(&key, sku, claim).await.unwrap().map(|r| (r.pc.id, r.state.user_id, user))
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            if let Some(claimed) = t.await.unwrap() {
                got.push(claimed);
            }
        }
        let mut ids: Vec<Uuid> = got.iter().map(|(id, _, _)| *id).collect();
        ids.sort();
        machines.sort();
        assert_eq!(ids, machines, "{}: each ready machine once", db.name);
        for (id, stored_user, claimer) in got {
            assert_eq!(stored_user, claimer, "{}", db.name);
            let rec = b.get_cloud_pc_record(id).await.unwrap();
            assert_eq!((rec.state.user_id, rec.state.pool.clone()), (claimer, None), "{}: stored", db.name);
        }
        let none = Box::new(|_: &mut cloudpc_types::provisioning::CloudPcRecord| audit("Claim pooled CloudPc"));
        assert!(a.claim_pooled(&key, sku, none).await.unwrap().is_none(), "{}: the pool is empty", db.name);
    }
}
