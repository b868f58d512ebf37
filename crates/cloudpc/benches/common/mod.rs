//! What the benchmarks share: their settings from the environment and the audit event they
//! write with seeded data.
#![allow(dead_code)]

use chrono::Utc;
use uuid::Uuid;

use cloudpc_types::audit::{AuditActor, AuditEvent, AuditOperationType, AuditResult};

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn part(name: &str) -> bool {
    std::env::var("BENCH_PARTS").map(|p| p.split(',').any(|x| x == name)).unwrap_or(true)
}

pub fn audit(activity: &str) -> AuditEvent {
    AuditEvent {
        id: Uuid::new_v4(),
        display_name: activity.into(),
        component_name: "Benchmark".into(),
        activity: activity.into(),
        activity_date_time: Utc::now(),
        activity_type: activity.into(),
        activity_operation_type: AuditOperationType::Create,
        activity_result: AuditResult::Success,
        correlation_id: Uuid::new_v4(),
        category: "cloudPC".into(),
        actor: AuditActor {
            actor_type: "itPro".into(),
            user_id: None,
            user_principal_name: Some("bench@contoso.com".into()),
            application_display_name: None,
            ip_address: None,
            user_permissions: vec![],
        },
        resources: vec![],
    }
}
