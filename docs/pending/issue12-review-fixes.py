# Unapplied, untested patch (session 7): fixes for the security review of issue 12's code.
# Run from the repository root: python3 docs/pending/issue12-review-fixes.py; then build, test, and delete this file.
import re
def sub(p, old, new, count=1):
    s=open(p).read()
    assert old in s, (p, old[:80])
    s=s.replace(old,new,count); open(p,'w').write(s)

# 9. last admin token: only tokens that do not expire count
sub('crates/cloudpc-store/src/sql/shared.rs','''                let admins: i64 =
                    sqlx::query("SELECT COUNT(*) AS n FROM api_tokens WHERE role = 'cloudPcAdministrator'")
                        .fetch_one(&mut *c)
                        .await?
                        .get("n");''','''                // Tokens that expire (a console signed in through a provider) do not keep anyone in
                // for good, so only lasting administrator tokens count.
                let sql = format!(
                    "SELECT COUNT(*) AS n FROM api_tokens WHERE role = 'cloudPcAdministrator' AND {} IS NULL",
                    json_text(1)
                );
                let args = [Arg::Path(json_path(&["expirationDateTime".to_string()]))];
                let admins: i64 = bind_args(sqlx::query(&sql), &args).fetch_one(&mut *c).await?.get("n");''')
sub('crates/cloudpc-store/src/sql/shared.rs','''                        "this is the last administrator token; create another administrator token before revoking it"''','''                        "this is the last administrator token that does not expire; create another before revoking it"''')

O='crates/cloudpc-control/src/oidc.rs'
# discovery: iss support flag; https endpoints; single flight + negative cache
sub(O,'''#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}''','''#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    /// RFC 9207: the provider names itself in every authorization response.
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}''')
sub(O,'''/// Per replica: what each provider published (a cache; nothing is decided here).
pub struct OidcCache {
    http: reqwest::Client,
    providers: Mutex<HashMap<Uuid, Arc<ProviderState>>>,
}''','''/// How long a provider whose discovery failed is not asked again.
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
}''')
sub(O,'''        Self { http, providers: Mutex::new(HashMap::new()) }''','''        Self {
            http,
            providers: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            failures: Mutex::new(HashMap::new()),
        }''')
sub(O,'''    async fn state(&self, p: &IdentityProvider) -> Result<Arc<ProviderState>> {
        if let Some(s) = self.providers.lock().unwrap_or_else(|e| e.into_inner()).get(&p.id) {
            if s.read.elapsed() < METADATA_LIFETIME && s.discovery.issuer.trim_end_matches('/') == p.issuer {
                return Ok(s.clone());
            }
        }
        let url = format!("{}/.well-known/openid-configuration", p.issuer);''','''    fn cached(&self, p: &IdentityProvider) -> Option<Arc<ProviderState>> {
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
        let url = format!("{}/.well-known/openid-configuration", p.issuer);''')
sub(O,'''        let set: JwkSet = self.get_json(&discovery.jwks_uri, &p.display_name).await?;
        let state = Arc::new(ProviderState {
            discovery,
            read: Instant::now(),
            keys: tokio::sync::Mutex::new(Keys { set, fetched: Instant::now() }),
        });
        self.providers.lock().unwrap_or_else(|e| e.into_inner()).insert(p.id, state.clone());
        Ok(state)''','''        // Keys and the client secret travel to these addresses: https only, as for the issuer.
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
        }))''')
# login CSRF: browser binding
sub(O,'''struct Login {
    provider: Uuid,''','''struct Login {
    /// SHA-256 of the random value in the browser's sign-in cookie: the callback must come from
    /// the browser that started the sign-in (no one can hand a victim their own sign-in).
    browser: String,
    provider: Uuid,''')
sub(O,'''    /// Starts a sign-in with a provider: remembers state, nonce and PKCE verifier, and returns
    /// the provider's authorization URL to send the browser to.
    pub async fn begin_oidc_sign_in(''','''    /// Starts a sign-in with a provider: remembers state, nonce and PKCE verifier, and returns
    /// the provider's authorization URL to send the browser to, and the value the browser keeps
    /// in a cookie until the callback.
    pub async fn begin_oidc_sign_in(''')
sub(O,'''        ip: Option<String>,
    ) -> Result<String> {''','''        ip: Option<String>,
    ) -> Result<(String, String)> {''')
sub(O,'''        let (csrf, nonce, verifier) = (random_secret(), random_secret(), random_secret());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let login = Login { provider: p.id, nonce: nonce.clone(), verifier, target, redirect_uri: redirect_uri.into() };''','''        let (csrf, nonce, verifier, browser) = (random_secret(), random_secret(), random_secret(), random_secret());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let login = Login {
            browser: sha(&browser),
            provider: p.id,
            nonce: nonce.clone(),
            verifier,
            target,
            redirect_uri: redirect_uri.into(),
        };''')
sub(O,'''        Ok(url.into())
    }''','''        Ok((url.into(), browser))
    }''')
sub(O,'''        state: &str,
        code: Option<&str>,
        issuer: Option<&str>,''','''        state: &str,
        browser: Option<&str>,
        code: Option<&str>,
        issuer: Option<&str>,''')
sub(O,'''        let login = match self.store.take_oidc_login(&sha(state)).await.map_err(|e| (None, e.into()))? {''','''        // Unauthenticated, and each refusal writes an audit event: callbacks count against the
        // address's sign-in limit.
        if let Some(addr) = &ip {
            if let Err(retry_after) = self.sign_in_rate.check(addr) {
                let what = "too many sign-in attempts from this address".into();
                return Err((None, Error::RateLimited { what, retry_after }));
            }
        }
        let login = match self.store.take_oidc_login(&sha(state)).await.map_err(|e| (None, e.into()))? {''')
sub(O,'''        let mixed_up = issuer.is_some_and(|i| i.trim_end_matches('/') != p.issuer);
        let result = if mixed_up {
            Err(("(unknown)".to_string(), unauthenticated("the response comes from another identity provider than the sign-in went to")))
        } else {''','''        let mixed_up = issuer.is_some_and(|i| i.trim_end_matches('/') != p.issuer);
        let advertised = match self.oidc.state(&p).await {
            Ok(s) => s.discovery.authorization_response_iss_parameter_supported,
            Err(_) => false,
        };
        let result = if browser.map(sha).as_deref() != Some(login.browser.as_str()) {
            Err((
                "(unknown)".to_string(),
                unauthenticated("this browser did not start the sign-in (its sign-in cookie is missing or different); start again"),
            ))
        } else if mixed_up || (advertised && issuer.is_none()) {
            Err(("(unknown)".to_string(), unauthenticated("the response comes from another identity provider than the sign-in went to")))
        } else {''')
# portal: a user of another provider is not signed in by this one
sub(O,'''                if !user.account_enabled {
                    return Err(fail(unauthenticated(format!("the account '{name}' is disabled"))));
                }''','''                if !user.account_enabled {
                    return Err(fail(unauthenticated(format!("the account '{name}' is disabled"))));
                }
                // Local users (kept by hand) may sign in through a connected provider; a user
                // another provider manages only through that one.
                if user.identity_provider_id.is_some_and(|owner| owner != p.id) {
                    return Err(fail(unauthenticated(format!(
                        "'{name}' is managed by another identity provider; sign in through that one"
                    ))));
                }''')
# bearer: ID tokens are not API tokens
sub(O,'''        let claims = self.oidc.verify(&p, token, &audience).await?;
        let name = claims''','''        let claims = self.oidc.verify(&p, token, &audience).await?;
        if claims.get("nonce").is_some() {
            return Err(unauthenticated("an ID token is not an access token; ask the provider for an access token for cloudpc"));
        }
        let name = claims''')

# types: secure_url public
T='crates/cloudpc-types/src/identity.rs'
sub(T,'''/// https anywhere; plain http only to the machine itself (a provider under test).
fn url_like(s: &str) -> bool {''','''/// https anywhere; plain http only to the machine itself (a provider under test).
pub fn secure_url(s: &str) -> bool {
    url_like(s)
}

fn url_like(s: &str) -> bool {''')

# api: cookie on start, read on callback
A='crates/cloudpc-api/src/sign_in.rs'
sub(A,'''    let redirect = format!("{}/auth/oidc/callback", root(&app, &headers));
    Ok(see_other(&app.begin_oidc_sign_in(&provider, target, &redirect, Some(addr.ip().to_string())).await?))''','''    let redirect = format!("{}/auth/oidc/callback", root(&app, &headers));
    let (to, browser) = app.begin_oidc_sign_in(&provider, target, &redirect, Some(addr.ip().to_string())).await?;
    let mut r = see_other(&to);
    // Lax, not Strict: the callback is a top-level navigation from the provider's site.
    let secure = if root(&app, &headers).starts_with("https://") { "; Secure" } else { "" };
    let cookie = format!("{BROWSER_COOKIE}={browser}; HttpOnly; SameSite=Lax; Path=/auth/oidc; Max-Age=600{secure}");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(r)''')
sub(A,'''pub fn routes() -> Router<App> {''','''/// The cookie that binds a sign-in to the browser that started it.
const BROWSER_COOKIE: &str = "cloudpc_oidc";

fn browser_cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == BROWSER_COOKIE).then(|| v.to_string())
    })
}

pub fn routes() -> Router<App> {''')
sub(A,'''    match app.finish_oidc_sign_in(&state, q.code.as_deref(), q.iss.as_deref(), provider_error.as_deref(), ip).await {''','''    let browser = browser_cookie(&headers);
    let done = app
        .finish_oidc_sign_in(&state, browser.as_deref(), q.code.as_deref(), q.iss.as_deref(), provider_error.as_deref(), ip)
        .await;
    let mut r = match done {''')
s=open(A).read()
old_tail='''        Err((_, e)) => see_other(&format!("/?signInError={}", encode(&e.to_string()))),
    }
}'''
new_tail='''        Err((_, e)) => see_other(&format!("/?signInError={}", encode(&e.to_string()))),
    };
    // The sign-in cookie has done its work.
    r.headers_mut().append(header::SET_COOKIE, HeaderValue::from_static("cloudpc_oidc=; HttpOnly; SameSite=Lax; Path=/auth/oidc; Max-Age=0"));
    r
}'''
assert old_tail in s; s=s.replace(old_tail,new_tail,1); open(A,'w').write(s)
sub(A,'''            let mut r = see_other("/");
            let cookie = crate::portal::session_set_cookie(&app, &headers, &session.secret);
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r''','''            let mut r = see_other("/");
            let cookie = crate::portal::session_set_cookie(&app, &headers, &session.secret);
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r''')

M='crates/cloudpc-control/src/scim/mod.rs'
s=open(M).read()
# helpers
s=s.replace('''impl App {
    async fn scim_memberships(&self)''','''impl App {
    /// A user this provider manages; anyone else's (local, or another provider's) is not found,
    /// so a SCIM token reaches only what its provider created.
    async fn own_user(&self, p: &IdentityProvider, id: &str) -> Result<User> {
        let uid = parse_uuid("User", id)?;
        match self.store.get_user(uid).await {
            Ok(u) if u.identity_provider_id == Some(p.id) => Ok(u),
            _ => Err(ScimError::new(404, None, format!("User '{id}' does not exist"))),
        }
    }

    async fn own_group(&self, p: &IdentityProvider, id: &str) -> Result<Group> {
        let gid = parse_uuid("Group", id)?;
        match self.store.get_group(gid).await {
            Ok(g) if g.identity_provider_id == Some(p.id) => Ok(g),
            _ => Err(ScimError::new(404, None, format!("Group '{id}' does not exist"))),
        }
    }

    async fn scim_memberships(&self)''',1)
s=s.replace('''    pub async fn scim_get_user(&self, id: &str, base: &str) -> Result<Resource> {
        self.scim_user_resource(parse_uuid("User", id)?, base).await
    }

    pub async fn scim_get_group(&self, id: &str, base: &str) -> Result<Resource> {
        self.scim_group_resource(parse_uuid("Group", id)?, base).await
    }

    pub async fn scim_list_users(&self, q: &ListQuery, base: &str) -> Result<Value> {''','''    pub async fn scim_get_user(&self, p: &IdentityProvider, id: &str, base: &str) -> Result<Resource> {
        let u = self.own_user(p, id).await?;
        self.scim_user_resource(u.id, base).await
    }

    pub async fn scim_get_group(&self, p: &IdentityProvider, id: &str, base: &str) -> Result<Resource> {
        let g = self.own_group(p, id).await?;
        self.scim_group_resource(g.id, base).await
    }

    pub async fn scim_list_users(&self, p: &IdentityProvider, q: &ListQuery, base: &str) -> Result<Value> {''',1)
s=s.replace('''            if let Ok(u) = self.store.find_user_by_upn(name).await {''','''            if let Ok(u) = self.store.find_user_by_upn(name).await.map(Some).map(|u| u.filter(|u| u.identity_provider_id == Some(p.id))) {
                let Some(u) = u else { return Ok(page(matches, q)) };''',1)
s=s.replace('''        let users = self.store.list_users().await.map_err(Error::from)?;
        let groups: HashMap<Uuid, Group> =''','''        let mut users = self.store.list_users().await.map_err(Error::from)?;
        users.retain(|u| u.identity_provider_id == Some(p.id));
        let groups: HashMap<Uuid, Group> =''',1)
s=s.replace('''    pub async fn scim_list_groups(&self, q: &ListQuery, base: &str) -> Result<Value> {
        let filter = parse_query_filter(q)?;
        let groups = self.store.list_groups().await.map_err(Error::from)?;''','''    pub async fn scim_list_groups(&self, p: &IdentityProvider, q: &ListQuery, base: &str) -> Result<Value> {
        let filter = parse_query_filter(q)?;
        let mut groups = self.store.list_groups().await.map_err(Error::from)?;
        groups.retain(|g| g.identity_provider_id == Some(p.id));''',1)
# replace/patch/delete user
s=s.replace('''        let id = parse_uuid("User", id)?;
        let before = self.store.get_user(id).await.map_err(Error::from)?;
        check_version(if_match, before.row_version)?;
        let mut u = before.clone();
        user_fields(body)?.apply(&mut u);''','''        let before = self.own_user(p, id).await?;
        let id = before.id;
        check_version(if_match, before.row_version)?;
        let mut u = before.clone();
        user_fields(body)?.apply(&mut u);''',1)
s=s.replace('''        check_schemas(body, PATCH_SCHEMA)?;
        let id = parse_uuid("User", id)?;
        let before = self.store.get_user(id).await.map_err(Error::from)?;''','''        check_schemas(body, PATCH_SCHEMA)?;
        let before = self.own_user(p, id).await?;
        let id = before.id;''',1)
s=s.replace('''    pub async fn scim_delete_user(&self, actor: &Actor, id: &str, if_match: Option<&str>) -> Result<()> {
        let id = parse_uuid("User", id)?;
        let u = self.store.get_user(id).await.map_err(Error::from)?;
        check_version(if_match, u.row_version)?;
        self.delete_user(actor, &id.to_string()).await?;''','''    pub async fn scim_delete_user(&self, p: &IdentityProvider, actor: &Actor, id: &str, if_match: Option<&str>) -> Result<()> {
        let u = self.own_user(p, id).await?;
        check_version(if_match, u.row_version)?;
        self.delete_user(actor, &u.id.to_string()).await?;''',1)
# groups
s=s.replace('''        let id = parse_uuid("Group", id)?;
        let before = self.store.get_group(id).await.map_err(Error::from)?;
        check_version(if_match, before.row_version)?;
        let (name, external_id, members) = group_fields(body)?;''','''        let before = self.own_group(p, id).await?;
        let id = before.id;
        check_version(if_match, before.row_version)?;
        let (name, external_id, members) = group_fields(body)?;''',1)
s=s.replace('''        check_schemas(body, PATCH_SCHEMA)?;
        let id = parse_uuid("Group", id)?;
        let before = self.store.get_group(id).await.map_err(Error::from)?;''','''        check_schemas(body, PATCH_SCHEMA)?;
        let before = self.own_group(p, id).await?;
        let id = before.id;''',1)
s=s.replace('''    pub async fn scim_delete_group(&self, actor: &Actor, id: &str, if_match: Option<&str>) -> Result<()> {
        let id = parse_uuid("Group", id)?;
        let g = self.store.get_group(id).await.map_err(Error::from)?;
        check_version(if_match, g.row_version)?;
        self.delete_group(actor, &id.to_string()).await?;''','''    pub async fn scim_delete_group(&self, p: &IdentityProvider, actor: &Actor, id: &str, if_match: Option<&str>) -> Result<()> {
        let g = self.own_group(p, id).await?;
        check_version(if_match, g.row_version)?;
        self.delete_group(actor, &g.id.to_string()).await?;''',1)
# members must be the provider's own users
s=s.replace('''            let u = self.store.get_user(*id).await.map_err(|_| {
                ScimError::invalid(format!("members: '{id}' is not the id of a user here"))
            })?;
            users.insert(*id, u);''','''            let u = self.store.get_user(*id).await.map_err(|_| {
                ScimError::invalid(format!("members: '{id}' is not the id of a user here"))
            })?;
            if u.identity_provider_id != g.identity_provider_id {
                return Err(ScimError::invalid(format!("members: '{id}' is not a user this provider manages")));
            }
            users.insert(*id, u);''',1)
# no adoption comment
s=s.replace('''    /// Saves a user the provider changed: its own from now on, if it was local (adoption, so an
    /// organisation can connect its provider to a directory it first kept by hand).''','''    /// Saves a user the provider changed (only its own reach here: see `own_user`).''',1)
open(M,'w').write(s)

S='crates/cloudpc-api/src/scim.rs'
s=open(S).read()
s=s.replace('''async fn list_users(State(app): State<App>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Reply {
    let q = query(q)?;
    Ok(reply(StatusCode::OK, &app.scim_list_users(&q, &base(&app, &headers)).await.map_err(Refusal)?))''','''async fn list_users(State(app): State<App>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let q = query(q)?;
    Ok(reply(StatusCode::OK, &app.scim_list_users(&c.0, &q, &base(&app, &headers)).await.map_err(Refusal)?))''',1)
s=s.replace('''async fn list_groups(State(app): State<App>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Reply {
    let q = query(q)?;
    Ok(reply(StatusCode::OK, &app.scim_list_groups(&q, &base(&app, &headers)).await.map_err(Refusal)?))''','''async fn list_groups(State(app): State<App>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let q = query(q)?;
    Ok(reply(StatusCode::OK, &app.scim_list_groups(&c.0, &q, &base(&app, &headers)).await.map_err(Refusal)?))''',1)
s=s.replace('''async fn get_user(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    let r = app.scim_get_user(&id, &base(&app, &headers)).await.map_err(Refusal)?;''','''async fn get_user(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let r = app.scim_get_user(&c.0, &id, &base(&app, &headers)).await.map_err(Refusal)?;''',1)
s=s.replace('''async fn get_group(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    let r = app.scim_get_group(&id, &base(&app, &headers)).await.map_err(Refusal)?;''','''async fn get_group(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>, req: Request) -> Reply {
    let c = caller(req.extensions())?;
    let r = app.scim_get_group(&c.0, &id, &base(&app, &headers)).await.map_err(Refusal)?;''',1)
s=s.replace('''    app.scim_delete_user(&c.1, &id, if_match(&headers).as_deref()).await.map_err(Refusal)?;''','''    app.scim_delete_user(&c.0, &c.1, &id, if_match(&headers).as_deref()).await.map_err(Refusal)?;''',1)
s=s.replace('''    app.scim_delete_group(&c.1, &id, if_match(&headers).as_deref()).await.map_err(Refusal)?;''','''    app.scim_delete_group(&c.0, &c.1, &id, if_match(&headers).as_deref()).await.map_err(Refusal)?;''',1)
open(S,'w').write(s)

I='crates/cloudpc-control/src/identity.rs'
sub(I,'''    pub async fn delete_identity_provider(&self, actor: &Actor, id: &str) -> Result<()> {
        let p = self.get_identity_provider(id).await?;
        let audit = change("Delete", AuditOperationType::Delete, &p).event(actor, Some(&p), None);''','''    /// Disconnects a provider. Its users and groups stay, as local ones that admins manage from
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
        let audit = change("Delete", AuditOperationType::Delete, &p).event(actor, Some(&p), None);''')

P='crates/cloudpc-control/src/scim/patch.rs'
s=open(P).read()
s=s.replace('''/// The most operations one PATCH may carry.
pub const MAX_OPERATIONS: usize = 1000;''','''/// The most operations one PATCH may carry.
pub const MAX_OPERATIONS: usize = 1000;
/// The most bytes of values one PATCH may write: a filtered path copies its value into every
/// element it matches, so a 1 MiB body could otherwise grow into gigabytes.
pub const MAX_WRITTEN: usize = 4 << 20;''',1)
s=s.replace('''    for (i, o) in ops.iter().enumerate() {
        let op = match''','''    let mut budget = MAX_WRITTEN;
    for (i, o) in ops.iter().enumerate() {
        let op = match''',1)
s=s.replace('''                        Ok(p) if p.attr.sub.is_some() || p.filter.is_some() => at_path(obj, op, &p, Some(v), i)?,''','''                        Ok(p) if p.attr.sub.is_some() || p.filter.is_some() => {
                            at_path(obj, op, &p, Some(v), i, &mut budget)?
                        }''',1)
s=s.replace('''                at_path(obj, op, &p, value, i)?;''','''                at_path(obj, op, &p, value, i, &mut budget)?;''',1)
s=s.replace('''fn at_path(obj: &mut Map<String, Value>, op: Op, p: &PatchPath, value: Option<Value>, i: usize) -> Result<(), PatchError> {
    let key = key_ci(obj, &p.attr.attr);''','''fn at_path(
    obj: &mut Map<String, Value>,
    op: Op,
    p: &PatchPath,
    value: Option<Value>,
    i: usize,
    budget: &mut usize,
) -> Result<(), PatchError> {
    let size = value.as_ref().map_or(0, |v| v.to_string().len()).max(1);
    let mut spend = |n: usize| -> Result<(), PatchError> {
        *budget = budget.checked_sub(size.saturating_mul(n)).ok_or_else(|| {
            err("tooMany", format!("operation {i}: the PATCH would write more than {} MiB of values", MAX_WRITTEN >> 20))
        })?;
        Ok(())
    };
    let key = key_ci(obj, &p.attr.attr);''',1)
s=s.replace('''            let hits = items.iter().filter(|x| filter.matches(x)).count();''','''            let hits = items.iter().filter(|x| filter.matches(x)).count();
            if op != Op::Remove {
                spend(hits.max(1))?;
            }''',1)
open(P,'w').write(s)

TI='crates/cloudpc/tests/integration/identity.rs'
sub(TI,'''    let (st, e) = s.delete(&format!("/cloudpc/identityProviders/{}", provider["id"].as_str().unwrap())).await;
    assert_eq!(st, 409);
    assert!(message(&e).contains("still manages 4 users and 1 group"), "{e}");
''','''
    // A SCIM token reaches only what its provider manages: local users are invisible to it.
    let local = s.user("local@contoso.com").await;
    let local_id = local["id"].as_str().unwrap();
    let (_, found, _) = scim(&s, &token, Method::GET, &q(r#"userName eq "local@contoso.com""#), None, &[]).await;
    assert_eq!(found["totalResults"], 0);
    let (_, all, _) = scim(&s, &token, Method::GET, "/Users", None, &[]).await;
    assert_eq!(all["totalResults"], 4, "only the provider's own users");
    let off = json!({"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": false}}]});
    assert_eq!(scim(&s, &token, Method::PATCH, &format!("/Users/{local_id}"), Some(off), &[]).await.0, 404);
    assert_eq!(scim(&s, &token, Method::DELETE, &format!("/Users/{local_id}"), None, &[]).await.0, 404);
    let take = json!({"schemas": [PATCH], "Operations": [{"op": "add", "path": "members", "value": [{"value": local_id}]}]});
    let (st, e, _) = scim(&s, &token, Method::PATCH, &format!("/Groups/{gid}"), Some(take), &[]).await;
    assert_eq!(st, 400, "{e}");
    assert!(e["detail"].as_str().unwrap().contains("not a user this provider manages"), "{e}");
    assert_eq!(s.get(&format!("/v1.0/users/{local_id}")).await.1["accountEnabled"], true);
''')
sub(TI,'''    assert_eq!(scim(&s, &token, Method::GET, "/Users", None, &[]).await.0, 401);
    assert_eq!(scim(&s, t2["secret"].as_str().unwrap(), Method::GET, "/Users", None, &[]).await.0, 200);
}''','''    assert_eq!(scim(&s, &token, Method::GET, "/Users", None, &[]).await.0, 401);
    assert_eq!(scim(&s, t2["secret"].as_str().unwrap(), Method::GET, "/Users", None, &[]).await.0, 200);

    // Disconnecting the provider leaves its users as local ones that admins manage from then on.
    let (st, e) = s.delete(&format!("/cloudpc/identityProviders/{}", provider["id"].as_str().unwrap())).await;
    assert_eq!(st, 204, "{e}");
    let (st, e) = s.patch(&format!("/v1.0/users/{ann_id}"), json!({"displayName": "now local"})).await;
    assert_eq!(st, 200, "{e}");
    assert!(e.get("identityProviderId").is_none(), "{e}");
    assert_eq!(scim(&s, t2["secret"].as_str().unwrap(), Method::GET, "/Users", None, &[]).await.0, 401);
}''')
sub(TI,'''    assert!(tokens["value"].as_array().unwrap().iter().any(|t| t["displayName"] == "ada@contoso.com (signed in through Contoso ID)" && t["role"] == "cloudPcAdministrator" && !t["expirationDateTime"].is_null()), "{tokens}");''','''    assert!(tokens["value"].as_array().unwrap().iter().any(|t| t["displayName"] == "ada@contoso.com (signed in through Contoso ID)" && t["role"] == "cloudPcAdministrator" && !t["expirationDateTime"].is_null()), "{tokens}");
    // Ada's token expires, so it does not count as another administrator token for good.
    let lasting = tokens["value"].as_array().unwrap().iter().find(|t| t["role"] == "cloudPcAdministrator" && t["expirationDateTime"].is_null()).unwrap();
    let (st, e) = s.delete(&format!("/cloudpc/tokens/{}", lasting["id"].as_str().unwrap())).await;
    assert_eq!(st, 409, "{e}");''')
sub(TI,'''    refused(idp.mint(&idp.claims("ops@contoso.com", &["cpc-admins"], "someone-else", 300)), "audience").await;''','''    refused(idp.mint(&idp.claims("ops@contoso.com", &["cpc-admins"], "someone-else", 300)), "audience").await;
    let mut id_token = idp.claims("ops@contoso.com", &["cpc-admins"], "cloudpc", 300);
    id_token["nonce"] = json!("n-0S6_WzA2Mj");
    refused(idp.mint(&id_token), "not an access token").await;''')
sub(TI,'''    let again = http.get(&back).send().await.unwrap();''','''    // Login CSRF: a callback opened in a browser that did not start the sign-in is refused.
    let back3 = provider_login(&http, &idp, &start, "alice").await;
    let victim = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = victim.get(&back3).send().await.unwrap();
    let to = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(to.contains("did+not+start") && !resp.headers().get_all("set-cookie").iter().any(|c| c.to_str().unwrap().starts_with("cloudpc_session=")), "{to}");
    let again = http.get(&back).send().await.unwrap();''')

PT='crates/cloudpc-control/src/scim/patch.rs'
sub(PT,'''        assert_eq!(t(patch(&mut u, json!([{"op": "replace", "value": "x"}]), USER)), "invalidValue");''','''        assert_eq!(t(patch(&mut u, json!([{"op": "replace", "value": "x"}]), USER)), "invalidValue");
        // A filtered path copies its value into each match: bounded, whatever the body's size.
        let mut g = json!({"members": (0..2000).map(|i| json!({"value": i.to_string()})).collect::<Vec<_>>()});
        let big = "x".repeat(4096);
        assert_eq!(t(patch(&mut g, json!([{"op": "replace", "path": "members[value pr].display", "value": big}]), GROUP)), "tooMany");''')
