//! API tokens: how a bearer secret becomes an [`Actor`] with a role.
//!
//! Only the SHA-256 of a secret is stored, so a copy of the database does not hand out access.
//! Secrets are 32 random bytes; a fast hash is enough for them (unlike passwords, they cannot be
//! guessed from a dictionary), and it keeps each request's lookup cheap.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::auth::{ApiToken, ApiTokenCreate, ApiTokenCreated, Role};
use cloudpc_types::validate;

use crate::audit::{Actor, Change};
use crate::{App, Error, Result};

const PREFIX: &str = "cpc_";

fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// What start-up did about the first administrator token.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// A new token was made; its secret must be shown once.
    Created(String),
    /// The token from the environment was registered (or already was).
    FromEnvironment,
    /// Tokens exist already; nothing to do.
    Existing,
}

impl App {
    /// Looks up a bearer secret; unknown or malformed secrets are refused the same way.
    pub async fn authenticate(&self, secret: &str, ip_address: Option<String>) -> Result<Actor> {
        let refused = || Error::Unauthenticated("the access token is not valid".into());
        if !secret.starts_with(PREFIX) && crate::oidc::looks_like_jwt(secret) {
            return self.authenticate_jwt(secret, ip_address).await;
        }
        if !secret.starts_with(PREFIX) || secret.len() > 128 {
            return Err(refused());
        }
        let token = self.store.find_token(&hash(secret)).await?.ok_or_else(refused)?;
        let now = Utc::now();
        if token.expiration_date_time.is_some_and(|t| t <= now) {
            return Err(Error::Unauthenticated(
                "the access token has expired; ask an administrator for a new one".into(),
            ));
        }
        // To the minute: a write per request would cost more than knowing the second is worth.
        if token.last_used_date_time.is_none_or(|t| now - t >= chrono::Duration::minutes(1)) {
            if let Err(e) = self.store.touch_token(token.id, now).await {
                tracing::warn!(error = %e, "could not record a token's last use");
            }
        }
        Ok(Actor { id: Some(token.id), name: token.display_name, role: token.role, ip_address, system: false })
    }

    /// Makes sure an administrator can get in: registers `from_env` if given, otherwise creates a
    /// token when none exists yet.
    pub async fn bootstrap_admin_token(&self, from_env: Option<&str>) -> Result<Bootstrap> {
        if let Some(secret) = from_env {
            if !secret.starts_with(PREFIX) || secret.len() < PREFIX.len() + 32 {
                return Err(Error::invalid(
                    "CLOUDPC_ADMIN_TOKEN",
                    format!("must start with '{PREFIX}' and carry at least 32 more characters"),
                ));
            }
            if self.store.find_token(&hash(secret)).await?.is_none() {
                let inserted = self
                    .insert_token("bootstrap administrator", Role::CloudPcAdministrator, secret, None, &Actor::system())
                    .await;
                // Replicas starting together all try; the token's secret is unique, so one wins.
                if inserted.is_err() && self.store.find_token(&hash(secret)).await?.is_none() {
                    inserted?;
                }
            }
            return Ok(Bootstrap::FromEnvironment);
        }
        if !self.store.list_tokens().await?.is_empty() {
            return Ok(Bootstrap::Existing);
        }
        let secret = new_secret();
        self.insert_token("bootstrap administrator", Role::CloudPcAdministrator, &secret, None, &Actor::system())
            .await?;
        Ok(Bootstrap::Created(secret))
    }

    pub async fn create_token(&self, actor: &Actor, input: ApiTokenCreate) -> Result<ApiTokenCreated> {
        validate::display_name("displayName", &input.display_name, 128)?;
        if input.role == Role::CloudPcUser {
            return Err(Error::invalid(
                "role",
                "tokens are for cloudPcAdministrator or cloudPcReader; users sign in to the portal",
            ));
        }
        if let Some(at) = input.expiration_date_time {
            if at <= Utc::now() {
                return Err(Error::invalid("expirationDateTime", "must be in the future"));
            }
        }
        let secret = new_secret();
        let token =
            self.insert_token(&input.display_name, input.role, &secret, input.expiration_date_time, actor).await?;
        Ok(ApiTokenCreated { token, secret })
    }

    pub async fn get_token(&self, id: &str) -> Result<ApiToken> {
        let id = crate::directory::parse_id("apiToken", id)?;
        self.store
            .list_tokens()
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| Error::NotFound { kind: "apiToken", id: id.to_string() })
    }

    /// Revokes a token: it is refused from the next request on.
    pub async fn revoke_token(&self, actor: &Actor, id: &str) -> Result<()> {
        let token = self.get_token(id).await?;
        let audit = Change {
            component: "Access",
            activity: "Delete ApiToken".into(),
            operation: AuditOperationType::Delete,
            resource_type: "apiToken",
            resource_id: token.id.to_string(),
            resource_name: token.display_name.clone(),
        }
        .event(actor, Some(&token), None);
        self.store.revoke_token(token.id, &audit).await?;
        Ok(())
    }

    /// Sign-out of a console signed in through a provider: the token it was given is revoked.
    pub async fn revoke_own_token(&self, secret: &str, ip_address: Option<String>) -> Result<()> {
        let actor = self.authenticate(secret, ip_address).await?;
        let token = self.store.find_token(&hash(secret)).await?.ok_or_else(|| {
            Error::Unauthenticated("only an API token can be signed out; provider JWTs expire by themselves".into())
        })?;
        let audit = Change {
            component: "Access",
            activity: "Sign out ApiToken".into(),
            operation: AuditOperationType::Delete,
            resource_type: "apiToken",
            resource_id: token.id.to_string(),
            resource_name: token.display_name.clone(),
        }
        .event(&actor, Some(&token), None);
        self.store.revoke_token(token.id, &audit).await?;
        Ok(())
    }

    pub async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        Ok(self.store.list_tokens().await?)
    }

    async fn insert_token(
        &self,
        name: &str,
        role: Role,
        secret: &str,
        expires: Option<chrono::DateTime<Utc>>,
        actor: &Actor,
    ) -> Result<ApiToken> {
        let token = ApiToken {
            id: Uuid::new_v4(),
            display_name: name.into(),
            role,
            created_date_time: Utc::now(),
            expiration_date_time: expires,
            last_used_date_time: None,
        };
        let audit = Change {
            component: "Access",
            activity: "Create ApiToken".into(),
            operation: AuditOperationType::Create,
            resource_type: "apiToken",
            resource_id: token.id.to_string(),
            resource_name: token.display_name.clone(),
        }
        .event(actor, None, Some(&token));
        self.store.create_token(&token, &hash(secret), Some(&audit)).await?;
        Ok(token)
    }
}
