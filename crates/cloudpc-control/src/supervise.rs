//! Supervision of background work: every reconciler action and every provisioning workflow runs
//! as its own task, so a panic in it (a bug, or input no check foresaw) ends that one piece of
//! work, is logged and shown on the Cloud PC it concerns (with an audit event), and never stops
//! the reconciler loop or the workflows of other Cloud PCs. A crash loop at start-up, where one
//! bad record aborts every pass, is what this prevents.

use std::any::Any;
use std::future::Future;

use chrono::Utc;
use uuid::Uuid;

use cloudpc_types::cloud_pc::CloudPcStatus;
use cloudpc_types::provisioning::Phase;

use crate::audit::property;
use crate::App;

/// Runs `work` as its own task; a panic comes back as its message.
pub(crate) async fn supervised<F, T>(work: F) -> std::result::Result<T, String>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => Err(panic_message(e.into_panic())),
        Err(e) => Err(format!("the task was cancelled ({e})")),
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let text = match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(other) => other.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_else(|| "(no message)".into()),
    };
    // Bounded: the message lands in the database and the audit log.
    text.chars().take(500).collect()
}

impl App {
    /// Takes one injected panic for the point, if any are left (testing only).
    pub(crate) fn take_injected_panic(&self, point: &str) -> bool {
        let mut panics = self.panics.lock().expect("panics");
        match panics.get_mut(point) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Panics when a test asked for one at this point (hidden `--inject-panic POINT:N`).
    pub(crate) fn maybe_inject_panic(&self, point: &str) {
        if self.take_injected_panic(point) {
            panic!("injected panic at {point} (testing)");
        }
    }

    /// Shows an internal error on the Cloud PC it happened for: `failed`, idle (so that no pass
    /// runs into it again by itself), the reason, and an audit event. Retry starts it again.
    /// `policy` is the policy it was being provisioned for, if known: the Cloud PC keeps naming
    /// it, so the reconciler sees it as that policy's and leaves it be instead of deprovisioning.
    pub(crate) async fn report_internal_error(&self, pc: Uuid, policy: Option<Uuid>, during: &str, message: &str) {
        tracing::error!(cloud_pc = %pc, during, panic = message, "internal error; this Cloud PC is marked failed, the others go on");
        let mut rec = match self.store.get_cloud_pc_record(pc).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(cloud_pc = %pc, error = %e, "could not record the internal error on the Cloud PC");
                return;
            }
        };
        rec.state.phase = Phase::Idle;
        rec.pc.status = CloudPcStatus::Failed;
        self.retire_failed_pool_machine(&mut rec);
        if let Some(policy) = policy {
            rec.pc.provisioning_policy_id = Some(policy);
            if let Ok(p) = self.store.get_policy(policy).await {
                rec.pc.provisioning_policy_name = Some(p.display_name);
            }
        }
        rec.pc.status_detail = Some(format!(
            "cloudpc hit an internal error while {during}: {message}. Other Cloud PCs are not affected; report \
             this, and select Retry once it is fixed."
        ));
        rec.pc.last_modified_date_time = Utc::now();
        let mut audit = crate::cloud_pcs::system_event("Internal error CloudPc", &rec);
        audit.resources[0].modified_properties.push(property("error", None, Some(message.to_string())));
        if let Err(e) = self.save_record(&mut rec, None, Some(&audit)).await {
            tracing::error!(cloud_pc = %pc, error = %e, "could not record the internal error on the Cloud PC");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_supervised_panic_returns_its_message() {
        let r = supervised(async { panic!("boom {}", 7) }).await;
        assert_eq!(r.unwrap_err(), "boom 7");
        let r: std::result::Result<(), String> = supervised(async { std::panic::panic_any(3u8) }).await;
        assert_eq!(r.unwrap_err(), "(no message)");
        assert_eq!(supervised(async { 5 }).await, Ok(5));
    }
}
