//! Console access to a Cloud PC: short-lived, single-use tickets bound to the caller and the Cloud
//! PC, and the registry of open console connections, so they can be closed when access ends.
//!
//! The browser cannot send a bearer token on a WebSocket, so it first asks (authenticated) for a
//! ticket and then presents it once to the gateway. Only the ticket's SHA-256 is kept, in the
//! database, so a ticket issued by one replica is redeemed at another and is still single-use
//! (the redeeming replica deletes the row it reads). Open consoles are relays inside one replica;
//! closing them everywhere goes through the change notices.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::Utc;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::cloud_pc::{CloudPcStatus, ConsoleTicket, PowerState, PowerStateDetail};
use cloudpc_types::provisioning::CloudPcRecord;

use cloudpc_types::auth::Role;

use crate::audit::{property, Actor, Change};
use crate::directory::parse_id;
use crate::{App, Error, Result};

/// What a ticket grants, as stored with its digest.
#[derive(Serialize, Deserialize)]
struct Pending {
    cloud_pc: Uuid,
    /// The Cloud PC's generation when the ticket was issued: a reprovision ends it.
    generation: u32,
    actor_id: Option<Uuid>,
    actor_name: String,
    role: Role,
    ip_address: Option<String>,
}

impl Pending {
    fn actor(&self) -> Actor {
        Actor {
            id: self.actor_id,
            name: self.actor_name.clone(),
            role: self.role,
            ip_address: self.ip_address.clone(),
            system: false,
        }
    }
}

#[derive(Default)]
pub(crate) struct Consoles {
    open: OpenConsoles,
}

/// The open console connections, per Cloud PC: each relay holds its Cloud PC's notifier while it
/// runs, and the entry goes when the last relay of that Cloud PC ends, so the map holds only
/// Cloud PCs with a console open now.
#[derive(Default)]
pub(crate) struct OpenConsoles(std::sync::Mutex<HashMap<Uuid, Arc<Notify>>>);

impl OpenConsoles {
    fn closer(&self, cloud_pc: Uuid) -> Arc<Notify> {
        self.0.lock().expect("consoles").entry(cloud_pc).or_default().clone()
    }

    /// Called by a relay that ended, after dropping its notifier.
    fn release(&self, cloud_pc: Uuid) {
        let mut open = self.0.lock().expect("consoles");
        if open.get(&cloud_pc).is_some_and(|n| Arc::strong_count(n) == 1) {
            open.remove(&cloud_pc);
        }
    }

    fn close(&self, cloud_pc: Uuid) {
        if let Some(n) = self.0.lock().expect("consoles").get(&cloud_pc) {
            n.notify_waiters();
        }
    }

    fn len(&self) -> usize {
        self.0.lock().expect("consoles").len()
    }
}

/// A console relay marks its Cloud PC in use for this long, and renews the mark at half of it.
/// The mark is a lease row (`console:<id>`, shared by every relay of the Cloud PC), so every
/// replica sees when a Cloud PC's console was last open: its end is when the Cloud PC went idle.
pub const CONSOLE_IN_USE: Duration = Duration::from_secs(60);
pub(crate) const CONSOLE_MARK: &str = "console:";
const CONSOLE_MARK_OWNER: &str = "console";

fn digest(ticket: &str) -> String {
    Sha256::digest(ticket.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn usable(rec: &CloudPcRecord) -> bool {
    matches!(
        rec.pc.status,
        CloudPcStatus::Provisioned | CloudPcStatus::ProvisionedWithWarnings | CloudPcStatus::InGracePeriod
    ) && rec.pc.power_state != PowerState::PoweredOff
}

impl App {
    /// Issues a ticket for the Cloud PC's console: administrators may open any Cloud PC, a signed-in
    /// user only their own. A hibernated Cloud PC is resumed first (the answer waits for it).
    pub async fn issue_console_ticket(&self, actor: &Actor, id: &str) -> Result<ConsoleTicket> {
        let mut rec = self.store.get_cloud_pc_record(parse_id("cloudPC", id)?).await?;
        let own = actor.role == Role::CloudPcUser && actor.id == Some(rec.state.user_id);
        if !actor.role.can_write() && !own {
            return Err(Error::Forbidden(
                "only a Cloud PC Administrator or the Cloud PC's user may open its console".into(),
            ));
        }
        if rec.pc.power_state_detail == Some(PowerStateDetail::Saved) {
            let _power = crate::power::lock().await;
            // Read again under the lock: another request may have resumed it meanwhile.
            rec = self.store.get_cloud_pc_record(rec.pc.id).await?;
            if rec.pc.power_state_detail == Some(PowerStateDetail::Saved) {
                self.start_vm(actor, &mut rec, "resume").await?;
            }
        }
        if !usable(&rec) {
            return Err(Error::Conflict("the Cloud PC is not running, so its console cannot be opened".into()));
        }
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let ticket = URL_SAFE_NO_PAD.encode(bytes);
        let ttl = self.config.console_ticket_ttl;
        let expires = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
        let pending = Pending {
            cloud_pc: rec.pc.id,
            generation: rec.state.generation,
            actor_id: actor.id,
            actor_name: actor.name.clone(),
            role: actor.role,
            ip_address: actor.ip_address.clone(),
        };
        let grant = serde_json::to_string(&pending).map_err(|e| Error::HostIo(format!("ticket: {e}")))?;
        let user = (actor.role == Role::CloudPcUser).then_some(actor.id).flatten();
        self.store.put_console_ticket(&digest(&ticket), rec.pc.id, user, &grant, expires).await?;
        Ok(ConsoleTicket {
            url: format!("/gateway/console?ticket={ticket}"),
            ticket,
            cloud_pc_id: rec.pc.id,
            expiration_date_time: expires,
        })
    }

    /// Takes a ticket (it cannot be used again) and finds the console it opens. Everything the
    /// ticket was issued on is checked again, since seconds may have passed: the user still
    /// exists, is enabled and is still the Cloud PC's user, and the Cloud PC was not reprovisioned.
    pub async fn redeem_console_ticket(
        &self,
        ticket: &str,
    ) -> Result<(Actor, CloudPcRecord, Box<dyn cloudpc_hypervisor::ConsoleStream>)> {
        let refused = || {
            Error::Unauthenticated("the console ticket is not valid: it is unknown, used already, or expired".into())
        };
        // Tickets are 43 characters; anything far longer is not one, and is not hashed.
        if ticket.len() > 128 {
            return Err(refused());
        }
        let grant = self.store.take_console_ticket(&digest(ticket)).await?.ok_or_else(refused)?;
        let pending: Pending = serde_json::from_str(&grant).map_err(|_| refused())?;
        let actor = pending.actor();
        let rec = self.store.get_cloud_pc_record(pending.cloud_pc).await.map_err(|_| refused())?;
        if rec.state.generation != pending.generation {
            return Err(Error::Unauthenticated(
                "the console ticket is not valid any more: the Cloud PC was reprovisioned".into(),
            ));
        }
        if actor.role == Role::CloudPcUser {
            let revoked =
                || Error::Unauthenticated("the console ticket is not valid any more: access was revoked".into());
            let id = actor.id.ok_or_else(revoked)?;
            if Some(rec.state.user_id) != actor.id {
                return Err(revoked());
            }
            match self.store.get_user(id).await {
                Ok(user) if user.account_enabled => {}
                _ => return Err(revoked()),
            }
        }
        if !usable(&rec) {
            return Err(Error::Conflict("the Cloud PC is not running any more".into()));
        }
        let (Some(host), Some(domain)) = (rec.state.resources.host.as_deref(), rec.state.resources.domain.as_deref())
        else {
            return Err(Error::Conflict("the Cloud PC has no VM".into()));
        };
        // A host in this process connects to the VM's loopback console; a host behind an agent
        // relays it (the gateway never reaches a console port on another machine itself).
        let hv = self.host(host).await?;
        let stream =
            hv.open_console(domain).await.map_err(|e| Error::Conflict(format!("the console did not open: {e}")))?;
        Ok((actor, rec, stream))
    }

    /// Marks the Cloud PC's console in use, then renews the mark until the task is dropped; the
    /// relay runs it for as long as it runs. Idle hibernation counts from the mark's end.
    pub async fn keep_console_in_use(&self, cloud_pc: Uuid) {
        loop {
            self.mark_console(cloud_pc, CONSOLE_IN_USE).await;
            tokio::time::sleep(CONSOLE_IN_USE / 2).await;
        }
    }

    /// The relay ended: the Cloud PC is idle from now (unless another relay renews the mark).
    pub async fn console_closed(&self, cloud_pc: Uuid) {
        self.mark_console(cloud_pc, Duration::ZERO).await;
    }

    async fn mark_console(&self, cloud_pc: Uuid, for_: Duration) {
        let name = format!("{CONSOLE_MARK}{cloud_pc}");
        if let Err(e) = self.store.try_lease(&name, CONSOLE_MARK_OWNER, for_).await {
            tracing::warn!(%cloud_pc, error = %e, "could not record that the console is in use; idle hibernation may come early");
        }
    }

    /// Resolves when the Cloud PC's console connections must close.
    pub fn console_closer(&self, cloud_pc: Uuid) -> Arc<Notify> {
        self.consoles.open.closer(cloud_pc)
    }

    /// A relay ended (it dropped its closer first): forgets the Cloud PC once none is open.
    pub fn console_released(&self, cloud_pc: Uuid) {
        self.consoles.open.release(cloud_pc);
    }

    /// Cloud PCs with a console open now.
    pub fn open_console_count(&self) -> usize {
        self.consoles.open.len()
    }

    /// Closes every open console of the Cloud PC (deprovision, reprovision, power off), on every
    /// replica, and refuses the tickets issued for it.
    pub(crate) async fn close_consoles(&self, cloud_pc: Uuid) {
        if let Err(e) = self.store.drop_console_tickets(Some(cloud_pc), None).await {
            tracing::warn!(error = %e, "could not drop console tickets; they expire by themselves");
        }
        self.close_consoles_everywhere(cloud_pc);
    }

    /// This replica's relays of the Cloud PC's console.
    pub(crate) fn close_local_consoles(&self, cloud_pc: Uuid) {
        self.consoles.open.close(cloud_pc);
    }

    /// Closes the consoles of every Cloud PC of a user who lost access (disabled or deleted), on
    /// every replica, and refuses every ticket issued to that user.
    pub(crate) async fn close_consoles_of_user(&self, user: Uuid) {
        if let Err(e) = self.store.drop_console_tickets(None, Some(user)).await {
            tracing::warn!(error = %e, "could not drop console tickets; they expire by themselves");
        }
        self.close_local_consoles_of_user(user).await;
        self.close_user_consoles_everywhere(user);
    }

    /// This replica's relays of the user's Cloud PCs.
    pub(crate) async fn close_local_consoles_of_user(&self, user: Uuid) {
        if let Ok(records) = self.store.list_cloud_pc_records().await {
            for r in records.iter().filter(|r| r.state.user_id == user) {
                self.close_local_consoles(r.pc.id);
            }
        }
    }

    /// Records a console connection opening or closing.
    pub async fn audit_console(&self, actor: &Actor, rec: &CloudPcRecord, connected: bool, duration: Option<Duration>) {
        let activity = if connected { "Connect console CloudPc" } else { "Disconnect console CloudPc" };
        let audit = Change {
            component: "Gateway",
            activity: activity.into(),
            operation: AuditOperationType::Other,
            resource_type: "cloudPC",
            resource_id: rec.pc.id.to_string(),
            resource_name: rec.pc.managed_device_name.clone().unwrap_or_default(),
        }
        .event_with(
            actor,
            vec![property(
                "console",
                None,
                Some(match duration {
                    Some(d) => format!("closed after {:.1}s", d.as_secs_f64()),
                    None => "opened".into(),
                }),
            )],
        );
        if let Err(e) = self.store.record_audit_event(&audit).await {
            tracing::warn!(error = %e, "could not record a console audit event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_open_consoles_forget_a_cloud_pc_when_its_last_relay_ends() {
        let open = OpenConsoles::default();
        let pc = Uuid::new_v4();
        let (a, b) = (open.closer(pc), open.closer(pc));
        assert_eq!(open.len(), 1);
        drop(a);
        open.release(pc);
        assert_eq!(open.len(), 1, "one relay is still open");
        drop(b);
        open.release(pc);
        assert_eq!(open.len(), 0);
        for _ in 0..1000 {
            let other = Uuid::new_v4();
            drop(open.closer(other));
            open.release(other);
        }
        assert_eq!(open.len(), 0, "the map does not grow with consoles that came and went");
    }
}
