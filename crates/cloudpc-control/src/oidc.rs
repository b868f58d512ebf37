//! OpenID Connect: signing people in with the organisation's provider, and accepting the
//! provider's JWTs as API bearer tokens.
//!
//! The authorization code flow with PKCE (S256), `state` and `nonce`. A sign-in in flight lives in
//! the database (only the SHA-256 of its state), so the callback may reach any replica, and is
//! taken once. ID tokens and bearer JWTs are checked by `jsonwebtoken` against the provider's
//! published keys (JWKS): signature, issuer, audience, expiry. Discovery, the code exchange and
//! the JWKS fetch are three plain HTTPS requests, written here rather than through the
//! `openidconnect` crate because we need the raw claims (any groups claim a provider names) and
//! control of when keys are fetched again: a token signed with a key we have not seen makes us
//! fetch the JWKS again (the provider rotated its keys), at most once every few seconds, so a
//! stream of forged key ids cannot turn us into a load generator against the provider.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::Utc;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use cloudpc_types::auth::{ApiTokenCreate, Role};
use cloudpc_types::identity::IdentityProvider;

use crate::audit::{property, Actor};
use crate::identity::{random_secret, role_from_groups, sha};
use crate::portal::{Session, SESSION_LIFETIME};
use crate::{App, Error, Result};

/// How long a sign-in may take at the provider.
const LOGIN_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// How long discovery documents are trusted before they are read again.
const METADATA_LIFETIME: Duration = Duration::from_secs(3600);
/// The least time between two JWKS fetches for one provider.
const JWKS_REFETCH_EVERY: Duration = Duration::from_secs(5);
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 60;
/// Asymmetric algorithms only: with a shared-secret algorithm, anyone holding the public key
/// could sign.
const ALGORITHMS: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Where a sign-in came from, and so where it lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SignInTarget {
    /// The user portal: a session cookie for a directory user.
    Portal,
    /// The admin console: an API token with the role the provider's groups give.
    Console,
}

/// What a finished sign-in gives.
pub enum SignedIn {
    Portal(Box<Session>),
    /// The console keeps this API token in the tab (it expires with the session lifetime).
    Console {
        secret: String,
        role: Role,
        name: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    /// RFC 9207: the provider names itself in every authorization response.
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

struct Keys {
    set: JwkSet,
    fetched: Instant,
}

struct ProviderState {
    discovery: Discovery,
    read: Instant,
    keys: tokio::sync::Mutex<Keys>,
}

/// How long a provider whose discovery failed is not asked again.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// Per replica: what each provider published (a cache; nothing is decided here).
pub struct OidcCache {
    http: reqwest::Client,
    providers: Mutex<HashMap<Uuid, Arc<ProviderState>>>,
    /// One discovery at a time, so a burst of requests (or of forged tokens naming a provider)
    /// makes one fetch, not one each.
    fetching: tokio::sync::Mutex<()>,
    /// When each provider's discovery last failed, and why.
    failures: Mutex<HashMap<Uuid, (Instant, String)>>,
}

impl Default for OidcCache {
    fn default() -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            http,
            providers: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            failures: Mutex::new(HashMap::new()),
        }
    }
}

/// A sign-in in flight, as stored.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Login {
    /// SHA-256 of the random value in the browser's sign-in cookie: the callback must come from
    /// the browser that started the sign-in (no one can hand a victim their own sign-in).
    browser: String,
    provider: Uuid,
    nonce: String,
    verifier: String,
    target: SignInTarget,
    redirect_uri: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
}

fn unauthenticated(msg: impl Into<String>) -> Error {
    Error::Unauthenticated(msg.into())
}

/// The claim's value as strings (a string or an array of strings; anything else is nothing).
fn strings(v: Option<&serde_json::Value>) -> Vec<String> {
    match v {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

/// The issuer a JWT claims, read before anything is verified, to pick whose keys verify it.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(|s| s.trim_end_matches('/').to_string())
}

/// Whether a bearer secret has the shape of a JWT (three base64url parts).
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    token.len() < 16 * 1024
        && token.split('.').count() == 3
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.=".contains(&b))
}

impl OidcCache {
    fn cached(&self, p: &IdentityProvider) -> Option<Arc<ProviderState>> {
        let map = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&p.id)
            .filter(|s| s.read.elapsed() < METADATA_LIFETIME && s.discovery.issuer.trim_end_matches('/') == p.issuer)
            .cloned()
    }

    async fn state(&self, p: &IdentityProvider) -> Result<Arc<ProviderState>> {
        if let Some(s) = self.cached(p) {
            return Ok(s);
        }
        let _one = self.fetching.lock().await;
        if let Some(s) = self.cached(p) {
            return Ok(s);
        }
        if let Some((at, why)) = self.failures.lock().unwrap_or_else(|e| e.into_inner()).get(&p.id) {
            if at.elapsed() < FAILURE_BACKOFF {
                return Err(Error::Conflict(why.clone()));
            }
        }
        let fetched = self.discover(p).await;
        match &fetched {
            Ok(s) => {
                self.providers.lock().unwrap_or_else(|e| e.into_inner()).insert(p.id, s.clone());
                self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&p.id);
            }
            Err(e) => {
                self.failures.lock().unwrap_or_else(|e| e.into_inner()).insert(p.id, (Instant::now(), e.to_string()));
            }
        }
        fetched
    }

    async fn discover(&self, p: &IdentityProvider) -> Result<Arc<ProviderState>> {
        let url = format!("{}/.well-known/openid-configuration", p.issuer);
        let discovery: Discovery = self.get_json(&url, &p.display_name).await?;
        if discovery.issuer.trim_end_matches('/') != p.issuer {
            return Err(Error::Conflict(format!(
                "the identity provider '{}' names its issuer '{}', not the configured '{}'",
                p.display_name, discovery.issuer, p.issuer
            )));
        }
        // Keys and the client secret travel to these addresses: https only, as for the issuer.
        for (name, url) in [
            ("authorization_endpoint", &discovery.authorization_endpoint),
            ("token_endpoint", &discovery.token_endpoint),
            ("jwks_uri", &discovery.jwks_uri),
        ] {
            if !cloudpc_types::identity::secure_url(url) {
                return Err(Error::Conflict(format!(
                    "the identity provider '{}' publishes its {name} at {url}, which is not https",
                    p.display_name
                )));
            }
        }
        let set: JwkSet = self.get_json(&discovery.jwks_uri, &p.display_name).await?;
        Ok(Arc::new(ProviderState {
            discovery,
            read: Instant::now(),
            keys: tokio::sync::Mutex::new(Keys { set, fetched: Instant::now() }),
        }))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str, provider: &str) -> Result<T> {
        let unreachable =
            |e: String| Error::Conflict(format!("the identity provider '{provider}' could not be read at {url}: {e}"));
        let resp = self.http.get(url).send().await.map_err(|e| unreachable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unreachable(format!("HTTP {}", resp.status())));
        }
        resp.json().await.map_err(|e| unreachable(e.to_string()))
    }

    /// The decoding key for `kid`, fetching the JWKS again once if it is not known.
    async fn key(
        &self,
        p: &IdentityProvider,
        state: &ProviderState,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey> {
        let mut keys = state.keys.lock().await;
        let pick = |set: &JwkSet| -> Option<jsonwebtoken::jwk::Jwk> {
            match kid {
                Some(k) => set.find(k).cloned(),
                // Without a kid, only a provider with a single key is unambiguous.
                None if set.keys.len() == 1 => set.keys.first().cloned(),
                None => None,
            }
        };
        let mut jwk = pick(&keys.set);
        if jwk.is_none() && keys.fetched.elapsed() >= JWKS_REFETCH_EVERY {
            let set: JwkSet = self.get_json(&state.discovery.jwks_uri, &p.display_name).await?;
            *keys = Keys { set, fetched: Instant::now() };
            jwk = pick(&keys.set);
        }
        let jwk = jwk
            .ok_or_else(|| unauthenticated("the token is signed with a key the identity provider does not publish"))?;
        if let Some(ka) = jwk.common.key_algorithm {
            if format!("{ka:?}") != format!("{alg:?}") {
                return Err(unauthenticated("the token's algorithm does not match its key"));
            }
        }
        DecodingKey::from_jwk(&jwk).map_err(|e| unauthenticated(format!("the provider's key cannot be used: {e}")))
    }

    /// Verifies a JWT from `p`: signature with a published key, issuer, audience, expiry.
    async fn verify(&self, p: &IdentityProvider, token: &str, audience: &str) -> Result<serde_json::Value> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| unauthenticated(format!("the token is malformed: {e}")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(unauthenticated(format!("the token's algorithm {:?} is not accepted", header.alg)));
        }
        let state = self.state(p).await?;
        let key = self.key(p, &state, header.kid.as_deref(), header.alg).await?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&p.issuer, &format!("{}/", p.issuer)]);
        v.set_audience(&[audience]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            unauthenticated(match e.kind() {
                K::ExpiredSignature => "the token has expired".to_string(),
                K::InvalidAudience => format!("the token is not meant for cloudpc (its audience is not '{audience}')"),
                K::InvalidIssuer => "the token's issuer is not the identity provider's".to_string(),
                K::InvalidSignature => "the token's signature is not valid".to_string(),
                K::ImmatureSignature => "the token is not valid yet".to_string(),
                _ => format!("the token is not valid: {e}"),
            })
        })?;
        Ok(data.claims)
    }
}

impl App {
    pub(crate) fn forget_oidc_metadata(&self, provider: Uuid) {
        self.oidc.providers.lock().unwrap_or_else(|e| e.into_inner()).remove(&provider);
    }

    /// Starts a sign-in with a provider: remembers state, nonce and PKCE verifier, and returns
    /// the provider's authorization URL to send the browser to, and the value the browser keeps
    /// in a cookie until the callback.
    pub async fn begin_oidc_sign_in(
        &self,
        provider: &str,
        target: SignInTarget,
        redirect_uri: &str,
        ip: Option<String>,
    ) -> Result<(String, String)> {
        // Each start stores a row for 10 minutes: starts count against the sign-in limit of the
        // client's address, so nobody fills the table.
        if let Some(addr) = &ip {
            self.sign_in_rate.check(addr).map_err(|retry_after| Error::RateLimited {
                what: "too many sign-in attempts from this address".into(),
                retry_after,
            })?;
        }
        let p = self.get_identity_provider(provider).await?;
        let state = self.oidc.state(&p).await?;
        let (csrf, nonce, verifier, browser) = (random_secret(), random_secret(), random_secret(), random_secret());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let login = Login {
            browser: sha(&browser),
            provider: p.id,
            nonce: nonce.clone(),
            verifier,
            target,
            redirect_uri: redirect_uri.into(),
        };
        let expires = Utc::now() + chrono::Duration::from_std(LOGIN_LIFETIME).unwrap_or_default();
        self.store.put_oidc_login(&sha(&csrf), &serde_json::to_value(&login).unwrap_or_default(), expires).await?;
        let mut scopes = vec!["openid".to_string()];
        scopes.extend(p.scopes.iter().filter(|s| *s != "openid").cloned());
        let mut url = url::Url::parse(&state.discovery.authorization_endpoint)
            .map_err(|e| Error::Conflict(format!("the provider's authorization endpoint is not a URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &p.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &scopes.join(" "))
            .append_pair("state", &csrf)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok((url.into(), browser))
    }

    /// Finishes a sign-in: takes the state (once), exchanges the code, verifies the ID token and
    /// its nonce, and signs the person in. Every refusal is audited with its reason.
    pub async fn finish_oidc_sign_in(
        &self,
        state: &str,
        browser: Option<&str>,
        code: Option<&str>,
        issuer: Option<&str>,
        provider_error: Option<&str>,
        ip: Option<String>,
    ) -> std::result::Result<(SignInTarget, SignedIn), (Option<SignInTarget>, Error)> {
        // Unauthenticated, and each refusal writes an audit event: callbacks count against the
        // address's sign-in limit.
        if let Some(addr) = &ip {
            if let Err(retry_after) = self.sign_in_rate.check(addr) {
                let what = "too many sign-in attempts from this address".into();
                return Err((None, Error::RateLimited { what, retry_after }));
            }
        }
        let login = match self.store.take_oidc_login(&sha(state)).await.map_err(|e| (None, e.into()))? {
            Some(v) => serde_json::from_value::<Login>(v).ok(),
            None => None,
        };
        let Some(login) = login else {
            let reason = "the sign-in is unknown, was used already, or took longer than 10 minutes; start again";
            self.audit_sign_in_failure("(unknown)", "", reason, ip).await;
            return Err((None, unauthenticated(reason)));
        };
        let target = Some(login.target);
        let providers = self.store.list_identity_providers().await.map_err(|e| (target, e.into()))?;
        let Some(p) = providers.into_iter().find(|p| p.id == login.provider) else {
            return Err((target, unauthenticated("the identity provider was removed during the sign-in")));
        };
        // RFC 9207: a provider that names itself in the response must be the one the sign-in
        // went to (a mix-up attack sends another provider's code here).
        let mixed_up = issuer.is_some_and(|i| i.trim_end_matches('/') != p.issuer);
        let advertised = match self.oidc.state(&p).await {
            Ok(s) => s.discovery.authorization_response_iss_parameter_supported,
            Err(_) => false,
        };
        let result = if browser.map(sha).as_deref() != Some(login.browser.as_str()) {
            Err((
                "(unknown)".to_string(),
                unauthenticated(
                    "this browser did not start the sign-in (its sign-in cookie is missing or different); start again",
                ),
            ))
        } else if mixed_up || (advertised && issuer.is_none()) {
            Err((
                "(unknown)".to_string(),
                unauthenticated("the response comes from another identity provider than the sign-in went to"),
            ))
        } else {
            self.complete_oidc(&p, &login, code, provider_error, ip.clone()).await
        };
        match result {
            Ok(done) => Ok((login.target, done)),
            Err((who, e)) => {
                self.audit_sign_in_failure(&who, &p.display_name, &e.to_string(), ip).await;
                Err((target, e))
            }
        }
    }

    async fn complete_oidc(
        &self,
        p: &IdentityProvider,
        login: &Login,
        code: Option<&str>,
        provider_error: Option<&str>,
        ip: Option<String>,
    ) -> std::result::Result<SignedIn, (String, Error)> {
        let anon = |e: Error| ("(unknown)".to_string(), e);
        if let Some(err) = provider_error {
            return Err(anon(unauthenticated(format!("the identity provider refused the sign-in: {err}"))));
        }
        let code = code.ok_or_else(|| anon(unauthenticated("the identity provider sent no code")))?;
        let state = self.oidc.state(p).await.map_err(anon)?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", login.redirect_uri.as_str()),
            ("code_verifier", login.verifier.as_str()),
        ];
        let secret = self.store.identity_provider_secret(p.id).await.map_err(|e| anon(e.into()))?;
        let mut req = self.oidc.http.post(&state.discovery.token_endpoint);
        match &secret {
            Some(s) => req = req.basic_auth(&p.client_id, Some(s)),
            None => form.push(("client_id", p.client_id.as_str())),
        }
        let resp = req.form(&form).send().await.map_err(|e| {
            anon(Error::Conflict(format!("the identity provider's token endpoint could not be reached: {e}")))
        })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return Err(anon(unauthenticated(format!(
                "the identity provider refused the code (HTTP {status}): {body}"
            ))));
        }
        let tokens: TokenResponse = resp.json().await.map_err(|e| {
            anon(unauthenticated(format!("the identity provider's answer is not a token response: {e}")))
        })?;
        let id_token =
            tokens.id_token.ok_or_else(|| anon(unauthenticated("the identity provider sent no ID token")))?;
        let claims = self.oidc.verify(p, &id_token, &p.client_id).await.map_err(anon)?;
        if claims.get("nonce").and_then(|n| n.as_str()) != Some(login.nonce.as_str()) {
            return Err(anon(unauthenticated("the ID token's nonce does not match this sign-in")));
        }
        let name = claims.get(&p.username_claim).and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| {
            anon(unauthenticated(format!("the ID token has no '{}' claim to name the user", p.username_claim)))
        })?;
        let groups = strings(claims.get(&p.groups_claim));
        let fail = |e: Error| (name.clone(), e);
        match login.target {
            SignInTarget::Portal => {
                let user = self.store.find_user_by_upn(&name).await.map_err(|_| {
                    fail(unauthenticated(format!(
                        "'{name}' is not a cloudpc user; the provider's SCIM connection (or an administrator) adds users"
                    )))
                })?;
                if !user.account_enabled {
                    return Err(fail(unauthenticated(format!("the account '{name}' is disabled"))));
                }
                // Local users (kept by hand) may sign in through a connected provider; a user
                // another provider manages only through that one.
                if user.identity_provider_id.is_some_and(|owner| owner != p.id) {
                    return Err(fail(unauthenticated(format!(
                        "'{name}' is managed by another identity provider; sign in through that one"
                    ))));
                }
                let how = format!("signed in through {}", p.display_name);
                self.start_session(user, ip, &how).await.map(|s| SignedIn::Portal(Box::new(s))).map_err(fail)
            }
            SignInTarget::Console => {
                let role = role_from_groups(p, &groups).ok_or_else(|| {
                    fail(Error::Forbidden(format!(
                        "'{name}' is in none of the provider's groups that grant Cloud PC Administrator or Cloud PC Reader"
                    )))
                })?;
                let expires = Utc::now() + chrono::Duration::from_std(SESSION_LIFETIME).unwrap_or_default();
                let actor = Actor { id: None, name: name.clone(), role, ip_address: ip, system: false };
                let created = self
                    .create_token(
                        &actor,
                        ApiTokenCreate {
                            display_name: format!("{name} (signed in through {})", p.display_name),
                            role,
                            expiration_date_time: Some(expires),
                        },
                    )
                    .await
                    .map_err(fail)?;
                Ok(SignedIn::Console { secret: created.secret, role, name })
            }
        }
    }

    /// A bearer JWT from a configured provider: verified like an ID token (audience: the
    /// provider's `apiAudience`, else its client id), the role from its groups claim.
    pub(crate) async fn authenticate_jwt(&self, token: &str, ip: Option<String>) -> Result<Actor> {
        let iss = unverified_issuer(token).ok_or_else(|| unauthenticated("the access token is not valid"))?;
        let p = self
            .store
            .list_identity_providers()
            .await?
            .into_iter()
            .find(|p| p.issuer == iss)
            .ok_or_else(|| unauthenticated("the access token's issuer is not a configured identity provider"))?;
        let audience = p.api_audience.clone().unwrap_or_else(|| p.client_id.clone());
        let claims = self.oidc.verify(&p, token, &audience).await?;
        if claims.get("nonce").is_some() {
            return Err(unauthenticated(
                "an ID token is not an access token; ask the provider for an access token for cloudpc",
            ));
        }
        let name = claims
            .get(&p.username_claim)
            .or_else(|| claims.get("sub"))
            .and_then(|v| v.as_str())
            .unwrap_or("(unnamed)")
            .to_string();
        let role = role_from_groups(&p, &strings(claims.get(&p.groups_claim))).ok_or_else(|| {
            Error::Forbidden(format!(
                "'{name}' is in none of the provider's groups that grant Cloud PC Administrator or Cloud PC Reader"
            ))
        })?;
        Ok(Actor { id: None, name: format!("{name} ({})", p.display_name), role, ip_address: ip, system: false })
    }

    async fn audit_sign_in_failure(&self, who: &str, provider: &str, reason: &str, ip: Option<String>) {
        let more = vec![
            property("identityProvider", None, Some(provider.to_string())),
            property("reason", None, Some(reason.to_string())),
        ];
        self.audit_failed_sign_in(who, ip, more).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_claims_and_token_shapes() {
        assert_eq!(strings(Some(&serde_json::json!(["a", 1, "b"]))), vec!["a", "b"]);
        assert_eq!(strings(Some(&serde_json::json!("a"))), vec!["a"]);
        assert!(strings(Some(&serde_json::json!({"a": 1}))).is_empty());
        assert!(looks_like_jwt("eyJ.eyJ.sig"));
        assert!(!looks_like_jwt("cpc_abc"));
        let payload = URL_SAFE_NO_PAD.encode(br#"{"iss":"http://127.0.0.1:9/"}"#);
        assert_eq!(unverified_issuer(&format!("x.{payload}.y")).as_deref(), Some("http://127.0.0.1:9"));
    }
}
