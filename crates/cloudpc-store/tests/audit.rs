//! The audit log in both stores: paging and filtering in SQL, and retention (old events go,
//! recent ones cannot be deleted at all).

mod common;

use chrono::{Duration, Utc};

use cloudpc_store::FieldEquals;
use cloudpc_types::audit::AuditEvent;

fn event(activity: &str, days_ago: i64) -> AuditEvent {
    let mut e = common::audit(activity);
    e.activity_date_time = Utc::now() - Duration::days(days_ago);
    e.actor.user_principal_name = Some("Admin@Contoso.com".into());
    e
}

#[tokio::test]
async fn test_audit_pages_and_filters_in_sql() {
    for db in common::backends().await {
        let store = db.open().await;
        println!("{}", db.name);
        for i in 0..25 {
            store
                .record_audit_event(&event(if i % 5 == 0 { "Delete Group" } else { "Create Group" }, 0))
                .await
                .unwrap();
        }
        let (page, total) = store.audit_events_page(&[], 10, 10).await.unwrap();
        assert_eq!((page.len(), total), (10, 25));
        let (last, _) = store.audit_events_page(&[], 20, 10).await.unwrap();
        assert_eq!(last.len(), 5);
        let deletes = [FieldEquals { path: vec!["activity".into()], value: "delete group".into() }];
        let (page, total) = store.audit_events_page(&deletes, 0, 100).await.unwrap();
        assert_eq!((page.len(), total), (5, 5), "strings compare without regard to case");
        let nested =
            [FieldEquals { path: vec!["actor".into(), "userPrincipalName".into()], value: "admin@contoso.com".into() }];
        assert_eq!(store.audit_events_page(&nested, 0, 1).await.unwrap().1, 25);
        let hostile = [FieldEquals { path: vec!["a\"') OR 1=1 --".into()], value: "x".into() }];
        assert_eq!(store.audit_events_page(&hostile, 0, 100).await.unwrap().1, 0, "field names are bound, not spliced");
        let one = &page[0];
        assert_eq!(store.get_audit_event(one.id).await.unwrap().id, one.id);
        assert!(store.audit_events_page(&[], usize::MAX, usize::MAX).await.unwrap().0.is_empty());
    }
}

#[tokio::test]
async fn test_audit_retention_deletes_only_expired_events() {
    for db in common::backends().await {
        let store = db.open().await;
        println!("{}", db.name);
        let old = event("Old", 400);
        let recent = event("Recent", 10);
        store.record_audit_event(&old).await.unwrap();
        store.record_audit_event(&recent).await.unwrap();
        assert_eq!(store.prune_audit_events(365).await.unwrap(), 1);
        assert!(store.get_audit_event(old.id).await.is_err());
        assert!(store.get_audit_event(recent.id).await.is_ok());
        // A shorter retention takes the recent one too; nothing else may delete events.
        assert_eq!(store.prune_audit_events(5).await.unwrap(), 1);
        let kept = event("Kept", 0);
        store.record_audit_event(&kept).await.unwrap();
        assert_eq!(store.prune_audit_events(1).await.unwrap(), 0);
        assert!(store.get_audit_event(kept.id).await.is_ok());
    }
}
