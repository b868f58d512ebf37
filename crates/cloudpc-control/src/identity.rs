//! Connected identity providers: their records, SCIM tokens, and the rule that what a provider
//! manages only that provider changes.
//!
//! A provider is both an OpenID Connect client (sign-in, roles from its groups claim; see
//! [`crate::oidc`]) and a SCIM client (users and groups; see [`crate::scim`]). Its SCIM token is
//! stored as SHA-256 only, like API tokens; its OIDC client secret is kept as given, since it
//! must be sent to the provider.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::auth::Role;
use cloudpc_types::identity::{
    IdentityProvider, IdentityProviderCreate, IdentityProviderUpdate, ScimTokenCreated, SignInOption, SignInOptions,
};

use crate::audit::{property, Actor, Change};
use crate::directory::parse_id;
use crate::{App, Error, Result};

const SCIM_PREFIX: &str = "cpcscim_";

pub(crate) fn sha(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn change(activity: &str, op: AuditOperationType, p: &IdentityProvider) -> Change<'static> {
    Change {
        component: "Identity",
        activity: format!("{activity} IdentityProvider"),
        operation: op,
        resource_type: "identityProvider",
        resource_id: p.id.to_string(),
        resource_name: p.display_name.clone(),
    }
}

/// The actor a provider's SCIM changes are audited under: the provider itself.
pub(crate) fn provider_actor(p: &IdentityProvider, ip: Option<String>) -> Actor {
    Actor {
        id: Some(p.id),
        name: format!("{} (SCIM)", p.display_name),
        role: Role::CloudPcAdministrator,
        ip_address: ip,
        system: false,
    }
}

/// The role the provider's groups give: Administrator wins over Reader; none gives nothing.
pub(crate) fn role_from_groups(p: &IdentityProvider, groups: &[String]) -> Option<Role> {
    let has = |list: &[String]| groups.iter().any(|g| list.iter().any(|x| x == g));
    if has(&p.administrator_groups) {
        Some(Role::CloudPcAdministrator)
    } else if has(&p.reader_groups) {
        Some(Role::CloudPcReader)
    } else {
        None
    }
}

impl App {
    pub async fn list_identity_providers(&self) -> Result<Vec<IdentityProvider>> {
        Ok(self.store.list_identity_providers().await?)
    }

    pub async fn get_identity_provider(&self, id: &str) -> Result<IdentityProvider> {
        let id = parse_id("identityProvider", id)?;
        self.store
            .list_identity_providers()
            .await?
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| Error::NotFound { kind: "identityProvider", id: id.to_string() })
    }

    pub async fn create_identity_provider(
        &self,
        actor: &Actor,
        input: IdentityProviderCreate,
    ) -> Result<IdentityProvider> {
        let p = IdentityProvider {
            row_version: 0,
            id: Uuid::new_v4(),
            display_name: input.display_name,
            issuer: input.issuer.trim_end_matches('/').to_string(),
            client_id: input.client_id,
            has_client_secret: input.client_secret.is_some(),
            scopes: input.scopes.unwrap_or_else(|| vec!["profile".into(), "email".into()]),
            username_claim: input.username_claim.unwrap_or_else(|| "preferred_username".into()),
            groups_claim: input.groups_claim.unwrap_or_else(|| "groups".into()),
            administrator_groups: input.administrator_groups.unwrap_or_default(),
            reader_groups: input.reader_groups.unwrap_or_default(),
            api_audience: input.api_audience,
            has_scim_token: false,
            created_date_time: Utc::now(),
        };
        p.validate()?;
        check_secret(input.client_secret.as_deref())?;
        let audit = change("Create", AuditOperationType::Create, &p).event(actor, None, Some(&p));
        self.store.create_identity_provider(&p, input.client_secret.as_deref(), &audit).await?;
        Ok(p)
    }

    pub async fn update_identity_provider(
        &self,
        actor: &Actor,
        id: &str,
        input: IdentityProviderUpdate,
    ) -> Result<IdentityProvider> {
        let before = self.get_identity_provider(id).await?;
        let mut p = before.clone();
        if let Some(v) = input.display_name {
            p.display_name = v;
        }
        if let Some(v) = input.issuer {
            p.issuer = v.trim_end_matches('/').to_string();
        }
        if let Some(v) = input.client_id {
            p.client_id = v;
        }
        if let Some(v) = input.scopes {
            p.scopes = v;
        }
        if let Some(v) = input.username_claim {
            p.username_claim = v;
        }
        if let Some(v) = input.groups_claim {
            p.groups_claim = v;
        }
        if let Some(v) = input.administrator_groups {
            p.administrator_groups = v;
        }
        if let Some(v) = input.reader_groups {
            p.reader_groups = v;
        }
        if let Some(v) = input.api_audience {
            p.api_audience = (!v.is_empty()).then_some(v);
        }
        check_secret(input.client_secret.as_deref())?;
        if input.client_secret.is_some() {
            p.has_client_secret = true;
        }
        p.validate()?;
        let mut audit = change("Update", AuditOperationType::Patch, &p).event(actor, Some(&before), Some(&p));
        if input.client_secret.is_some() {
            audit.resources[0].modified_properties.push(property("clientSecret", None, Some("(changed)".into())));
        }
        self.store.update_identity_provider(&p, input.client_secret.as_deref(), &audit).await?;
        self.forget_oidc_metadata(p.id);
        Ok(p)
    }

    /// Disconnects a provider. Its users and groups stay, as local ones that admins manage from
    /// now on (each release audited), so nothing is locked to a provider that is gone.
    pub async fn delete_identity_provider(&self, actor: &Actor, id: &str) -> Result<()> {
        let p = self.get_identity_provider(id).await?;
        for before in self.store.list_users().await?.into_iter().filter(|u| u.identity_provider_id == Some(p.id)) {
            let mut u = before.clone();
            u.identity_provider_id = None;
            let audit = Change {
                component: "Directory",
                activity: "Release User".into(),
                operation: AuditOperationType::Patch,
                resource_type: "user",
                resource_id: u.id.to_string(),
                resource_name: u.user_principal_name.clone(),
            }
            .event(actor, Some(&before), Some(&u));
            self.store.update_user(&u, None, &audit).await?;
        }
        for before in self.store.list_groups().await?.into_iter().filter(|g| g.identity_provider_id == Some(p.id)) {
            let mut g = before.clone();
            g.identity_provider_id = None;
            let audit = Change {
                component: "Directory",
                activity: "Release Group".into(),
                operation: AuditOperationType::Patch,
                resource_type: "group",
                resource_id: g.id.to_string(),
                resource_name: g.display_name.clone(),
            }
            .event(actor, Some(&before), Some(&g));
            self.store.update_group(&g, &audit).await?;
        }
        let audit = change("Delete", AuditOperationType::Delete, &p).event(actor, Some(&p), None);
        self.store.delete_identity_provider(p.id, &audit).await?;
        self.forget_oidc_metadata(p.id);
        Ok(())
    }

    /// Issues the provider's SCIM bearer token; an earlier one stops working.
    pub async fn create_scim_token(&self, actor: &Actor, id: &str) -> Result<ScimTokenCreated> {
        let mut p = self.get_identity_provider(id).await?;
        let secret = format!("{SCIM_PREFIX}{}", random_secret());
        p.has_scim_token = true;
        let audit = change("Issue SCIM token for", AuditOperationType::Other, &p)
            .event_with(actor, vec![property("scimToken", None, Some("(issued)".into()))]);
        self.store.set_scim_token(&p, &sha(&secret), &audit).await?;
        let base = self.config.public_url.clone().unwrap_or_default();
        Ok(ScimTokenCreated { scim_base_url: format!("{}/scim/v2", base.trim_end_matches('/')), secret })
    }

    /// The provider behind a SCIM bearer token, and the actor its changes are made as.
    pub async fn scim_caller(&self, secret: &str, ip: Option<String>) -> Result<(IdentityProvider, Actor)> {
        let refused = || Error::Unauthenticated("the SCIM token is not valid".into());
        if !secret.starts_with(SCIM_PREFIX) || secret.len() > 128 {
            return Err(refused());
        }
        let p = self.store.find_provider_by_scim_token(&sha(secret)).await?.ok_or_else(refused)?;
        let actor = provider_actor(&p, ip);
        Ok((p, actor))
    }

    /// What the sign-in pages offer.
    pub async fn sign_in_options(&self) -> Result<SignInOptions> {
        let providers = self
            .store
            .list_identity_providers()
            .await?
            .into_iter()
            .map(|p| SignInOption { id: p.id, display_name: p.display_name })
            .collect();
        Ok(SignInOptions { local_accounts: self.config.local_sign_in, providers })
    }

    /// Objects a provider manages are changed only by that provider: a local edit would be
    /// undone by the provider's next sync, silently, so it is refused with the provider's name.
    pub(crate) async fn check_managed(&self, actor: &Actor, managed_by: Option<Uuid>, what: &str) -> Result<()> {
        let Some(owner) = managed_by else { return Ok(()) };
        if actor.id == Some(owner) || actor.system {
            return Ok(());
        }
        let name = match self.store.list_identity_providers().await?.into_iter().find(|p| p.id == owner) {
            Some(p) => p.display_name,
            None => owner.to_string(),
        };
        Err(Error::Conflict(format!(
            "{what} is managed by the identity provider '{name}'; change it there (cloudpc follows through SCIM)"
        )))
    }
}

fn check_secret(secret: Option<&str>) -> Result<()> {
    if let Some(s) = secret {
        if s.is_empty() || s.len() > 512 || s.chars().any(char::is_control) {
            return Err(Error::invalid(
                "clientSecret",
                "must have 1 to 512 characters, none of them control characters",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> IdentityProvider {
        IdentityProvider {
            row_version: 0,
            id: Uuid::new_v4(),
            display_name: "Okta".into(),
            issuer: "https://example.okta.com".into(),
            client_id: "c".into(),
            has_client_secret: false,
            scopes: vec![],
            username_claim: "preferred_username".into(),
            groups_claim: "groups".into(),
            administrator_groups: vec!["cpc-admins".into()],
            reader_groups: vec!["cpc-readers".into(), "helpdesk".into()],
            api_audience: None,
            has_scim_token: false,
            created_date_time: Utc::now(),
        }
    }

    #[test]
    fn test_roles_come_from_groups_and_administrator_wins() {
        let p = provider();
        let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(role_from_groups(&p, &g(&["helpdesk"])), Some(Role::CloudPcReader));
        assert_eq!(role_from_groups(&p, &g(&["helpdesk", "cpc-admins"])), Some(Role::CloudPcAdministrator));
        assert_eq!(role_from_groups(&p, &g(&["staff"])), None);
        assert_eq!(role_from_groups(&p, &[]), None);
    }
}
