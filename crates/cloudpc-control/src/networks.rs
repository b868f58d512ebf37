//! Network connections: the organisation's network and Active Directory domain that Cloud PCs
//! of a policy use (Graph's `onPremisesConnections`).
//!
//! Rules, as Windows 365 has them: the name is unique; the join type never changes; a connection
//! a policy uses may only be renamed, and cannot be deleted. The domain account's password is
//! write-only: it is sealed with AES-256-GCM under a key that lives outside the database (the
//! `secrets_key_file` setting), so a copy of the database alone does not give it away, and the
//! sealed value is bound to its connection's id, so it cannot be moved to another row.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::Utc;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::network::{
    HealthCheckStatus, OnPremisesConnection, OnPremisesConnectionCreate, OnPremisesConnectionUpdate,
};
use cloudpc_types::policy::DomainJoinType;

use crate::audit::{property, Actor, Change};
use crate::directory::parse_id;
use crate::{App, Error, Result};

const SEALED_PREFIX: &str = "v1:";

fn change(activity: &str, op: AuditOperationType, c: &OnPremisesConnection) -> Change<'static> {
    Change {
        component: "Network",
        activity: format!("{activity} OnPremisesConnection"),
        operation: op,
        resource_type: "cloudPcOnPremisesConnection",
        resource_id: c.id.to_string(),
        resource_name: c.display_name.clone(),
    }
}

/// The key that seals secrets at rest: 32 random bytes in a file of its own, made (mode 0600) on
/// first use. Replicas must be given the same file.
fn sealing_key(path: &Path) -> Result<LessSafeKey> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            SystemRandom::new().fill(&mut key).map_err(|_| Error::HostIo("no random numbers".into()))?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(mut f) => {
                    f.write_all(&key).map_err(|e| Error::HostIo(format!("cannot write {}: {e}", path.display())))?;
                    key.to_vec()
                }
                // Another replica made it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::read(path).map_err(|e| Error::HostIo(format!("cannot read {}: {e}", path.display())))?
                }
                Err(e) => return Err(Error::HostIo(format!("cannot create {}: {e}", path.display()))),
            }
        }
        Err(e) => return Err(Error::HostIo(format!("cannot read the secrets key {}: {e}", path.display()))),
    };
    let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| {
        Error::HostIo(format!("the secrets key {} must hold exactly 32 bytes, not {}", path.display(), bytes.len()))
    })?;
    Ok(LessSafeKey::new(key))
}

/// Seals `secret` for the row `id`.
pub(crate) fn seal(key_file: &Path, id: Uuid, secret: &str) -> Result<String> {
    let key = sealing_key(key_file)?;
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).map_err(|_| Error::HostIo("no random numbers".into()))?;
    let mut data = secret.as_bytes().to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(id.as_bytes()), &mut data)
        .map_err(|_| Error::HostIo("sealing failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    Ok(format!("{SEALED_PREFIX}{}", STANDARD.encode(out)))
}

/// Opens what `seal` made for the row `id`.
pub(crate) fn unseal(key_file: &Path, id: Uuid, sealed: &str) -> Result<String> {
    let bad = || {
        Error::HostIo("a stored secret cannot be opened: it was sealed under another secrets key, or altered".into())
    };
    let key = sealing_key(key_file)?;
    let raw = STANDARD.decode(sealed.strip_prefix(SEALED_PREFIX).ok_or_else(bad)?).map_err(|_| bad())?;
    if raw.len() < NONCE_LEN {
        return Err(bad());
    }
    let (nonce, rest) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
    let mut data = rest.to_vec();
    let plain = key.open_in_place(nonce, Aad::from(id.as_bytes()), &mut data).map_err(|_| bad())?;
    String::from_utf8(plain.to_vec()).map_err(|_| bad())
}

fn check_password(p: Option<&str>) -> Result<()> {
    match p {
        Some(s) if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) => {
            Err(Error::invalid("adDomainPassword", "must have 1 to 256 characters, none of them control characters"))
        }
        _ => Ok(()),
    }
}

impl App {
    /// Every connection, with `inUse` from the policies that name it.
    pub async fn list_network_connections(&self) -> Result<Vec<OnPremisesConnection>> {
        let policies = self.store.list_policies().await?;
        let mut list = self.store.list_network_connections().await?;
        for c in &mut list {
            let id = c.id.to_string();
            c.in_use = policies.iter().any(|p| {
                p.domain_join_configurations.iter().any(|j| j.on_premises_connection_id.as_deref() == Some(id.as_str()))
            });
        }
        Ok(list)
    }

    pub async fn get_network_connection(&self, id: &str) -> Result<OnPremisesConnection> {
        let id = parse_id("onPremisesConnection", id)?;
        self.list_network_connections()
            .await?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| Error::NotFound { kind: "onPremisesConnection", id: id.to_string() })
    }

    pub async fn create_network_connection(
        &self,
        actor: &Actor,
        input: OnPremisesConnectionCreate,
    ) -> Result<OnPremisesConnection> {
        check_password(input.ad_domain_password.as_deref())?;
        let c = OnPremisesConnection {
            row_version: 0,
            id: Uuid::new_v4(),
            display_name: input.display_name,
            connection_type: input.connection_type.unwrap_or(DomainJoinType::HybridAzureAdJoin),
            ad_domain_name: input.ad_domain_name.map(|d| d.to_ascii_lowercase()),
            ad_domain_username: input.ad_domain_username,
            organizational_unit: input.organizational_unit,
            has_ad_domain_password: input.ad_domain_password.is_some(),
            health_check_status: HealthCheckStatus::Pending,
            health_check_status_detail: None,
            in_use: false,
            region_name: input.region_name.unwrap_or_else(|| "local".into()),
            bridge_name: input.bridge_name,
            vlan_id: input.vlan_id,
            host_bridges: input.host_bridges.unwrap_or_default(),
            created_date_time: Utc::now(),
        };
        c.validate()?;
        let sealed = match input.ad_domain_password.as_deref() {
            Some(p) => Some(seal(&self.config.secrets_key_file, c.id, p)?),
            None => None,
        };
        let mut audit = change("Create", AuditOperationType::Create, &c).event(actor, None, Some(&c));
        if sealed.is_some() {
            audit.resources[0].modified_properties.push(property("adDomainPassword", None, Some("(set)".into())));
        }
        self.store.create_network_connection(&c, sealed.as_deref(), &audit).await?;
        self.spawn_network_checks(c.id);
        Ok(c)
    }

    pub async fn update_network_connection(
        &self,
        actor: &Actor,
        id: &str,
        input: OnPremisesConnectionUpdate,
    ) -> Result<OnPremisesConnection> {
        // A health-check run writes the same row (running, then its results): an edit that
        // loses that race reads the row again rather than failing.
        for _ in 0..4 {
            match self.try_update_network_connection(actor, id, input.clone()).await {
                Err(Error::Internal(cloudpc_store::StoreError::Stale { .. })) => continue,
                done => return done,
            }
        }
        self.try_update_network_connection(actor, id, input).await
    }

    async fn try_update_network_connection(
        &self,
        actor: &Actor,
        id: &str,
        input: OnPremisesConnectionUpdate,
    ) -> Result<OnPremisesConnection> {
        let before = self.get_network_connection(id).await?;
        if input.connection_type.is_some_and(|t| t != before.connection_type) {
            return Err(Error::invalid("connectionType", "cannot change; make a new connection for another join type"));
        }
        check_password(input.ad_domain_password.as_deref())?;
        let only_name = input.ad_domain_name.is_none()
            && input.ad_domain_username.is_none()
            && input.ad_domain_password.is_none()
            && input.organizational_unit.is_none()
            && input.bridge_name.is_none()
            && input.vlan_id.is_none()
            && input.host_bridges.is_none();
        if before.in_use && !only_name {
            return Err(Error::Conflict(
                "the connection is used by a provisioning policy: only its name may change while it is in use".into(),
            ));
        }
        let mut c = before.clone();
        if let Some(v) = input.display_name {
            c.display_name = v;
        }
        if let Some(v) = input.ad_domain_name {
            c.ad_domain_name = Some(v.to_ascii_lowercase());
        }
        if let Some(v) = input.ad_domain_username {
            c.ad_domain_username = Some(v);
        }
        if let Some(v) = input.organizational_unit {
            c.organizational_unit = Some(v);
        }
        if let Some(v) = input.bridge_name {
            c.bridge_name = v;
        }
        if let Some(v) = input.vlan_id {
            c.vlan_id = Some(v);
        }
        if let Some(v) = input.host_bridges {
            c.host_bridges = v;
        }
        if input.ad_domain_password.is_some() {
            c.has_ad_domain_password = true;
        }
        // Anything but the name makes the last checks stale: they run again before use.
        if !only_name {
            c.health_check_status = HealthCheckStatus::Pending;
        }
        c.validate()?;
        let sealed = match input.ad_domain_password.as_deref() {
            Some(p) => Some(seal(&self.config.secrets_key_file, c.id, p)?),
            None => None,
        };
        let mut audit = change("Update", AuditOperationType::Patch, &c).event(actor, Some(&before), Some(&c));
        if sealed.is_some() {
            audit.resources[0].modified_properties.push(property("adDomainPassword", None, Some("(changed)".into())));
        }
        self.store.update_network_connection(&c, sealed.as_deref(), Some(&audit)).await?;
        c.row_version += 1;
        if !only_name {
            self.spawn_network_checks(c.id);
        }
        Ok(c)
    }

    pub async fn delete_network_connection(&self, actor: &Actor, id: &str) -> Result<()> {
        let c = self.get_network_connection(id).await?;
        let audit = change("Delete", AuditOperationType::Delete, &c).event(actor, Some(&c), None);
        self.store.delete_network_connection(c.id, &audit).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sealed_password_opens_only_with_its_key_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secrets.key");
        let id = Uuid::new_v4();
        let sealed = seal(&key, id, "J0in!Pass").unwrap();
        assert!(!sealed.contains("J0in"), "{sealed}");
        assert_ne!(sealed, seal(&key, id, "J0in!Pass").unwrap(), "a fresh nonce each time");
        assert_eq!(unseal(&key, id, &sealed).unwrap(), "J0in!Pass");
        // Moved to another row, altered, or opened under another key: refused.
        assert!(unseal(&key, Uuid::new_v4(), &sealed).is_err());
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert!(unseal(&key, id, &String::from_utf8(altered).unwrap()).is_err());
        let other = dir.path().join("other.key");
        assert!(unseal(&other, id, &sealed).is_err());
        // The key file is private.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(dir.path().join("short.key"), b"short").unwrap();
        let e = format!("{:?}", seal(&dir.path().join("short.key"), id, "x").unwrap_err());
        assert!(e.contains("32 bytes"), "{e}");
    }
}
