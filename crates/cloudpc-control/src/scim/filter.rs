//! SCIM filters (RFC 7644 §3.4.2.2) and attribute paths (§3.5.2), parsed and evaluated against
//! a resource's JSON.
//!
//! Written by hand rather than with the `scim-filter` crate: SCIM attribute names are
//! case-insensitive and string comparisons follow each attribute's `caseExact`, and the same
//! grammar must also parse PATCH paths such as `members[value eq "…"]` and
//! `emails[type eq "work"].value`; the crate evaluates filters only, case-sensitively.

use serde_json::Value;

/// What went wrong in a filter or path, with the position it went wrong at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError(pub String);

type Result<T> = std::result::Result<T, FilterError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Ge,
    Lt,
    Le,
}

/// `attr` or `attr.sub`, with a schema URN prefix removed.
#[derive(Debug, Clone, PartialEq)]
pub struct AttrPath {
    /// The schema URN the path was qualified with, if any (lower case).
    pub urn: Option<String>,
    pub attr: String,
    pub sub: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Compare(AttrPath, CmpOp, Value),
    Present(AttrPath),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    /// `emails[type eq "work"]`: some element of the multi-valued attribute matches.
    ValuePath(AttrPath, Box<Filter>),
}

/// A PATCH path: `attr`, `attr.sub`, `attr[filter]` or `attr[filter].sub`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchPath {
    pub attr: AttrPath,
    pub filter: Option<Filter>,
    pub sub: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    LParen,
    RParen,
    LBracket,
    RBracket,
}

const MAX_LEN: usize = 4096;
const MAX_DEPTH: usize = 32;

fn lex(s: &str) -> Result<Vec<(usize, Tok)>> {
    if s.len() > MAX_LEN {
        return Err(FilterError(format!("is longer than {MAX_LEN} characters")));
    }
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((i, Tok::LParen));
                i += 1
            }
            b')' => {
                out.push((i, Tok::RParen));
                i += 1
            }
            b'[' => {
                out.push((i, Tok::LBracket));
                i += 1
            }
            b']' => {
                out.push((i, Tok::RBracket));
                i += 1
            }
            b'"' => {
                // A JSON string: find its end honouring escapes, then let serde_json decode it.
                let start = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                if i >= b.len() {
                    return Err(FilterError(format!("the string starting at position {start} is not closed")));
                }
                i += 1;
                let v: String = serde_json::from_str(&s[start..i])
                    .map_err(|_| FilterError(format!("the string at position {start} is not a valid JSON string")))?;
                out.push((start, Tok::Str(v)));
            }
            _ => {
                let start = i;
                while i < b.len() && !b" \t\n\r()[]\"".contains(&b[i]) {
                    i += 1;
                }
                out.push((start, Tok::Word(s[start..i].to_string())));
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    depth: usize,
}

fn op_of(w: &str) -> Option<CmpOp> {
    Some(match w.to_ascii_lowercase().as_str() {
        "eq" => CmpOp::Eq,
        "ne" => CmpOp::Ne,
        "co" => CmpOp::Co,
        "sw" => CmpOp::Sw,
        "ew" => CmpOp::Ew,
        "gt" => CmpOp::Gt,
        "ge" => CmpOp::Ge,
        "lt" => CmpOp::Lt,
        "le" => CmpOp::Le,
        _ => return None,
    })
}

/// Splits `urn:…:User:name.givenName` into its URN and `name.givenName`.
fn attr_path(word: &str) -> Result<AttrPath> {
    let (urn, rest) = if word.to_ascii_lowercase().starts_with("urn:") {
        let cut = word.rfind(':').unwrap_or(0);
        (Some(word[..cut].to_ascii_lowercase()), &word[cut + 1..])
    } else {
        (None, word)
    };
    let mut parts = rest.splitn(2, '.');
    let attr = parts.next().unwrap_or_default().to_string();
    let sub = parts.next().map(str::to_string);
    let ok =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '$');
    if !ok(&attr) || sub.as_deref().is_some_and(|s| !ok(s)) {
        return Err(FilterError(format!("'{word}' is not an attribute name")));
    }
    Ok(AttrPath { urn, attr, sub })
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.1)
    }

    fn at(&self) -> String {
        match self.toks.get(self.pos) {
            Some((p, _)) => format!("at position {p}"),
            None => "at the end".into(),
        }
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|t| t.1.clone());
        self.pos += 1;
        t
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(k))
    }

    fn or(&mut self) -> Result<Filter> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.pos += 1;
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            self.pos += 1;
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(FilterError(format!("nests deeper than {MAX_DEPTH} levels")));
        }
        let f = if self.keyword("not") {
            self.pos += 1;
            let at = self.at();
            if self.next() != Some(Tok::LParen) {
                return Err(FilterError(format!("'not' must be followed by '(' ({at})")));
            }
            let inner = self.or()?;
            self.close(Tok::RParen, "')'")?;
            Filter::Not(Box::new(inner))
        } else if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let inner = self.or()?;
            self.close(Tok::RParen, "')'")?;
            inner
        } else {
            self.comparison()?
        };
        self.depth -= 1;
        Ok(f)
    }

    fn close(&mut self, want: Tok, name: &str) -> Result<()> {
        let at = self.at();
        if self.next() != Some(want) {
            return Err(FilterError(format!("expected {name} {at}")));
        }
        Ok(())
    }

    fn comparison(&mut self) -> Result<Filter> {
        let at = self.at();
        let Some(Tok::Word(word)) = self.next() else {
            return Err(FilterError(format!("expected an attribute name {at}")));
        };
        let path = attr_path(&word)?;
        if self.peek() == Some(&Tok::LBracket) {
            self.pos += 1;
            let inner = self.or()?;
            self.close(Tok::RBracket, "']'")?;
            return Ok(Filter::ValuePath(path, Box::new(inner)));
        }
        let at = self.at();
        let Some(Tok::Word(op)) = self.next() else {
            return Err(FilterError(format!("expected an operator after '{word}' {at}")));
        };
        if op.eq_ignore_ascii_case("pr") {
            return Ok(Filter::Present(path));
        }
        let op = op_of(&op).ok_or_else(|| FilterError(format!("'{op}' is not an operator {at}")))?;
        let at = self.at();
        let value = match self.next() {
            Some(Tok::Str(s)) => Value::String(s),
            Some(Tok::Word(w)) => match w.to_ascii_lowercase().as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                "null" => Value::Null,
                _ => serde_json::from_str::<serde_json::Number>(&w)
                    .map(Value::Number)
                    .map_err(|_| FilterError(format!("'{w}' is not a value (strings are quoted) {at}")))?,
            },
            _ => return Err(FilterError(format!("expected a value {at}"))),
        };
        Ok(Filter::Compare(path, op, value))
    }

    fn done(&self) -> Result<()> {
        if self.pos < self.toks.len() {
            return Err(FilterError(format!("unexpected text {}", self.at())));
        }
        Ok(())
    }
}

pub fn parse_filter(s: &str) -> Result<Filter> {
    let mut p = Parser { toks: lex(s)?, pos: 0, depth: 0 };
    if p.toks.is_empty() {
        return Err(FilterError("is empty".into()));
    }
    let f = p.or()?;
    p.done()?;
    Ok(f)
}

pub fn parse_patch_path(s: &str) -> Result<PatchPath> {
    let s = s.trim();
    let (head, filter, tail) = match s.find('[') {
        Some(open) => {
            let close = s.rfind(']').ok_or_else(|| FilterError("has '[' without ']'".into()))?;
            if close < open {
                return Err(FilterError("has ']' before '['".into()));
            }
            let inner = parse_filter(&s[open + 1..close])?;
            (&s[..open], Some(inner), &s[close + 1..])
        }
        None => (s, None, ""),
    };
    let attr = attr_path(head)?;
    let sub = match tail.strip_prefix('.') {
        Some(t) => {
            if attr.sub.is_some() {
                return Err(FilterError(format!("'{s}' names a sub-attribute twice")));
            }
            Some(attr_path(t)?.attr)
        }
        None if tail.is_empty() => None,
        None => return Err(FilterError(format!("unexpected text after ']' in '{s}'"))),
    };
    if filter.is_some() && attr.sub.is_some() {
        return Err(FilterError(format!("'{s}' filters a sub-attribute")));
    }
    Ok(PatchPath { attr, filter, sub })
}

/// The member of a JSON object whose name matches `key` in any case.
pub fn get_ci<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    obj.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v)
}

/// Attributes whose values are ids or the provider's keys: compared exactly.
fn case_exact(attr: &str, sub: Option<&str>) -> bool {
    let name = sub.unwrap_or(attr);
    ["id", "externalid", "value", "$ref"].contains(&name.to_ascii_lowercase().as_str())
        && !(attr.eq_ignore_ascii_case("emails") && sub.is_some_and(|s| s.eq_ignore_ascii_case("value")))
}

fn values_at<'a>(resource: &'a Value, path: &AttrPath) -> Vec<&'a Value> {
    let Some(top) = get_ci(resource, &path.attr) else { return Vec::new() };
    let items: Vec<&Value> = match top {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    match &path.sub {
        Some(sub) => items.into_iter().filter_map(|v| get_ci(v, sub)).collect(),
        // A complex multi-valued attribute compares by its `value`.
        None => items.into_iter().map(|v| if v.is_object() { get_ci(v, "value").unwrap_or(v) } else { v }).collect(),
    }
}

fn compare(have: &Value, op: CmpOp, want: &Value, exact: bool) -> bool {
    use std::cmp::Ordering;
    let norm = |s: &str| if exact { s.to_string() } else { s.to_lowercase() };
    match (have, want) {
        (Value::String(h), Value::String(w)) => {
            let (h, w) = (norm(h), norm(w));
            match op {
                CmpOp::Eq => h == w,
                CmpOp::Ne => h != w,
                CmpOp::Co => h.contains(&w),
                CmpOp::Sw => h.starts_with(&w),
                CmpOp::Ew => h.ends_with(&w),
                CmpOp::Gt => h > w,
                CmpOp::Ge => h >= w,
                CmpOp::Lt => h < w,
                CmpOp::Le => h <= w,
            }
        }
        (Value::Number(h), Value::Number(w)) => {
            let o = h.as_f64().unwrap_or_default().partial_cmp(&w.as_f64().unwrap_or_default());
            match op {
                CmpOp::Eq => o == Some(Ordering::Equal),
                CmpOp::Ne => o != Some(Ordering::Equal),
                CmpOp::Gt => o == Some(Ordering::Greater),
                CmpOp::Ge => matches!(o, Some(Ordering::Greater | Ordering::Equal)),
                CmpOp::Lt => o == Some(Ordering::Less),
                CmpOp::Le => matches!(o, Some(Ordering::Less | Ordering::Equal)),
                _ => false,
            }
        }
        (Value::Bool(h), Value::Bool(w)) => match op {
            CmpOp::Eq => h == w,
            CmpOp::Ne => h != w,
            _ => false,
        },
        (_, Value::Null) => op == CmpOp::Ne,
        _ => op == CmpOp::Ne,
    }
}

fn present(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

impl Filter {
    pub fn matches(&self, resource: &Value) -> bool {
        match self {
            Filter::Compare(path, op, want) => {
                let have = values_at(resource, path);
                let exact = case_exact(&path.attr, path.sub.as_deref());
                if have.is_empty() {
                    // An absent attribute equals null and differs from everything else.
                    return match op {
                        CmpOp::Eq => want.is_null(),
                        CmpOp::Ne => !want.is_null(),
                        _ => false,
                    };
                }
                if *op == CmpOp::Ne {
                    return have.iter().all(|h| compare(h, CmpOp::Ne, want, exact));
                }
                have.iter().any(|h| compare(h, *op, want, exact))
            }
            Filter::Present(path) => values_at(resource, path).into_iter().any(present),
            Filter::And(a, b) => a.matches(resource) && b.matches(resource),
            Filter::Or(a, b) => a.matches(resource) || b.matches(resource),
            Filter::Not(f) => !f.matches(resource),
            Filter::ValuePath(path, f) => match get_ci(resource, &path.attr) {
                Some(Value::Array(items)) => items.iter().any(|i| f.matches(i)),
                Some(v) => f.matches(v),
                None => false,
            },
        }
    }

    /// `userName eq "x"`: the one filter providers send on every sync, answered by an index.
    pub fn user_name_equals(&self) -> Option<&str> {
        match self {
            Filter::Compare(p, CmpOp::Eq, Value::String(s))
                if p.attr.eq_ignore_ascii_case("userName") && p.sub.is_none() =>
            {
                Some(s)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user() -> Value {
        json!({
            "id": "2819c223", "userName": "Bjensen@example.com", "externalId": "ABC",
            "name": {"familyName": "Jensen", "givenName": "Barbara"},
            "active": true,
            "emails": [{"value": "bjensen@example.com", "type": "work", "primary": true},
                       {"value": "babs@jensen.org", "type": "home"}],
            "meta": {"lastModified": "2011-05-13T04:42:34Z"}
        })
    }

    fn m(f: &str) -> bool {
        parse_filter(f).unwrap_or_else(|e| panic!("{f}: {e:?}")).matches(&user())
    }

    /// The examples of RFC 7644 §3.4.2.2, against the RFC's own Babs Jensen.
    #[test]
    fn test_rfc_filter_examples() {
        assert!(m(r#"userName Eq "bjensen@example.com""#));
        assert!(m(r#"name.familyName co "ens""#));
        assert!(m(r#"userName sw "B""#));
        assert!(m(r#"userName ew "example.com""#));
        assert!(!m("title pr"));
        assert!(m("emails pr"));
        assert!(m(r#"meta.lastModified gt "2011-05-13T04:42:33Z""#));
        assert!(m(r#"meta.lastModified ge "2011-05-13T04:42:34Z""#));
        assert!(!m(r#"meta.lastModified lt "2011-05-13T04:42:34Z""#));
        assert!(m(r#"meta.lastModified le "2011-05-13T04:42:34Z""#));
        assert!(!m(r#"title pr or userType eq "Employee""#));
        assert!(m(r#"userName pr and not (emails co "example.org")"#));
        assert!(m(r#"emails[type eq "work" and value co "@example.com"]"#));
        assert!(!m(r#"emails[type eq "home" and value co "@example.com"]"#));
        assert!(m(r#"emails co "jensen.org""#));
        assert!(m(r#"active eq true and (externalId eq "ABC" or userName eq "nobody")"#));
        assert!(!m(r#"externalId eq "abc""#), "externalId is case-exact");
        assert!(m(r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "bj""#));
        assert!(m(r#"not (active eq false)"#));
        assert!(m(r#"nickName ne "x""#));
        assert!(m(r#"userName ne "x" and userName ne "y""#));
    }

    #[test]
    fn test_bad_filters_name_the_problem() {
        for (f, says) in [
            (r#"userName eq"#, "expected a value"),
            (r#"userName eq bob"#, "is not a value"),
            (r#"userName zz "x""#, "is not an operator"),
            (r#"(userName eq "x""#, "expected ')'"),
            (r#"userName eq "x" extra"#, "unexpected text"),
            (r#"userName eq "x"#, "not closed"),
            ("", "is empty"),
            (r#"not userName eq "x""#, "must be followed by '('"),
        ] {
            let e = parse_filter(f).expect_err(f);
            assert!(e.0.contains(says), "{f}: {e:?}");
        }
        let deep = format!("{}userName pr{}", "(".repeat(40), ")".repeat(40));
        assert!(parse_filter(&deep).unwrap_err().0.contains("nests deeper"));
    }

    #[test]
    fn test_patch_paths() {
        let p = parse_patch_path(r#"members[value eq "2819c223-7f76-453a-919d-413861904646"]"#).unwrap();
        assert_eq!(p.attr.attr, "members");
        assert!(p.filter.is_some() && p.sub.is_none());
        let p = parse_patch_path(r#"emails[type eq "work"].value"#).unwrap();
        assert_eq!(p.sub.as_deref(), Some("value"));
        let p = parse_patch_path("name.givenName").unwrap();
        assert_eq!((p.attr.attr.as_str(), p.attr.sub.as_deref()), ("name", Some("givenName")));
        let p = parse_patch_path("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department").unwrap();
        assert_eq!(p.attr.urn.as_deref(), Some("urn:ietf:params:scim:schemas:extension:enterprise:2.0:user"));
        assert!(parse_patch_path("members[value eq").is_err());
        assert!(parse_patch_path("bad name").is_err());
    }
}
