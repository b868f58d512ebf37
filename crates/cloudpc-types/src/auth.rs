//! API tokens and the two Windows 365 roles they carry.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The built-in roles: Cloud PC Administrator may do everything, Cloud PC Reader only reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    CloudPcAdministrator,
    CloudPcReader,
    /// A directory user signed in to the portal: reaches only their own Cloud PCs.
    CloudPcUser,
}

impl Role {
    pub fn display_name(self) -> &'static str {
        match self {
            Role::CloudPcAdministrator => "Cloud PC Administrator",
            Role::CloudPcReader => "Cloud PC Reader",
            Role::CloudPcUser => "Cloud PC user",
        }
    }

    pub fn can_write(self) -> bool {
        matches!(self, Role::CloudPcAdministrator)
    }
}

/// A bearer token's record; the secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiToken {
    pub id: Uuid,
    pub display_name: String,
    pub role: Role,
    pub created_date_time: DateTime<Utc>,
    /// When the token stops working; `null` for a token that does not expire.
    #[serde(default)]
    pub expiration_date_time: Option<DateTime<Utc>>,
    /// When the token was last used (to the minute), to find unused ones.
    #[serde(default)]
    pub last_used_date_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiTokenCreate {
    pub display_name: String,
    pub role: Role,
    /// When the token stops working (in the future); without it the token lasts until revoked.
    #[serde(default)]
    pub expiration_date_time: Option<DateTime<Utc>>,
}

/// The answer to creating a token: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiTokenCreated {
    #[serde(flatten)]
    pub token: ApiToken,
    pub secret: String,
}
