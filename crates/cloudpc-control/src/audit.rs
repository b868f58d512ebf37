//! Who is acting, and the audit events that record what they did.
//!
//! Every change carries an [`AuditEvent`] built here and stored in the same transaction. The
//! modified properties are a field-by-field diff of the resource's JSON before and after.

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use cloudpc_types::audit::{AuditActor, AuditEvent, AuditOperationType, AuditProperty, AuditResource, AuditResult};
use cloudpc_types::auth::Role;

/// The caller of an app-layer method: a token's holder, or cloudpc's own background work.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: Option<Uuid>,
    pub name: String,
    pub role: Role,
    pub ip_address: Option<String>,
    pub system: bool,
}

impl Actor {
    /// cloudpc itself, for changes made by background tasks.
    pub fn system() -> Self {
        Self { id: None, name: "cloudpc".into(), role: Role::CloudPcAdministrator, ip_address: None, system: true }
    }

    fn to_audit(&self) -> AuditActor {
        AuditActor {
            actor_type: if self.system { "application" } else { "itPro" }.into(),
            user_id: self.id.map(|i| i.to_string()),
            user_principal_name: (!self.system).then(|| self.name.clone()),
            application_display_name: self.system.then(|| "cloudpc".to_string()),
            ip_address: self.ip_address.clone(),
            user_permissions: vec![self.role.display_name().to_string()],
        }
    }
}

/// What one audit event says happened to one resource.
pub struct Change<'a> {
    pub component: &'a str,
    /// Graph-style activity type, such as "Create ProvisioningPolicy".
    pub activity: String,
    pub operation: AuditOperationType,
    pub resource_type: &'a str,
    pub resource_id: String,
    pub resource_name: String,
}

impl Change<'_> {
    /// Builds the event; `before`/`after` give the modified properties (either may be absent).
    pub fn event<T: Serialize>(self, actor: &Actor, before: Option<&T>, after: Option<&T>) -> AuditEvent {
        let modified = diff(before.map(to_value), after.map(to_value));
        self.event_with(actor, modified)
    }

    pub fn event_with(self, actor: &Actor, modified_properties: Vec<AuditProperty>) -> AuditEvent {
        AuditEvent {
            id: Uuid::new_v4(),
            display_name: format!("{} - {}", self.activity, self.resource_name),
            component_name: self.component.into(),
            activity: self.activity.clone(),
            activity_date_time: Utc::now(),
            activity_type: self.activity,
            activity_operation_type: self.operation,
            activity_result: AuditResult::Success,
            correlation_id: Uuid::new_v4(),
            category: "cloudPC".into(),
            actor: actor.to_audit(),
            resources: vec![AuditResource {
                display_name: self.resource_name,
                resource_type: self.resource_type.into(),
                resource_id: self.resource_id,
                modified_properties,
            }],
        }
    }
}

/// One property that changed, for events whose change is not a whole resource (membership, ...).
pub fn property(name: &str, old: Option<String>, new: Option<String>) -> AuditProperty {
    AuditProperty { display_name: name.into(), old_value: old, new_value: new }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn render(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Top-level fields whose value differs, skipping bookkeeping timestamps.
fn diff(before: Option<Value>, after: Option<Value>) -> Vec<AuditProperty> {
    let empty = serde_json::Map::new();
    let b = before.as_ref().and_then(Value::as_object).unwrap_or(&empty);
    let a = after.as_ref().and_then(Value::as_object).unwrap_or(&empty);
    let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !k.ends_with("DateTime"))
        .filter_map(|k| {
            let (old, new) = (b.get(k).unwrap_or(&Value::Null), a.get(k).unwrap_or(&Value::Null));
            (old != new).then(|| property(k, render(old), render(new)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_diff_reports_only_changed_fields() {
        let before = json!({"displayName": "a", "description": "x", "lastModifiedDateTime": "t1"});
        let after = json!({"displayName": "b", "description": "x", "lastModifiedDateTime": "t2"});
        let d = diff(Some(before), Some(after));
        assert_eq!(d, vec![property("displayName", Some("a".into()), Some("b".into()))]);
    }

    #[test]
    fn test_diff_create_lists_every_field() {
        let d = diff(None, Some(json!({"a": 1, "b": true})));
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].new_value.as_deref(), Some("1"));
        assert_eq!(d[0].old_value, None);
    }
}
