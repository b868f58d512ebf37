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
        if !secret.starts_with(PREFIX) || secret.len() > 128 {
            return Err(refused());
        }
        let token = self.store.find_token(&hash(secret)).await?.ok_or_else(refused)?;
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
                self.insert_token("bootstrap administrator", Role::CloudPcAdministrator, secret, &Actor::system())
                    .await?;
            }
            return Ok(Bootstrap::FromEnvironment);
        }
        if !self.store.list_tokens().await?.is_empty() {
            return Ok(Bootstrap::Existing);
        }
        let secret = new_secret();
        self.insert_token("bootstrap administrator", Role::CloudPcAdministrator, &secret, &Actor::system()).await?;
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
        let secret = new_secret();
        let token = self.insert_token(&input.display_name, input.role, &secret, actor).await?;
        Ok(ApiTokenCreated { token, secret })
    }

    pub async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        Ok(self.store.list_tokens().await?)
    }

    async fn insert_token(&self, name: &str, role: Role, secret: &str, actor: &Actor) -> Result<ApiToken> {
        let token = ApiToken { id: Uuid::new_v4(), display_name: name.into(), role, created_date_time: Utc::now() };
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
