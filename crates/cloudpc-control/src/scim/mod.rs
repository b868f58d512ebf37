//! The SCIM 2.0 service provider (RFC 7643/7644): how an identity provider's provisioning agent
//! (Entra ID, Okta, …) creates, changes and removes cloudpc's users and groups.
//!
//! SCIM resources are views of the directory's own `User` and `Group`: a user made through SCIM
//! is an ordinary user (licenses, group-based policy assignment and the reconciler treat it like
//! any other) that remembers its provider. Each change is one directory change with an audit event
//! naming the provider, and wakes the reconciler, so a membership change reaches provisioning at
//! once. Attributes cloudpc has no use for (addresses, phone numbers, the enterprise extension)
//! are accepted and not kept, as RFC 7644 §3.3 allows, because providers send them all and refusing
//! them would stop the provider's whole sync.

pub mod filter;
pub mod patch;

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::directory::{Group, User};
use cloudpc_types::identity::IdentityProvider;

use crate::audit::{property, Actor, Change};
use crate::{App, Error};

use filter::{get_ci, parse_filter, Filter};

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const ENTERPRISE_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
/// The most resources one list answer holds.
pub const MAX_RESULTS: usize = 1000;

/// A SCIM refusal: HTTP status, the RFC's `scimType` where one fits, and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimError {
    pub status: u16,
    pub scim_type: Option<&'static str>,
    pub detail: String,
}

impl ScimError {
    pub fn new(status: u16, scim_type: Option<&'static str>, detail: impl Into<String>) -> Self {
        Self { status, scim_type, detail: detail.into() }
    }

    fn invalid(detail: impl Into<String>) -> Self {
        Self::new(400, Some("invalidValue"), detail)
    }

    pub fn body(&self) -> Value {
        let mut v = json!({"schemas": [ERROR_SCHEMA], "status": self.status.to_string(), "detail": self.detail});
        if let Some(t) = self.scim_type {
            v["scimType"] = json!(t);
        }
        v
    }
}

impl From<Error> for ScimError {
    fn from(e: Error) -> Self {
        match &e {
            Error::Invalid(v) => ScimError::invalid(format!("{}: {}", scim_field(&v.field), v.message)),
            Error::NotFound { .. } => ScimError::new(404, None, e.to_string()),
            Error::Conflict(m) if m.contains("already exists") => ScimError::new(409, Some("uniqueness"), m.clone()),
            Error::Conflict(m) if m.contains("changed since it was read") => {
                ScimError::new(412, None, format!("{m}; read it again"))
            }
            Error::Conflict(m) => ScimError::new(409, Some("mutability"), m.clone()),
            Error::Unauthenticated(m) => ScimError::new(401, None, m.clone()),
            Error::Forbidden(m) => ScimError::new(403, None, m.clone()),
            Error::RateLimited { .. } | Error::Busy(_) | Error::TooManyAttempts { .. } => {
                ScimError::new(429, None, e.to_string())
            }
            _ => {
                tracing::error!(error = ?e, "SCIM request failed");
                ScimError::new(500, None, "an internal error occurred")
            }
        }
    }
}

/// Graph field names in messages become the SCIM names the provider sent.
fn scim_field(graph: &str) -> &str {
    match graph {
        "userPrincipalName" => "userName",
        "surname" => "name.familyName",
        "givenName" => "name.givenName",
        "mail" => "emails",
        "accountEnabled" => "active",
        other => other,
    }
}

type Result<T> = std::result::Result<T, ScimError>;

/// What the list endpoints take (RFC 7644 §3.4.2).
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    pub filter: Option<String>,
    pub start_index: Option<i64>,
    pub count: Option<i64>,
    pub attributes: Option<String>,
    pub excluded_attributes: Option<String>,
}

/// A resource as SCIM shows it, with its version for the `ETag` header.
pub struct Resource {
    pub body: Value,
    pub version: String,
}

fn etag(row_version: u64) -> String {
    format!("W/\"{row_version}\"")
}

fn ts(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn user_json(u: &User, groups: &[&Group], base: &str) -> Value {
    let mut name = Map::new();
    if let Some(g) = &u.given_name {
        name.insert("givenName".into(), json!(g));
    }
    if let Some(s) = &u.surname {
        name.insert("familyName".into(), json!(s));
    }
    let mut v = json!({
        "schemas": [USER_SCHEMA],
        "id": u.id.to_string(),
        "userName": u.user_principal_name,
        "displayName": u.display_name,
        "active": u.account_enabled,
        "groups": groups.iter().map(|g| json!({
            "value": g.id.to_string(), "display": g.display_name, "$ref": format!("{base}/Groups/{}", g.id),
        })).collect::<Vec<_>>(),
        "meta": {
            "resourceType": "User",
            "created": ts(u.created_date_time),
            "lastModified": ts(u.created_date_time),
            "version": etag(u.row_version),
            "location": format!("{base}/Users/{}", u.id),
        },
    });
    if !name.is_empty() {
        v["name"] = Value::Object(name);
    }
    if let Some(m) = &u.mail {
        v["emails"] = json!([{"value": m, "type": "work", "primary": true}]);
    }
    if let Some(x) = &u.external_id {
        v["externalId"] = json!(x);
    }
    v
}

pub fn group_json(g: &Group, members: &[&User], base: &str) -> Value {
    let mut v = json!({
        "schemas": [GROUP_SCHEMA],
        "id": g.id.to_string(),
        "displayName": g.display_name,
        "members": members.iter().map(|u| json!({
            "value": u.id.to_string(), "display": u.user_principal_name, "type": "User",
            "$ref": format!("{base}/Users/{}", u.id),
        })).collect::<Vec<_>>(),
        "meta": {
            "resourceType": "Group",
            "created": ts(g.created_date_time),
            "lastModified": ts(g.created_date_time),
            "version": etag(g.row_version),
            "location": format!("{base}/Groups/{}", g.id),
        },
    });
    if let Some(x) = &g.external_id {
        v["externalId"] = json!(x);
    }
    v
}

/// A string attribute, or nothing; anything else is refused with the attribute's name.
fn opt_str(v: &Value, key: &str) -> Result<Option<String>> {
    match get_ci(v, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ScimError::invalid(format!("{key}: must be a string"))),
    }
}

/// SCIM booleans, also as Entra ID sends them: the strings "True" and "False".
fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>> {
    match get_ci(v, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(_) => Err(ScimError::invalid(format!("{key}: must be true or false"))),
    }
}

fn check_schemas(body: &Value, want: &str) -> Result<()> {
    if !body.is_object() {
        return Err(ScimError::new(400, Some("invalidSyntax"), "the body must be a JSON object"));
    }
    match get_ci(body, "schemas") {
        Some(Value::Array(s)) if s.iter().any(|x| x.as_str().is_some_and(|x| x.eq_ignore_ascii_case(want))) => Ok(()),
        _ => Err(ScimError::new(400, Some("invalidSyntax"), format!("'schemas' must list {want}"))),
    }
}

/// The user fields a SCIM body sets (everything else in it is not kept).
struct UserFields {
    user_name: String,
    display_name: Option<String>,
    given_name: Option<String>,
    family_name: Option<String>,
    formatted: Option<String>,
    external_id: Option<String>,
    active: Option<bool>,
    mail: Option<String>,
}

fn user_fields(body: &Value) -> Result<UserFields> {
    check_schemas(body, USER_SCHEMA)?;
    let user_name = opt_str(body, "userName")?.ok_or_else(|| ScimError::invalid("userName: is required"))?;
    let name = get_ci(body, "name").cloned().unwrap_or(Value::Null);
    if !(name.is_null() || name.is_object()) {
        return Err(ScimError::invalid("name: must be an object"));
    }
    let mail = match get_ci(body, "emails") {
        None | Some(Value::Null) => None,
        Some(Value::Array(emails)) => {
            let primary = emails.iter().find(|e| opt_bool(e, "primary").ok().flatten() == Some(true));
            let work = emails.iter().find(|e| get_ci(e, "type").and_then(Value::as_str) == Some("work"));
            match primary.or(work).or(emails.first()) {
                Some(e) => opt_str(e, "value")?,
                None => None,
            }
        }
        Some(_) => return Err(ScimError::invalid("emails: must be an array")),
    };
    Ok(UserFields {
        user_name,
        display_name: opt_str(body, "displayName")?,
        given_name: opt_str(&name, "givenName")?,
        family_name: opt_str(&name, "familyName")?,
        formatted: opt_str(&name, "formatted")?,
        external_id: opt_str(body, "externalId")?,
        active: opt_bool(body, "active")?,
        mail,
    })
}

impl UserFields {
    /// Writes the fields into `u` (a PUT replaces: what the body lacks is cleared).
    fn apply(self, u: &mut User) {
        let display = self
            .display_name
            .or(self.formatted)
            .or_else(|| match (&self.given_name, &self.family_name) {
                (Some(g), Some(f)) => Some(format!("{g} {f}")),
                (Some(x), None) | (None, Some(x)) => Some(x.clone()),
                _ => None,
            })
            .unwrap_or_else(|| User::local_part(&self.user_name).to_string());
        if u.user_principal_name.is_empty() {
            u.mail_nickname = nickname(&self.user_name);
        }
        u.user_principal_name = self.user_name;
        u.display_name = display;
        u.given_name = self.given_name;
        u.surname = self.family_name;
        u.external_id = self.external_id;
        u.account_enabled = self.active.unwrap_or(true);
        u.mail = self.mail;
    }
}

fn nickname(upn: &str) -> String {
    let n: String =
        User::local_part(upn).chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(64).collect();
    if n.is_empty() {
        "user".into()
    } else {
        n
    }
}

/// The group fields a SCIM body sets, and its members (ids) when the body names them.
fn group_fields(body: &Value) -> Result<(String, Option<String>, Option<Vec<Uuid>>)> {
    check_schemas(body, GROUP_SCHEMA)?;
    let name = opt_str(body, "displayName")?.ok_or_else(|| ScimError::invalid("displayName: is required"))?;
    let members = match get_ci(body, "members") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            let mut ids = Vec::with_capacity(a.len());
            for m in a {
                let v =
                    opt_str(m, "value")?.ok_or_else(|| ScimError::invalid("members: each member needs a 'value'"))?;
                let id = Uuid::parse_str(&v)
                    .map_err(|_| ScimError::invalid(format!("members: '{v}' is not the id of a user here")))?;
                ids.push(id);
            }
            Some(ids)
        }
        Some(_) => return Err(ScimError::invalid("members: must be an array")),
    };
    Ok((name, opt_str(body, "externalId")?, members))
}

/// `attributes` / `excludedAttributes` (RFC 7644 §3.4.2.5); `id` and `schemas` always stay.
fn project(mut v: Value, q: &ListQuery) -> Value {
    let list = |s: &Option<String>| -> Option<Vec<String>> {
        s.as_ref().map(|s| {
            s.split(',')
                .map(|a| {
                    let a = a.trim();
                    // `urn:…:User:name.givenName` → `name.givenName`
                    if a.to_ascii_lowercase().starts_with("urn:") {
                        a.rsplit(':').next().unwrap_or(a).to_string()
                    } else {
                        a.to_string()
                    }
                })
                .filter(|a| !a.is_empty())
                .collect()
        })
    };
    let Some(obj) = v.as_object_mut() else { return v };
    if let Some(keep) = list(&q.attributes) {
        let wanted = |k: &str| keep.iter().any(|a| a.split('.').next().is_some_and(|top| top.eq_ignore_ascii_case(k)));
        obj.retain(|k, _| k == "id" || k == "schemas" || wanted(k));
        for a in &keep {
            if let Some((top, sub)) = a.split_once('.') {
                let key = obj.keys().find(|k| k.eq_ignore_ascii_case(top)).cloned();
                if let Some(Value::Object(inner)) = key.and_then(|k| obj.get_mut(&k)) {
                    let subs: Vec<&str> = keep
                        .iter()
                        .filter_map(|x| x.split_once('.').filter(|(t, _)| t.eq_ignore_ascii_case(top)).map(|(_, s)| s))
                        .collect();
                    let _ = sub;
                    inner.retain(|k, _| subs.iter().any(|s| s.eq_ignore_ascii_case(k)));
                }
            }
        }
    } else if let Some(drop) = list(&q.excluded_attributes) {
        for a in drop {
            match a.split_once('.') {
                Some((top, sub)) => {
                    let key = obj.keys().find(|k| k.eq_ignore_ascii_case(top)).cloned();
                    if let Some(Value::Object(inner)) = key.and_then(|k| obj.get_mut(&k)) {
                        inner.retain(|k, _| !k.eq_ignore_ascii_case(sub));
                    }
                }
                None => obj.retain(|k, _| k == "id" || k == "schemas" || !k.eq_ignore_ascii_case(&a)),
            }
        }
    }
    v
}

fn parse_query_filter(q: &ListQuery) -> Result<Option<Filter>> {
    match q.filter.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(f) => parse_filter(f)
            .map(Some)
            .map_err(|e| ScimError::new(400, Some("invalidFilter"), format!("the filter {}", e.0))),
    }
}

/// One page of matches as a ListResponse (startIndex is 1-based; count 0 gives only the total).
fn page(matches: Vec<Value>, q: &ListQuery) -> Value {
    let total = matches.len();
    let start = q.start_index.unwrap_or(1).max(1) as usize;
    let count = q.count.unwrap_or(MAX_RESULTS as i64).clamp(0, MAX_RESULTS as i64) as usize;
    let items: Vec<Value> = matches.into_iter().skip(start - 1).take(count).map(|v| project(v, q)).collect();
    json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": total,
        "startIndex": start,
        "itemsPerPage": items.len(),
        "Resources": items,
    })
}

fn user_change(activity: &str, op: AuditOperationType, u: &User) -> Change<'static> {
    Change {
        component: "Directory",
        activity: format!("{activity} User"),
        operation: op,
        resource_type: "user",
        resource_id: u.id.to_string(),
        resource_name: u.user_principal_name.clone(),
    }
}

fn group_change(activity: &str, op: AuditOperationType, g: &Group) -> Change<'static> {
    Change {
        component: "Directory",
        activity: format!("{activity} Group"),
        operation: op,
        resource_type: "group",
        resource_id: g.id.to_string(),
        resource_name: g.display_name.clone(),
    }
}

fn parse_uuid(kind: &'static str, id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| ScimError::new(404, None, format!("{kind} '{id}' does not exist")))
}

/// `If-Match`: the resource's version must be the one the provider read.
fn check_version(if_match: Option<&str>, row_version: u64) -> Result<()> {
    match if_match.map(str::trim) {
        None | Some("*") => Ok(()),
        Some(tag) if tag == etag(row_version) || tag.trim_start_matches("W/") == format!("\"{row_version}\"") => Ok(()),
        Some(_) => Err(ScimError::new(412, None, "the resource changed since that version was read (If-Match)")),
    }
}

impl App {
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

    async fn scim_memberships(&self) -> Result<(HashMap<Uuid, Vec<Uuid>>, HashMap<Uuid, Vec<Uuid>>)> {
        let mut by_user: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        let mut by_group: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for (g, u) in self.store.memberships().await.map_err(Error::from)? {
            by_user.entry(u).or_default().push(g);
            by_group.entry(g).or_default().push(u);
        }
        Ok((by_user, by_group))
    }

    async fn scim_user_resource(&self, id: Uuid, base: &str) -> Result<Resource> {
        let u = self.store.get_user(id).await.map_err(Error::from)?;
        let groups = self.store.list_groups_of_user(id).await.map_err(Error::from)?;
        let refs: Vec<&Group> = groups.iter().collect();
        Ok(Resource { body: user_json(&u, &refs, base), version: etag(u.row_version) })
    }

    async fn scim_group_resource(&self, id: Uuid, base: &str) -> Result<Resource> {
        let g = self.store.get_group(id).await.map_err(Error::from)?;
        let members = self.store.list_members(id).await.map_err(Error::from)?;
        let refs: Vec<&User> = members.iter().collect();
        Ok(Resource { body: group_json(&g, &refs, base), version: etag(g.row_version) })
    }

    pub async fn scim_get_user(&self, p: &IdentityProvider, id: &str, base: &str) -> Result<Resource> {
        let u = self.own_user(p, id).await?;
        self.scim_user_resource(u.id, base).await
    }

    pub async fn scim_get_group(&self, p: &IdentityProvider, id: &str, base: &str) -> Result<Resource> {
        let g = self.own_group(p, id).await?;
        self.scim_group_resource(g.id, base).await
    }

    pub async fn scim_list_users(&self, p: &IdentityProvider, q: &ListQuery, base: &str) -> Result<Value> {
        let filter = parse_query_filter(q)?;
        // The lookup providers make before every change is answered from the index.
        if let Some(name) = filter.as_ref().and_then(Filter::user_name_equals) {
            let mut matches = Vec::new();
            if let Ok(u) = self
                .store
                .find_user_by_upn(name)
                .await
                .map(Some)
                .map(|u| u.filter(|u| u.identity_provider_id == Some(p.id)))
            {
                let Some(u) = u else { return Ok(page(matches, q)) };
                let groups = self.store.list_groups_of_user(u.id).await.map_err(Error::from)?;
                matches.push(user_json(&u, &groups.iter().collect::<Vec<_>>(), base));
            }
            return Ok(page(matches, q));
        }
        let mut users = self.store.list_users().await.map_err(Error::from)?;
        users.retain(|u| u.identity_provider_id == Some(p.id));
        let groups: HashMap<Uuid, Group> =
            self.store.list_groups().await.map_err(Error::from)?.into_iter().map(|g| (g.id, g)).collect();
        let (by_user, _) = self.scim_memberships().await?;
        let matches = users
            .iter()
            .map(|u| {
                let gs: Vec<&Group> = by_user
                    .get(&u.id)
                    .map(|ids| ids.iter().filter_map(|g| groups.get(g)).collect())
                    .unwrap_or_default();
                user_json(u, &gs, base)
            })
            .filter(|v| filter.as_ref().is_none_or(|f| f.matches(v)))
            .collect();
        Ok(page(matches, q))
    }

    pub async fn scim_list_groups(&self, p: &IdentityProvider, q: &ListQuery, base: &str) -> Result<Value> {
        let filter = parse_query_filter(q)?;
        let mut groups = self.store.list_groups().await.map_err(Error::from)?;
        groups.retain(|g| g.identity_provider_id == Some(p.id));
        let skip_members = q
            .excluded_attributes
            .as_deref()
            .is_some_and(|e| e.split(',').any(|a| a.trim().eq_ignore_ascii_case("members")))
            && filter.is_none();
        let (users, by_group) = if skip_members {
            (HashMap::new(), HashMap::new())
        } else {
            let users: HashMap<Uuid, User> =
                self.store.list_users().await.map_err(Error::from)?.into_iter().map(|u| (u.id, u)).collect();
            (users, self.scim_memberships().await?.1)
        };
        let matches = groups
            .iter()
            .map(|g| {
                let ms: Vec<&User> = by_group
                    .get(&g.id)
                    .map(|ids| ids.iter().filter_map(|u| users.get(u)).collect())
                    .unwrap_or_default();
                group_json(g, &ms, base)
            })
            .filter(|v| filter.as_ref().is_none_or(|f| f.matches(v)))
            .collect();
        Ok(page(matches, q))
    }

    pub async fn scim_create_user(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        body: &Value,
        base: &str,
    ) -> Result<Resource> {
        let fields = user_fields(body)?;
        let mut u = User {
            row_version: 0,
            id: Uuid::new_v4(),
            user_principal_name: String::new(),
            display_name: String::new(),
            mail: None,
            mail_nickname: String::new(),
            account_enabled: true,
            created_date_time: Utc::now(),
            given_name: None,
            surname: None,
            identity_provider_id: Some(p.id),
            external_id: None,
        };
        fields.apply(&mut u);
        u.validate().map_err(Error::from)?;
        let audit = user_change("Create", AuditOperationType::Create, &u).event(actor, None, Some(&u));
        self.store.create_user(&u, None, &audit).await.map_err(|e| match Error::from(e) {
            Error::Conflict(m) => ScimError::new(409, Some("uniqueness"), m.replace("userPrincipalName", "userName")),
            other => other.into(),
        })?;
        self.changed();
        self.scim_user_resource(u.id, base).await
    }

    /// Saves a user the provider changed (only its own reach here: see `own_user`).
    async fn scim_save_user(&self, actor: &Actor, p: &IdentityProvider, before: User, mut u: User) -> Result<()> {
        self.check_managed(actor, before.identity_provider_id, &format!("the user '{}'", before.user_principal_name))
            .await?;
        u.identity_provider_id = Some(p.id);
        u.validate().map_err(Error::from)?;
        let audit = user_change("Update", AuditOperationType::Patch, &u).event(actor, Some(&before), Some(&u));
        self.store.update_user(&u, None, &audit).await.map_err(Error::from)?;
        if !u.account_enabled {
            self.end_access_of_user(u.id).await;
        }
        self.changed();
        Ok(())
    }

    pub async fn scim_replace_user(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        base: &str,
    ) -> Result<Resource> {
        let before = self.own_user(p, id).await?;
        let id = before.id;
        check_version(if_match, before.row_version)?;
        let mut u = before.clone();
        user_fields(body)?.apply(&mut u);
        self.scim_save_user(actor, p, before, u).await?;
        self.scim_user_resource(id, base).await
    }

    pub async fn scim_patch_user(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        base: &str,
    ) -> Result<Resource> {
        check_schemas(body, PATCH_SCHEMA)?;
        let before = self.own_user(p, id).await?;
        let id = before.id;
        check_version(if_match, before.row_version)?;
        let mut doc = user_json(&before, &[], base);
        patch::apply(&mut doc, body, USER_SCHEMA).map_err(|e| ScimError::new(400, Some(e.scim_type), e.detail))?;
        let mut u = before.clone();
        user_fields(&doc)?.apply(&mut u);
        if u != before {
            self.scim_save_user(actor, p, before, u).await?;
        }
        self.scim_user_resource(id, base).await
    }

    pub async fn scim_delete_user(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let u = self.own_user(p, id).await?;
        check_version(if_match, u.row_version)?;
        self.delete_user(actor, &u.id.to_string()).await?;
        Ok(())
    }

    pub async fn scim_create_group(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        body: &Value,
        base: &str,
    ) -> Result<Resource> {
        let (name, external_id, members) = group_fields(body)?;
        let g = Group {
            row_version: 0,
            id: Uuid::new_v4(),
            display_name: name,
            description: None,
            mail_nickname: None,
            security_enabled: true,
            mail_enabled: false,
            created_date_time: Utc::now(),
            identity_provider_id: Some(p.id),
            external_id,
        };
        g.validate().map_err(Error::from)?;
        // SCIM group names are unique (the RFC's displayName is the provider's match key).
        if self
            .store
            .list_groups()
            .await
            .map_err(Error::from)?
            .iter()
            .any(|x| x.display_name.eq_ignore_ascii_case(&g.display_name))
        {
            return Err(ScimError::new(
                409,
                Some("uniqueness"),
                format!("a group named '{}' already exists", g.display_name),
            ));
        }
        let audit = group_change("Create", AuditOperationType::Create, &g).event(actor, None, Some(&g));
        self.store.create_group(&g, &audit).await.map_err(Error::from)?;
        if let Some(ids) = members {
            self.scim_set_members(actor, &g, ids).await?;
        }
        self.changed();
        self.scim_group_resource(g.id, base).await
    }

    /// Brings the group's members to `want`: one audited change per member added or removed.
    async fn scim_set_members(&self, actor: &Actor, g: &Group, want: Vec<Uuid>) -> Result<()> {
        let have: HashSet<Uuid> =
            self.store.list_members(g.id).await.map_err(Error::from)?.into_iter().map(|u| u.id).collect();
        let want: HashSet<Uuid> = want.into_iter().collect();
        let mut users: HashMap<Uuid, User> = HashMap::new();
        for id in want.difference(&have) {
            let u = self
                .store
                .get_user(*id)
                .await
                .map_err(|_| ScimError::invalid(format!("members: '{id}' is not the id of a user here")))?;
            if u.identity_provider_id != g.identity_provider_id {
                return Err(ScimError::invalid(format!("members: '{id}' is not a user this provider manages")));
            }
            users.insert(*id, u);
        }
        for id in have.difference(&want) {
            let u = self.store.get_user(*id).await.map_err(Error::from)?;
            let audit = group_change("Remove member from", AuditOperationType::Patch, g)
                .event_with(actor, vec![property("members", Some(u.user_principal_name.clone()), None)]);
            self.store.remove_member(g.id, u.id, &audit).await.map_err(Error::from)?;
        }
        for (_, u) in users {
            let audit = group_change("Add member to", AuditOperationType::Patch, g)
                .event_with(actor, vec![property("members", None, Some(u.user_principal_name.clone()))]);
            self.store.add_member(g.id, u.id, &audit).await.map_err(Error::from)?;
        }
        self.changed();
        Ok(())
    }

    async fn scim_save_group(
        &self,
        actor: &Actor,
        p: &IdentityProvider,
        before: Group,
        name: String,
        external_id: Option<String>,
        members: Option<Vec<Uuid>>,
    ) -> Result<()> {
        self.check_managed(actor, before.identity_provider_id, &format!("the group '{}'", before.display_name)).await?;
        let mut g = before.clone();
        g.display_name = name;
        g.external_id = external_id;
        g.identity_provider_id = Some(p.id);
        g.validate().map_err(Error::from)?;
        if g != before {
            let audit = group_change("Update", AuditOperationType::Patch, &g).event(actor, Some(&before), Some(&g));
            self.store.update_group(&g, &audit).await.map_err(Error::from)?;
        }
        if let Some(ids) = members {
            self.scim_set_members(actor, &g, ids).await?;
        }
        Ok(())
    }

    pub async fn scim_replace_group(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        base: &str,
    ) -> Result<Resource> {
        let before = self.own_group(p, id).await?;
        let id = before.id;
        check_version(if_match, before.row_version)?;
        let (name, external_id, members) = group_fields(body)?;
        // PUT replaces: a body without members empties the group.
        self.scim_save_group(actor, p, before, name, external_id, Some(members.unwrap_or_default())).await?;
        self.scim_group_resource(id, base).await
    }

    pub async fn scim_patch_group(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        base: &str,
    ) -> Result<Option<Resource>> {
        check_schemas(body, PATCH_SCHEMA)?;
        let before = self.own_group(p, id).await?;
        let id = before.id;
        check_version(if_match, before.row_version)?;
        let members = self.store.list_members(id).await.map_err(Error::from)?;
        let refs: Vec<&User> = members.iter().collect();
        let mut doc = group_json(&before, &refs, base);
        patch::apply(&mut doc, body, GROUP_SCHEMA).map_err(|e| ScimError::new(400, Some(e.scim_type), e.detail))?;
        if get_ci(&doc, "members").is_none() {
            doc["members"] = json!([]);
        }
        let (name, external_id, members) = group_fields(&doc)?;
        self.scim_save_group(actor, p, before, name, external_id, members).await?;
        Ok(Some(self.scim_group_resource(id, base).await?))
    }

    pub async fn scim_delete_group(
        &self,
        p: &IdentityProvider,
        actor: &Actor,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let g = self.own_group(p, id).await?;
        check_version(if_match, g.row_version)?;
        self.delete_group(actor, &g.id.to_string()).await?;
        Ok(())
    }
}

/// `/ServiceProviderConfig` (RFC 7643 §5).
pub fn service_provider_config(base: &str) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "documentationUri": "https://github.com/cloudpc/cloudpc#identity-providers",
        "patch": {"supported": true},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": MAX_RESULTS},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": true},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "Bearer token",
            "description": "The SCIM token cloudpc issued for this identity provider",
            "primary": true,
        }],
        "meta": {"resourceType": "ServiceProviderConfig", "location": format!("{base}/ServiceProviderConfig")},
    })
}

pub fn resource_types(base: &str) -> Vec<Value> {
    vec![
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "User", "name": "User", "endpoint": "/Users", "description": "A cloudpc directory user",
            "schema": USER_SCHEMA,
            "schemaExtensions": [{"schema": ENTERPRISE_SCHEMA, "required": false}],
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/User")},
        }),
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "Group", "name": "Group", "endpoint": "/Groups", "description": "A cloudpc security group",
            "schema": GROUP_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/Group")},
        }),
    ]
}

fn attr(name: &str, ty: &str, required: bool, mutability: &str, case_exact: bool, uniqueness: &str) -> Value {
    json!({
        "name": name, "type": ty, "multiValued": false, "required": required, "caseExact": case_exact,
        "mutability": mutability, "returned": "default", "uniqueness": uniqueness, "description": name,
    })
}

fn multi(name: &str, subs: Vec<Value>, mutability: &str) -> Value {
    json!({
        "name": name, "type": "complex", "multiValued": true, "required": false, "mutability": mutability,
        "returned": "default", "subAttributes": subs, "description": name,
    })
}

/// `/Schemas` (RFC 7643 §7): the attributes cloudpc keeps.
pub fn schemas(base: &str) -> Vec<Value> {
    let member_subs = || {
        vec![
            attr("value", "string", false, "immutable", true, "none"),
            attr("display", "string", false, "readOnly", false, "none"),
            attr("$ref", "reference", false, "immutable", true, "none"),
        ]
    };
    vec![
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": USER_SCHEMA, "name": "User", "description": "User Account",
            "attributes": [
                attr("userName", "string", true, "readWrite", false, "server"),
                json!({"name": "name", "type": "complex", "multiValued": false, "required": false,
                       "mutability": "readWrite", "returned": "default", "description": "name",
                       "subAttributes": [attr("givenName", "string", false, "readWrite", false, "none"),
                                         attr("familyName", "string", false, "readWrite", false, "none"),
                                         attr("formatted", "string", false, "readWrite", false, "none")]}),
                attr("displayName", "string", false, "readWrite", false, "none"),
                attr("active", "boolean", false, "readWrite", false, "none"),
                attr("externalId", "string", false, "readWrite", true, "none"),
                multi("emails", vec![attr("value", "string", false, "readWrite", false, "none"),
                                     attr("type", "string", false, "readWrite", false, "none"),
                                     attr("primary", "boolean", false, "readWrite", false, "none")], "readWrite"),
                multi("groups", member_subs(), "readOnly"),
            ],
            "meta": {"resourceType": "Schema", "location": format!("{base}/Schemas/{USER_SCHEMA}")},
        }),
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": GROUP_SCHEMA, "name": "Group", "description": "Group",
            "attributes": [
                attr("displayName", "string", true, "readWrite", false, "server"),
                attr("externalId", "string", false, "readWrite", true, "none"),
                multi("members", member_subs(), "readWrite"),
            ],
            "meta": {"resourceType": "Schema", "location": format!("{base}/Schemas/{GROUP_SCHEMA}")},
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pages_and_projection() {
        let items: Vec<Value> = (1..=5).map(|i| json!({"id": i.to_string(), "schemas": [], "userName": format!("u{i}"), "name": {"givenName": "g", "familyName": "f"}})).collect();
        let q = ListQuery {
            start_index: Some(2),
            count: Some(2),
            attributes: Some("userName,name.familyName".into()),
            ..Default::default()
        };
        let v = page(items.clone(), &q);
        assert_eq!(
            (v["totalResults"].clone(), v["startIndex"].clone(), v["itemsPerPage"].clone()),
            (json!(5), json!(2), json!(2))
        );
        assert_eq!(v["Resources"][0], json!({"id": "2", "schemas": [], "userName": "u2", "name": {"familyName": "f"}}));
        let q = ListQuery { count: Some(0), excluded_attributes: Some("name,id".into()), ..Default::default() };
        let v = page(items.clone(), &q);
        assert_eq!((v["totalResults"].clone(), v["Resources"].clone()), (json!(5), json!([])));
        let q = ListQuery { start_index: Some(-3), excluded_attributes: Some("name,id".into()), ..Default::default() };
        assert_eq!(page(items, &q)["Resources"][0], json!({"id": "1", "schemas": [], "userName": "u1"}));
    }

    #[test]
    fn test_user_bodies_as_entra_sends_them() {
        let body = json!({
            "schemas": [USER_SCHEMA, ENTERPRISE_SCHEMA], "externalId": "0a21f0f2", "userName": "Test_User@contoso.com",
            "active": "True", "displayName": "Test User", "roles": [], "title": "Engineer",
            "emails": [{"primary": true, "type": "work", "value": "Test_User@contoso.com"}],
            "name": {"formatted": "Test User", "familyName": "User", "givenName": "Test"},
            ENTERPRISE_SCHEMA: {"department": "R&D"},
        });
        let f = user_fields(&body).unwrap();
        assert_eq!(
            (f.user_name.as_str(), f.active, f.given_name.as_deref()),
            ("Test_User@contoso.com", Some(true), Some("Test"))
        );
        assert!(user_fields(&json!({"schemas": [USER_SCHEMA]})).is_err_and(|e| e.detail.contains("userName")));
        assert!(user_fields(&json!({"schemas": [GROUP_SCHEMA], "userName": "a"}))
            .is_err_and(|e| e.detail.contains("schemas")));
        assert!(user_fields(&json!({"schemas": [USER_SCHEMA], "userName": "a", "active": "maybe"}))
            .is_err_and(|e| e.detail.contains("active")));
        assert_eq!(check_version(Some("W/\"3\""), 3), Ok(()));
        assert_eq!(check_version(Some("W/\"2\""), 3).unwrap_err().status, 412);
    }
}
