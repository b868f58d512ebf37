//! The directory: users and groups, shaped like Graph's `user` and `group`.
//!
//! Groups hold users only (no nesting, as Windows 365 assignments ignore nested groups).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self, ValidationError};
use crate::ODataType;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// The stored row's version, for compare-and-swap writes; not part of the Graph body.
    #[serde(skip)]
    pub row_version: u64,
    pub id: Uuid,
    pub user_principal_name: String,
    pub display_name: String,
    pub mail: Option<String>,
    pub mail_nickname: String,
    pub account_enabled: bool,
    pub created_date_time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surname: Option<String>,
    /// The identity provider that manages this user through SCIM (a cloudpc extension); `null`
    /// for a local user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider_id: Option<Uuid>,
    /// The provider's own id for the user (SCIM `externalId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserCreate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub user_principal_name: String,
    pub display_name: String,
    #[serde(default)]
    pub mail: Option<String>,
    #[serde(default)]
    pub mail_nickname: Option<String>,
    #[serde(default)]
    pub account_enabled: Option<bool>,
    /// The password for signing in to the cloudpc portal.
    #[serde(default)]
    pub password_profile: Option<PasswordProfile>,
}

/// Graph's `passwordProfile`; the password is hashed at once and never shown again.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PasswordProfile {
    pub password: String,
    #[serde(default)]
    pub force_change_password_next_sign_in: Option<bool>,
}

impl std::fmt::Debug for PasswordProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordProfile { password: \"(hidden)\" }")
    }
}

/// Entra's rule: 8 to 256 characters, using at least three of lower case, upper case, digits and symbols.
pub fn check_password(password: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "passwordProfile.password";
    let n = password.chars().count();
    if !(8..=256).contains(&n) {
        return Err(ValidationError::new(FIELD, "must have 8 to 256 characters"));
    }
    let classes = [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ];
    if classes.iter().filter(|x| **x).count() < 3 {
        return Err(ValidationError::new(FIELD, "must use three of: lower case, upper case, digits, symbols"));
    }
    Ok(())
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserUpdate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub user_principal_name: Option<String>,
    pub display_name: Option<String>,
    pub mail: Option<String>,
    pub mail_nickname: Option<String>,
    pub account_enabled: Option<bool>,
    pub password_profile: Option<PasswordProfile>,
}

/// Body of the portal's sign-in.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignIn {
    pub user_principal_name: String,
    pub password: String,
}

impl User {
    /// Checks the fields that have rules of their own.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::user_principal_name(&self.user_principal_name)?;
        validate::display_name("displayName", &self.display_name, 256)?;
        if let Some(mail) = &self.mail {
            validate::mail(mail)?;
        }
        validate::nickname("mailNickname", &self.mail_nickname, 64)?;
        if let Some(v) = &self.given_name {
            validate::display_name("givenName", v, 64)?;
        }
        if let Some(v) = &self.surname {
            validate::display_name("surname", v, 64)?;
        }
        if let Some(v) = &self.external_id {
            validate::display_name("externalId", v, 256)?;
        }
        Ok(())
    }

    /// The part of the principal name before '@', used as the default nickname and username.
    pub fn local_part(upn: &str) -> &str {
        upn.split('@').next().unwrap_or(upn)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    /// The stored row's version, for compare-and-swap writes; not part of the Graph body.
    #[serde(skip)]
    pub row_version: u64,
    pub id: Uuid,
    pub display_name: String,
    pub description: Option<String>,
    pub mail_nickname: Option<String>,
    pub security_enabled: bool,
    pub mail_enabled: bool,
    pub created_date_time: DateTime<Utc>,
    /// The identity provider that manages this group through SCIM (a cloudpc extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider_id: Option<Uuid>,
    /// The provider's own id for the group (SCIM `externalId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupCreate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub display_name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub mail_nickname: Option<String>,
    #[serde(default)]
    pub security_enabled: Option<bool>,
    #[serde(default)]
    pub mail_enabled: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupUpdate {
    #[serde(rename = "@odata.type", default)]
    #[schema(ignore)]
    pub odata_type: ODataType,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub mail_nickname: Option<String>,
}

impl Group {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::display_name("displayName", &self.display_name, 256)?;
        if let Some(d) = &self.description {
            validate::description("description", d, 1024)?;
        }
        if let Some(n) = &self.mail_nickname {
            validate::nickname("mailNickname", n, 64)?;
        }
        if let Some(v) = &self.external_id {
            validate::display_name("externalId", v, 256)?;
        }
        Ok(())
    }
}

/// Body of `POST /groups/{id}/members/$ref`: `{"@odata.id": ".../directoryObjects/{id}"}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberRef {
    #[serde(rename = "@odata.id")]
    pub odata_id: String,
}

impl MemberRef {
    /// The member's id: the last path segment of `@odata.id`, or the whole value if it is an id.
    pub fn member_id(&self) -> Result<Uuid, ValidationError> {
        let last = self.odata_id.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
        Uuid::parse_str(last).map_err(|_| {
            ValidationError::new(
                "@odata.id",
                "must end with the member's id, like https://graph.microsoft.com/v1.0/directoryObjects/{id}",
            )
        })
    }
}
