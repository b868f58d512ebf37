//! Signing users in to the portal: local accounts with argon2-hashed passwords, server-side
//! sessions, and a limit on wrong passwords per account. A session only says "this user", however
//! they proved it, which leaves room for single sign-on through OpenID Connect later.
//!
//! Users reach only their own Cloud PCs: every portal method takes the signed-in [`Actor`] and
//! answers "not found" for anyone else's, so ids of other Cloud PCs reveal nothing.

use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::auth::Role;
use cloudpc_types::cloud_pc::{CloudPc, PortalCloudPc};
use cloudpc_types::directory::{check_password, User};

use crate::audit::{property, Actor, Change};
use crate::directory::parse_id;
use crate::{App, Error, Result};

/// How long a session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Wrong passwords in a row before the account is locked for a while.
const FREE_FAILURES: u32 = 5;
const BASE_LOCK: Duration = Duration::from_secs(30);
const MAX_LOCK: Duration = Duration::from_secs(15 * 60);
/// Sign-in attempts one client address may make: a burst, then one every few seconds.
pub const SIGN_IN_BURST: u32 = 20;
pub const SIGN_IN_EVERY: Duration = Duration::from_secs(3);
/// Client addresses whose sign-in rate is tracked at once.
pub const MAX_TRACKED_ADDRESSES: usize = 10_000;
/// argon2 checks that run at once (each takes about 19 MiB and tens of milliseconds of a core);
/// more wait, off the async runtime, so a burst of sign-ins cannot stall consoles or the reconciler.
pub const MAX_CONCURRENT_HASHES: usize = 2;
/// Portal actions (restart, rename, console ticket) one user may take: a burst, then one every
/// few seconds.
pub const PORTAL_ACTION_BURST: u32 = 10;
pub const PORTAL_ACTION_EVERY: Duration = Duration::from_secs(6);
/// The longest password accepted (as in Entra).
const MAX_PASSWORD_LEN: usize = 256;

/// How long an account is locked after `failures` wrong passwords in a row: from the fifth, 30 s,
/// doubling with each further one, at most 15 minutes.
fn lockout(failures: u32) -> Option<Duration> {
    (failures >= FREE_FAILURES).then(|| BASE_LOCK.saturating_mul(1 << (failures - FREE_FAILURES).min(5)).min(MAX_LOCK))
}

/// Checks the password rules, then hashes it with argon2 (the crate's default parameters).
pub fn hash_password(password: &str) -> Result<String> {
    check_password(password)?;
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::invalid("passwordProfile.password", format!("could not be hashed: {e}")))
}

fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

fn sha(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn user_actor(user: &User, ip: Option<String>) -> Actor {
    Actor {
        id: Some(user.id),
        name: user.user_principal_name.clone(),
        role: Role::CloudPcUser,
        ip_address: ip,
        system: false,
    }
}

/// A session: the cookie's secret and when it ends.
pub struct Session {
    pub secret: String,
    pub expires: DateTime<Utc>,
    pub user: User,
}

impl App {
    /// Runs argon2 on the blocking pool, at most `MAX_CONCURRENT_HASHES` at once.
    pub(crate) async fn hash_work<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let _permit = self.hash_slots.acquire().await.map_err(|_| Error::Busy("the server is shutting down".into()))?;
        tokio::task::spawn_blocking(work).await.map_err(|e| Error::HostIo(format!("password hashing failed: {e}")))
    }

    /// Counts the attempt as a failure before the password is checked (and forgets it if the
    /// password is right), so parallel guesses cannot all pass the check before any is counted.
    /// The count lives in the database: guesses spread over replicas add up.
    async fn reserve_attempt(&self, key: &str) -> Result<()> {
        let now = Utc::now();
        if let Some(until) = self.store.count_sign_in_attempt(key, now, lockout).await? {
            let left = (until - now).num_seconds().max(1) as u64;
            return Err(Error::TooManyAttempts { retry_after: left });
        }
        Ok(())
    }

    /// Accounts whose failed sign-ins are remembered now (tests read it through the memory bound).
    pub async fn tracked_sign_in_accounts(&self) -> Result<u64> {
        Ok(self.store.sign_in_failure_count().await?)
    }

    /// Checks the password; wrong ones lock the account for longer and longer after five in a row.
    pub async fn sign_in(&self, upn: &str, password: &str, ip: Option<String>) -> Result<Session> {
        // Bounded first: nothing below keeps or hashes more than these few bytes.
        if upn.len() > 113 {
            return Err(Error::invalid("userPrincipalName", "is longer than 113 characters"));
        }
        if password.len() > MAX_PASSWORD_LEN {
            return Err(Error::invalid("password", format!("is longer than {MAX_PASSWORD_LEN} characters")));
        }
        if !self.config.local_sign_in {
            return Err(Error::Forbidden(
                "local accounts are switched off here; sign in through your organisation's identity provider".into(),
            ));
        }
        if let Some(addr) = &ip {
            self.sign_in_rate.check(addr).map_err(|retry_after| Error::RateLimited {
                what: "too many sign-in attempts from this address".into(),
                retry_after,
            })?;
        }
        let key = upn.to_ascii_lowercase();
        self.reserve_attempt(&key).await?;
        let creds = self.store.user_credentials(upn).await?;
        // Verify against something even for unknown users, so timing does not tell who exists.
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (password, hash, enabled) = match &creds {
            Some((user, Some(hash))) => (password.to_string(), hash.clone(), user.account_enabled),
            _ => {
                let dummy = DUMMY.get_or_init(|| hash_password("Dummy-password-1").unwrap_or_default()).clone();
                (password.to_string(), dummy, false)
            }
        };
        let ok = self.hash_work(move || verify(&password, &hash)).await? && enabled;
        let Some((user, _)) = creds.filter(|_| ok) else {
            self.audit_failed_sign_in(upn, ip, Vec::new()).await;
            return Err(Error::Unauthenticated(
                "the user name or password is not right, or the account is disabled".into(),
            ));
        };
        self.store.clear_sign_in_failures(&key).await?;
        self.start_session(user, ip, "started").await
    }

    /// Opens a portal session for a user whose identity was proven (`how` goes into the audit).
    pub(crate) async fn start_session(&self, user: User, ip: Option<String>, how: &str) -> Result<Session> {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let secret = URL_SAFE_NO_PAD.encode(bytes);
        let expires = Utc::now() + chrono::Duration::from_std(SESSION_LIFETIME).unwrap_or_default();
        self.store.create_session(&sha(&secret), user.id, expires).await?;
        let audit = Change {
            component: "Portal",
            activity: "Sign in User".into(),
            operation: AuditOperationType::Other,
            resource_type: "user",
            resource_id: user.id.to_string(),
            resource_name: user.user_principal_name.clone(),
        }
        .event_with(&user_actor(&user, ip), vec![property("session", None, Some(how.to_string()))]);
        self.store.record_audit_event(&audit).await?;
        Ok(Session { secret, expires, user })
    }

    /// A failed sign-in is audited under the name that was tried (bounded above, and rate-limited
    /// per address, so this cannot flood the log faster than sign-ins are allowed).
    /// `more` adds what a sign-in through a provider knows (the provider, the reason).
    pub(crate) async fn audit_failed_sign_in(
        &self,
        upn: &str,
        ip: Option<String>,
        more: Vec<cloudpc_types::audit::AuditProperty>,
    ) {
        let actor = Actor { id: None, name: upn.to_string(), role: Role::CloudPcUser, ip_address: ip, system: false };
        let audit = Change {
            component: "Portal",
            activity: "Sign in failed User".into(),
            operation: AuditOperationType::Other,
            resource_type: "user",
            resource_id: String::new(),
            resource_name: upn.to_string(),
        }
        .event_with(&actor, [vec![property("session", None, Some("refused".into()))], more].concat());
        if let Err(e) = self.store.record_audit_event(&audit).await {
            tracing::warn!(error = %e, "could not record a failed sign-in");
        }
    }

    /// The signed-in user behind a session cookie; disabled accounts lose their sessions.
    pub async fn session_actor(&self, secret: &str, ip: Option<String>) -> Result<Actor> {
        let refused = || Error::Unauthenticated("sign in first".into());
        if secret.len() > 128 {
            return Err(refused());
        }
        match self.store.find_session(&sha(secret)).await? {
            Some(user) if user.account_enabled => Ok(user_actor(&user, ip)),
            _ => Err(refused()),
        }
    }

    pub async fn sign_out(&self, secret: &str) -> Result<()> {
        Ok(self.store.delete_session(&sha(secret)).await?)
    }

    pub async fn me(&self, actor: &Actor) -> Result<User> {
        let id = actor.id.ok_or_else(|| Error::Unauthenticated("sign in first".into()))?;
        Ok(self.store.get_user(id).await?)
    }

    /// The signed-in user's Cloud PCs, each with the step it is on.
    pub async fn my_cloud_pcs(&self, actor: &Actor) -> Result<Vec<PortalCloudPc>> {
        let mut out = Vec::new();
        for rec in self.store.list_cloud_pc_records().await?.into_iter().filter(|r| Some(r.state.user_id) == actor.id) {
            let last = self.store.list_steps(rec.pc.id).await?.into_iter().max_by_key(|s| s.start_date_time);
            out.push(PortalCloudPc {
                current_step: last.as_ref().map(|s| s.name.clone()),
                current_step_status: last.map(|s| s.status),
                cloud_pc: rec.pc,
            });
        }
        Ok(out)
    }

    /// One of the user's own Cloud PCs; anyone else's is "not found".
    pub async fn my_cloud_pc(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        let not_found = || Error::NotFound { kind: "cloudPC", id: id.to_string() };
        let rec = self.store.get_cloud_pc_record(parse_id("cloudPC", id)?).await.map_err(|_| not_found())?;
        if actor.role != Role::CloudPcUser || Some(rec.state.user_id) != actor.id {
            return Err(not_found());
        }
        Ok(rec.pc)
    }

    /// Portal actions write audit events (and some start work on the host): a user gets a few at
    /// once, then one every few seconds, so a script in a browser tab cannot flood the log.
    fn portal_action(&self, actor: &Actor) -> Result<()> {
        let key = actor.id.map(|u| u.to_string()).unwrap_or_default();
        self.portal_actions.check(&key).map_err(|retry_after| Error::RateLimited {
            what: "too many actions on your Cloud PCs in a short time".into(),
            retry_after,
        })
    }

    pub async fn my_reboot(&self, actor: &Actor, id: &str) -> Result<CloudPc> {
        self.my_cloud_pc(actor, id).await?;
        self.portal_action(actor)?;
        self.reboot(actor, id).await
    }

    pub async fn my_rename(&self, actor: &Actor, id: &str, name: &str) -> Result<CloudPc> {
        self.my_cloud_pc(actor, id).await?;
        self.portal_action(actor)?;
        self.rename(actor, id, name).await
    }

    pub async fn my_console_ticket(&self, actor: &Actor, id: &str) -> Result<cloudpc_types::cloud_pc::ConsoleTicket> {
        self.my_cloud_pc(actor, id).await?;
        self.portal_action(actor)?;
        self.issue_console_ticket(actor, id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hash_password_checks_rules_and_verifies() {
        assert!(hash_password("short1A").is_err());
        assert!(hash_password("alllowercaseletters").is_err());
        let h = hash_password("Correct-Horse-9").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("Correct-Horse-9", &h));
        assert!(!verify("correct-horse-9", &h));
    }

    #[test]
    fn test_session_ids_are_hashed() {
        assert_ne!(sha("a"), "a");
        assert_eq!(sha("a").len(), 64);
    }
}
