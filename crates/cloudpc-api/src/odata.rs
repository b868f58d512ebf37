//! The slice of OData that Graph scripts rely on: `$top`, `$skiptoken` paging with
//! `@odata.nextLink`, `$filter` with `eq` (joined by `and`), `$select`, `$expand`, `$count`.
//!
//! Lists are filtered and paged over their JSON form, after the app layer returns them. That keeps
//! one implementation for every resource. TODO-perf: push filters and paging into the store when
//! directories grow past tens of thousands of entries.

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::error::ApiError;

const DEFAULT_PAGE: usize = 100;
pub(crate) const MAX_PAGE: usize = 999;
/// `$filter` and `$select` are bounded: every term costs work on every item of the collection.
const MAX_OPTION_LEN: usize = 2048;
const MAX_TERMS: usize = 16;

// The one type both the answers and the OpenAPI document use, so the document cannot describe a
// shape the API does not send.
/// A Graph collection: one page of items, with where it came from and how to get the next page.
#[derive(Debug, Serialize, ToSchema)]
pub struct Collection<T> {
    /// Where the collection's type is described (Graph's metadata URL for the entity set).
    #[serde(rename = "@odata.context")]
    pub context: String,
    /// How many items match, over all pages; only with `$count=true`.
    #[serde(rename = "@odata.count", skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// The next page's URL, while more items remain; follow it as it is.
    #[serde(rename = "@odata.nextLink", skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
    /// This page's items.
    pub value: Vec<T>,
}

/// One `field eq value` term of a `$filter`.
#[derive(Debug, Clone, PartialEq)]
pub struct Equals {
    pub path: Vec<String>,
    pub value: Value,
}

/// The query options of one request, checked.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub top: Option<usize>,
    pub skip: usize,
    pub filter: Vec<Equals>,
    pub select: Vec<String>,
    pub expand: Vec<String>,
    pub count: bool,
    raw_filter: Option<String>,
    raw_select: Option<String>,
    raw_expand: Option<String>,
}

/// A Graph request's context: where it came from, so links can point back.
pub struct GraphRequest {
    pub base: String,
    pub path: String,
    pub options: Options,
}

impl<S: Send + Sync> FromRequestParts<S> for GraphRequest {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_string();
        let scheme = parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|h| h.to_str().ok())
            .filter(|s| *s == "https")
            .unwrap_or("http");
        let pairs: Vec<(String, String)> = match parts.uri.query() {
            Some(q) => form_pairs(q)?,
            None => vec![],
        };
        Ok(GraphRequest {
            base: format!("{scheme}://{host}"),
            // Nested routers see a shortened path; links must use the one the client sent.
            path: parts
                .extensions
                .get::<OriginalUri>()
                .map(|u| u.0.path().to_string())
                .unwrap_or_else(|| parts.uri.path().to_string()),
            options: Options::parse(&pairs)?,
        })
    }
}

pub(crate) fn form_pairs(q: &str) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |s: &str| -> Result<String, ApiError> {
        let s = s.replace('+', " ");
        percent_decode(&s).ok_or_else(|| ApiError::bad_request("The query string is not valid percent-encoding."))
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Percent-decoding of a query component; hand-written because it is ten lines and axum's own
/// `Query` extractor would turn errors into plain text instead of Graph errors.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Options {
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let mut o = Options::default();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in pairs {
            if k.starts_with('$') && !seen.insert(k.as_str()) {
                return Err(ApiError::bad_request(format!("Query option '{k}' is given more than once.")));
            }
            match k.as_str() {
                "$top" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| ApiError::bad_request(format!("$top must be a whole number, not '{v}'.")))?;
                    if n == 0 || n > MAX_PAGE {
                        return Err(ApiError::bad_request(format!("$top must be between 1 and {MAX_PAGE}.")));
                    }
                    o.top = Some(n);
                }
                "$skiptoken" => {
                    // A whole number from 0 to i64::MAX, as the OpenAPI document says.
                    o.skip = v
                        .parse::<i64>()
                        .ok()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| ApiError::bad_request("$skiptoken is not one that this server issued."))?;
                }
                "$filter" => {
                    if v.len() > MAX_OPTION_LEN {
                        return Err(ApiError::bad_request(format!(
                            "$filter is {} characters long; at most {MAX_OPTION_LEN} are accepted.",
                            v.len()
                        )));
                    }
                    o.filter = parse_filter(v)?;
                    if o.filter.len() > MAX_TERMS {
                        return Err(ApiError::bad_request(format!(
                            "$filter has {} terms; at most {MAX_TERMS} are accepted.",
                            o.filter.len()
                        )));
                    }
                    o.raw_filter = Some(v.clone());
                }
                "$select" => {
                    if v.len() > MAX_OPTION_LEN {
                        return Err(ApiError::bad_request(format!(
                            "$select is {} characters long; at most {MAX_OPTION_LEN} are accepted.",
                            v.len()
                        )));
                    }
                    o.select = split_list(v);
                    if o.select.len() > MAX_TERMS {
                        return Err(ApiError::bad_request(format!(
                            "$select names {} properties; at most {MAX_TERMS} are accepted.",
                            o.select.len()
                        )));
                    }
                    o.raw_select = Some(v.clone());
                }
                "$expand" => {
                    // Taken exactly (no blanks, no spaces): each name is checked by `expand_only`.
                    o.expand = v.split(',').map(str::to_string).collect();
                    o.raw_expand = Some(v.clone());
                }
                "$count" => {
                    o.count = match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(ApiError::bad_request(format!("$count must be true or false, not '{v}'."))),
                    }
                }
                k if k.starts_with('$') => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!(
                            "Query option '{k}' is not supported; use $top, $filter (eq), $select, $expand or $count."
                        ),
                    ))
                }
                _ => {}
            }
        }
        Ok(o)
    }

    /// Refuses `$expand` values a resource does not offer (an empty one included).
    pub fn expand_only(&self, allowed: &[&str]) -> Result<bool, ApiError> {
        for e in &self.expand {
            if !allowed.contains(&e.as_str()) {
                return Err(ApiError::bad_request(format!("$expand '{e}' is not supported here.")));
            }
        }
        Ok(!self.expand.is_empty())
    }
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// Parses `a eq 'x' and b/c eq true`.
pub fn parse_filter(src: &str) -> Result<Vec<Equals>, ApiError> {
    let bad = |why: &str| {
        ApiError::bad_request(format!(
            "Invalid $filter '{src}': {why}. Only 'property eq value' joined by 'and' is supported."
        ))
    };
    let tokens = tokenize(src).ok_or_else(|| bad("a quoted string is not closed"))?;
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let (Some(field), Some(op), Some(lit)) = (tokens.get(i), tokens.get(i + 1), tokens.get(i + 2)) else {
            return Err(bad("expected 'property eq value'"));
        };
        if !op.eq_ignore_ascii_case("eq") {
            return Err(bad(&format!("operator '{op}' is not supported")));
        }
        let valid_path = field
            .split('/')
            .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '@' || c == '.'));
        if !valid_path {
            return Err(bad(&format!("'{field}' is not a property name")));
        }
        out.push(Equals {
            path: field.split('/').map(str::to_string).collect(),
            value: literal(lit).ok_or_else(|| bad(&format!("'{lit}' is not a value")))?,
        });
        i += 3;
        match tokens.get(i) {
            None => return Ok(out),
            Some(t) if t.eq_ignore_ascii_case("and") => i += 1,
            Some(t) => return Err(bad(&format!("unexpected '{t}'"))),
        }
    }
}

fn tokenize(src: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '\'' {
            chars.next();
            let mut s = String::from("'");
            loop {
                match chars.next()? {
                    '\'' if chars.peek() == Some(&'\'') => {
                        chars.next();
                        s.push('\'');
                    }
                    '\'' => break,
                    ch => s.push(ch),
                }
            }
            out.push(s);
        } else {
            let mut s = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                s.push(ch);
                chars.next();
            }
            out.push(s);
        }
    }
    Some(out)
}

fn literal(tok: &str) -> Option<Value> {
    if let Some(s) = tok.strip_prefix('\'') {
        return Some(Value::String(s.to_string()));
    }
    match tok {
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        "null" => Some(Value::Null),
        _ => {
            if let Ok(n) = tok.parse::<i64>() {
                Some(Value::from(n))
            } else if uuid::Uuid::parse_str(tok).is_ok() {
                Some(Value::String(tok.to_string()))
            } else {
                None
            }
        }
    }
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn matches(item: &Value, term: &Equals) -> Result<bool, ApiError> {
    let Some(found) = lookup(item, &term.path) else {
        return Err(ApiError::bad_request(format!(
            "Invalid $filter: this resource has no property '{}'.",
            term.path.join("/")
        )));
    };
    Ok(match (found, &term.value) {
        (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
        (a, b) => a == b,
    })
}

fn select(item: Value, fields: &[String]) -> Value {
    if fields.is_empty() {
        return item;
    }
    match item {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(k, _)| k == "id" || fields.iter().any(|f| f == k)).collect())
        }
        other => other,
    }
}

fn to_json<T: Serialize>(item: T) -> Result<Value, ApiError> {
    serde_json::to_value(item)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", e.to_string()))
}

impl GraphRequest {
    fn context(&self, fragment: &str) -> String {
        format!("{}/v1.0/$metadata#{fragment}", self.base)
    }

    /// A Graph collection: filtered, paged, with `@odata.nextLink` when more remain.
    pub fn page<T: Serialize>(&self, set: &str, items: Vec<T>) -> Result<Response, ApiError> {
        let o = &self.options;
        let mut values = Vec::with_capacity(items.len());
        for item in items {
            let v = to_json(item)?;
            let mut keep = true;
            for term in &o.filter {
                keep &= matches(&v, term)?;
            }
            if keep {
                values.push(v);
            }
        }
        let total = values.len();
        let page: Vec<Value> = values.into_iter().skip(o.skip).take(self.page_size()).collect();
        self.collection_page(set, page, total)
    }

    /// The `$filter` terms for the store, after checking that each names a property of `T`
    /// (an unknown one is refused, as it is where lists are filtered in memory).
    pub fn store_filter<T: utoipa::PartialSchema>(&self) -> Result<Vec<cloudpc_control::FieldEquals>, ApiError> {
        let schema = T::schema();
        let properties: Vec<String> = match &schema {
            utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(o)) => o.properties.keys().cloned().collect(),
            _ => Vec::new(),
        };
        self.options
            .filter
            .iter()
            .map(|t| {
                let first = t.path.first().map(String::as_str).unwrap_or_default();
                if !properties.iter().any(|p| p == first) {
                    return Err(ApiError::bad_request(format!(
                        "Invalid $filter: this resource has no property '{}'.",
                        t.path.join("/")
                    )));
                }
                Ok(cloudpc_control::FieldEquals { path: t.path.clone(), value: t.value.clone() })
            })
            .collect()
    }

    /// A collection the store filters and pages (`Listing`): this request's page of it.
    pub async fn stored_page<T: utoipa::PartialSchema>(
        &self,
        app: &cloudpc_control::App,
        set: &str,
        listing: cloudpc_control::Listing,
    ) -> Result<Response, ApiError> {
        let filter = self.store_filter::<T>()?;
        let (items, total) = app.list_page(listing, &filter, self.options.skip, self.page_size()).await?;
        self.collection_page(set, items, total)
    }

    /// The page size this request asks for.
    pub fn page_size(&self) -> usize {
        self.options.top.unwrap_or(DEFAULT_PAGE)
    }

    /// A Graph collection whose filtering and paging are done: `items` is this page already,
    /// `total` how many match over all pages (the store pages some collections itself).
    pub fn collection_page<T: Serialize>(&self, set: &str, items: Vec<T>, total: usize) -> Result<Response, ApiError> {
        let o = &self.options;
        let size = self.page_size();
        let page = items.into_iter().map(|i| to_json(i).map(|v| select(v, &o.select))).collect::<Result<_, _>>()?;
        // A $skiptoken near the top of usize must not overflow into a panic.
        let next = o.skip.saturating_add(size);
        let body = Collection {
            context: self.context(set),
            count: o.count.then_some(total),
            next_link: (next < total).then(|| self.next_link(size, next)),
            value: page,
        };
        Ok(Json(body).into_response())
    }

    fn next_link(&self, size: usize, skip: usize) -> String {
        let enc = |s: &str| {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        let mut link = format!("{}{}?$top={size}&$skiptoken={skip}", self.base, self.path);
        for (k, v) in [
            ("$filter", &self.options.raw_filter),
            ("$select", &self.options.raw_select),
            ("$expand", &self.options.raw_expand),
        ] {
            if let Some(v) = v {
                link.push_str(&format!("&{k}={}", enc(v)));
            }
        }
        if self.options.count {
            link.push_str("&$count=true");
        }
        link
    }

    /// One Graph entity with its `@odata.context`.
    pub fn entity<T: Serialize>(&self, set: &str, item: &T, status: StatusCode) -> Result<Response, ApiError> {
        let v = to_json(item)?;
        let mut body = Map::new();
        body.insert("@odata.context".into(), Value::String(self.context(&format!("{set}/$entity"))));
        if let Value::Object(map) = select(v, &self.options.select) {
            body.extend(map);
        }
        Ok((status, Json(Value::Object(body))).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_parse_filter_and_terms() {
        let f = parse_filter("displayName eq 'O''Brien' and accountEnabled eq true").unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].value, json!("O'Brien"));
        assert_eq!(f[1].value, json!(true));
    }

    #[test]
    fn test_filter_and_select_are_bounded() {
        let pairs = |k: &str, v: String| vec![(k.to_string(), v)];
        let many = (0..17).map(|i| format!("a{i} eq 'x'")).collect::<Vec<_>>().join(" and ");
        let err = Options::parse(&pairs("$filter", many)).unwrap_err();
        assert!(format!("{err:?}").contains("at most 16"), "{err:?}");
        let long = format!("a eq '{}'", "x".repeat(5000));
        assert!(format!("{:?}", Options::parse(&pairs("$filter", long)).unwrap_err()).contains("at most 2048"));
        let select = (0..40).map(|i| format!("p{i}")).collect::<Vec<_>>().join(",");
        assert!(format!("{:?}", Options::parse(&pairs("$select", select)).unwrap_err()).contains("at most 16"));
        assert!(Options::parse(&pairs("$filter", "a eq 'x' and b eq 2".into())).is_ok());
    }

    #[test]
    fn test_parse_filter_unsupported_refused() {
        for bad in ["displayName ne 'x'", "displayName eq", "a eq 'x' or b eq 'y'", "a eq 'open", "startswith(a,'x')"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_matches_nested_path_case_insensitive() {
        let item = json!({"target": {"groupId": "ABC"}});
        let term = parse_filter("target/groupId eq 'abc'").unwrap().remove(0);
        assert!(matches(&item, &term).unwrap());
        let missing = parse_filter("nope eq 'abc'").unwrap().remove(0);
        assert!(matches(&item, &missing).is_err());
    }

    #[test]
    fn test_options_outside_their_documented_range_refused() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        for bad in [
            vec![("$count", "yes")],
            vec![("$skiptoken", "-1")],
            vec![("$skiptoken", "9223372036854775808")],
            vec![("$top", "0")],
            vec![("$top", "1000")],
            vec![("$top", "5"), ("$top", "6")],
        ] {
            assert!(Options::parse(&pairs(&bad)).is_err(), "{bad:?}");
        }
        let o = Options::parse(&pairs(&[("$count", "false"), ("$skiptoken", "9223372036854775807"), ("top", "x")]))
            .unwrap();
        assert!(!o.count);
        assert_eq!(o.skip, 9223372036854775807);
    }

    #[test]
    fn test_percent_decode_rejects_bad_escape() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
