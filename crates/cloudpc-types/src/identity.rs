//! Identity providers: the organisation's own directory, connected through OpenID Connect (who
//! signs in, and as which role) and SCIM 2.0 (who exists, and in which groups).
//!
//! One provider record carries both halves, because an organisation connects one directory once:
//! its OIDC client for sign-in, and a SCIM bearer token for the provider's provisioning agent.
//! Users and groups the provider created remember it (`identityProviderId`), and only it may
//! change them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self, ValidationError};

/// A connected identity provider (a cloudpc extension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityProvider {
    #[serde(skip)]
    pub row_version: u64,
    pub id: Uuid,
    /// Shown on the sign-in pages and named as the actor of the provider's changes.
    pub display_name: String,
    /// The OpenID Connect issuer (its discovery document is `{issuer}/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    /// Whether a client secret is kept (the secret itself is never shown).
    #[serde(default)]
    pub has_client_secret: bool,
    /// Scopes asked for at sign-in; `openid` is always asked for.
    pub scopes: Vec<String>,
    /// The claim whose value is matched to a user's `userPrincipalName`.
    pub username_claim: String,
    /// The claim that carries the user's groups.
    pub groups_claim: String,
    /// Values of the groups claim that make the signed-in person a Cloud PC Administrator.
    #[serde(default)]
    pub administrator_groups: Vec<String>,
    /// Values of the groups claim that make the signed-in person a Cloud PC Reader.
    #[serde(default)]
    pub reader_groups: Vec<String>,
    /// The audience the provider puts in access tokens it issues for cloudpc's API; without it,
    /// bearer tokens from this provider must name the client id.
    #[serde(default)]
    pub api_audience: Option<String>,
    /// Whether a SCIM token has been issued for this provider.
    #[serde(default)]
    pub has_scim_token: bool,
    pub created_date_time: DateTime<Utc>,
}

#[derive(Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityProviderCreate {
    #[schema(pattern = r"^[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]{0,63}$")]
    pub display_name: String,
    #[schema(
        pattern = r"^(https://([a-z0-9]+\.)*[a-z][a-z0-9]*|http://(127\.0\.0\.1|localhost))(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~-]+)*$",
        max_length = 512
    )]
    pub issuer: String,
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,256}$")]
    pub client_id: String,
    #[serde(default)]
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,512}$")]
    pub client_secret: Option<String>,
    #[serde(default)]
    #[schema(schema_with = scope_list)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9_.:/-]{1,64}$")]
    pub username_claim: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9_.:/-]{1,64}$")]
    pub groups_claim: Option<String>,
    #[serde(default)]
    #[schema(schema_with = group_list)]
    pub administrator_groups: Option<Vec<String>>,
    #[serde(default)]
    #[schema(schema_with = group_list)]
    pub reader_groups: Option<Vec<String>>,
    #[serde(default)]
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,256}$")]
    pub api_audience: Option<String>,
}

impl std::fmt::Debug for IdentityProviderCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityProviderCreate")
            .field("display_name", &self.display_name)
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "(hidden)"))
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityProviderUpdate {
    #[schema(pattern = r"^[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]{0,63}$")]
    pub display_name: Option<String>,
    #[schema(
        pattern = r"^(https://([a-z0-9]+\.)*[a-z][a-z0-9]*|http://(127\.0\.0\.1|localhost))(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~-]+)*$",
        max_length = 512
    )]
    pub issuer: Option<String>,
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,256}$")]
    pub client_id: Option<String>,
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,512}$")]
    pub client_secret: Option<String>,
    #[schema(schema_with = scope_list)]
    pub scopes: Option<Vec<String>>,
    #[schema(pattern = r"^[A-Za-z0-9_.:/-]{1,64}$")]
    pub username_claim: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9_.:/-]{1,64}$")]
    pub groups_claim: Option<String>,
    #[schema(schema_with = group_list)]
    pub administrator_groups: Option<Vec<String>>,
    #[schema(schema_with = group_list)]
    pub reader_groups: Option<Vec<String>>,
    /// An empty string removes it.
    #[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{0,256}$")]
    pub api_audience: Option<String>,
}

/// The answer to issuing a SCIM token: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScimTokenCreated {
    /// The SCIM base URL to give the provider's provisioning settings.
    pub scim_base_url: String,
    pub secret: String,
}

/// What the sign-in pages offer (no secrets: this is read without signing in).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignInOption {
    pub id: Uuid,
    pub display_name: String,
}

/// How people may sign in here.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignInOptions {
    pub local_accounts: bool,
    pub providers: Vec<SignInOption>,
}

/// Optional list fields may be sent as null (meaning: not given).
fn nullable_array() -> utoipa::openapi::schema::SchemaType {
    utoipa::openapi::schema::SchemaType::from_iter([utoipa::openapi::Type::Array, utoipa::openapi::Type::Null])
}

/// Scopes: at most 20 words.
fn scope_list() -> utoipa::openapi::Array {
    utoipa::openapi::ArrayBuilder::new()
        .schema_type(nullable_array())
        .items(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::Type::String)
                .pattern(Some(r"^[!-~]{1,256}$")),
        )
        .max_items(Some(20))
        .build()
}

/// Group names as the provider's groups claim carries them: at most 100.
fn group_list() -> utoipa::openapi::Array {
    utoipa::openapi::ArrayBuilder::new()
        .schema_type(nullable_array())
        .items(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::Type::String)
                .pattern(Some(r"^[^\x00-\x1f\x7f-\x9f]{1,256}$")),
        )
        .max_items(Some(100))
        .build()
}

fn claim_name(field: &'static str, v: &str) -> Result<(), ValidationError> {
    if v.is_empty() || v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:/".contains(c)) {
        return Err(ValidationError::new(field, "must be a claim name of 1 to 64 letters, digits and _-.:/"));
    }
    Ok(())
}

fn names(field: &'static str, values: &[String], max: usize) -> Result<(), ValidationError> {
    if values.len() > max {
        return Err(ValidationError::new(field, format!("may list at most {max} values")));
    }
    for v in values {
        if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
            return Err(ValidationError::new(
                field,
                "values must have 1 to 256 characters, none of them control characters",
            ));
        }
    }
    Ok(())
}

impl IdentityProvider {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::display_name("displayName", &self.display_name, 64)?;
        let issuer = url_like(&self.issuer);
        if !issuer {
            return Err(ValidationError::new("issuer", "must be an https:// URL (http:// only for localhost)"));
        }
        if self.client_id.is_empty() || self.client_id.len() > 256 || self.client_id.chars().any(char::is_control) {
            return Err(ValidationError::new("clientId", "must have 1 to 256 characters"));
        }
        names("scopes", &self.scopes, 20)?;
        if self.scopes.iter().any(|s| s.contains(' ')) {
            return Err(ValidationError::new("scopes", "each scope is one word"));
        }
        claim_name("usernameClaim", &self.username_claim)?;
        claim_name("groupsClaim", &self.groups_claim)?;
        names("administratorGroups", &self.administrator_groups, 100)?;
        names("readerGroups", &self.reader_groups, 100)?;
        if let Some(a) = &self.api_audience {
            names("apiAudience", std::slice::from_ref(a), 1)?;
        }
        Ok(())
    }
}

/// Whether a provider's endpoint (from its discovery document) may carry codes and tokens:
/// https anywhere; plain http only to the machine itself (a provider under test).
pub fn secure_url(s: &str) -> bool {
    let Ok(u) = url::Url::parse(s) else { return false };
    match u.scheme() {
        "https" => u.host().is_some(),
        "http" => matches!(u.host_str(), Some("127.0.0.1") | Some("localhost") | Some("[::1]")),
        _ => false,
    }
}

/// An issuer as admins enter it: a secure URL with no query or fragment (OIDC Discovery 1.0).
fn url_like(s: &str) -> bool {
    let Ok(u) = url::Url::parse(s) else { return false };
    secure_url(s) && u.query().is_none() && u.fragment().is_none() && s.len() <= 512
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_issuer_must_be_https_except_on_this_machine() {
        assert!(url_like("https://login.example.com/tenant/v2.0"));
        assert!(url_like("http://127.0.0.1:9000"));
        assert!(!url_like("http://idp.example.com"));
        assert!(!url_like("ftp://idp.example.com"));
        assert!(!url_like("https://idp.example.com/?x=1"));
        // Endpoints from discovery: the same schemes, a query allowed.
        assert!(secure_url("https://login.example.com/oauth2/token?p=signin"));
        assert!(!secure_url("http://login.example.com/oauth2/token"));
        assert!(!secure_url("javascript:alert(1)"));
    }
}
