//! SCIM PATCH (RFC 7644 §3.5.2) applied to a resource's JSON.
//!
//! The patch edits the resource's SCIM representation; the result is then read back through the
//! same parser as a PUT, so one set of rules checks both. Operation names are matched in any
//! case (Entra ID sends `"Add"`, `"Replace"`), and attribute names too, as SCIM says.

use serde_json::{Map, Value};

use super::filter::{get_ci, parse_patch_path, Filter, PatchPath};

/// Why a patch cannot apply; `scim_type` is the RFC's `scimType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchError {
    pub scim_type: &'static str,
    pub detail: String,
}

fn err(scim_type: &'static str, detail: impl Into<String>) -> PatchError {
    PatchError { scim_type, detail: detail.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Replace,
}

/// The most operations one PATCH may carry.
pub const MAX_OPERATIONS: usize = 1000;
/// The most bytes of values one PATCH may write: a filtered path copies its value into every
/// element it matches, so a 1 MiB body could otherwise grow into gigabytes.
pub const MAX_WRITTEN: usize = 4 << 20;

/// The key of `obj` that matches `name` in any case, or `name` itself for a new member.
fn key_ci(obj: &Map<String, Value>, name: &str) -> String {
    obj.keys().find(|k| k.eq_ignore_ascii_case(name)).cloned().unwrap_or_else(|| name.to_string())
}

/// Applies a PatchOp body to `doc` (a resource's JSON object). `core_urn` is the resource's own
/// schema; paths qualified with another schema (extensions) are left alone.
pub fn apply(doc: &mut Value, body: &Value, core_urn: &str) -> Result<(), PatchError> {
    let ops = get_ci(body, "Operations")
        .and_then(Value::as_array)
        .ok_or_else(|| err("invalidSyntax", "the body must have an 'Operations' array"))?;
    if ops.len() > MAX_OPERATIONS {
        return Err(err("tooMany", format!("a PATCH may carry at most {MAX_OPERATIONS} operations")));
    }
    let mut budget = MAX_WRITTEN;
    for (i, o) in ops.iter().enumerate() {
        let op = match get_ci(o, "op").and_then(Value::as_str).map(str::to_ascii_lowercase).as_deref() {
            Some("add") => Op::Add,
            Some("remove") => Op::Remove,
            Some("replace") => Op::Replace,
            other => {
                return Err(err(
                    "invalidSyntax",
                    format!("operation {i}: 'op' must be add, remove or replace, not {other:?}"),
                ))
            }
        };
        let value = get_ci(o, "value").cloned();
        let path = match get_ci(o, "path") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if p.trim().is_empty() => None,
            Some(Value::String(p)) => {
                Some(parse_patch_path(p).map_err(|e| err("invalidPath", format!("operation {i}: the path {}", e.0)))?)
            }
            Some(_) => return Err(err("invalidPath", format!("operation {i}: 'path' must be a string"))),
        };
        let obj = doc.as_object_mut().ok_or_else(|| err("invalidSyntax", "the resource is not an object"))?;
        match path {
            None => {
                if op == Op::Remove {
                    return Err(err("noTarget", format!("operation {i}: remove needs a path")));
                }
                let Some(Value::Object(fields)) = value else {
                    return Err(err(
                        "invalidValue",
                        format!("operation {i}: without a path, 'value' must be an object"),
                    ));
                };
                for (k, v) in fields {
                    // `{"urn:…:User": {…}}` or extension objects: only the core schema's members.
                    if k.to_ascii_lowercase().starts_with("urn:") {
                        if k.eq_ignore_ascii_case(core_urn) {
                            if let Value::Object(inner) = v {
                                for (k2, v2) in inner {
                                    set(obj, op, &k2, v2);
                                }
                            }
                        }
                        continue;
                    }
                    // Entra sends dotted names (`name.givenName`) as keys of a path-less value.
                    match parse_patch_path(&k) {
                        Ok(p) if p.attr.sub.is_some() || p.filter.is_some() => {
                            at_path(obj, op, &p, Some(v), i, &mut budget)?
                        }
                        _ => set(obj, op, &k, v),
                    }
                }
            }
            Some(p) => {
                if p.attr.urn.as_deref().is_some_and(|u| !u.eq_ignore_ascii_case(core_urn)) {
                    continue;
                }
                if op != Op::Remove && value.is_none() {
                    return Err(err("invalidValue", format!("operation {i}: {op:?} needs a 'value'")));
                }
                at_path(obj, op, &p, value, i, &mut budget)?;
            }
        }
    }
    Ok(())
}

/// Add or replace one top-level attribute: add appends to multi-valued ones and merges objects.
fn set(obj: &mut Map<String, Value>, op: Op, name: &str, v: Value) {
    let key = key_ci(obj, name);
    match (op, obj.get_mut(&key), v) {
        (Op::Add, Some(Value::Array(have)), Value::Array(new)) => {
            for x in new {
                if !have.iter().any(|h| same_item(h, &x)) {
                    have.push(x);
                }
            }
        }
        (_, Some(Value::Object(have)), Value::Object(new)) if op == Op::Add || !new.is_empty() => {
            for (k, x) in new {
                let k = key_ci(have, &k);
                have.insert(k, x);
            }
        }
        (_, _, v) => {
            obj.insert(key, v);
        }
    }
}

/// Two elements of a multi-valued attribute are the same when their `value` is (members, emails).
fn same_item(a: &Value, b: &Value) -> bool {
    match (get_ci(a, "value"), get_ci(b, "value")) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn at_path(
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
            err(
                "tooMany",
                format!("operation {i}: the PATCH would write more than {} MiB of values", MAX_WRITTEN >> 20),
            )
        })?;
        Ok(())
    };
    let key = key_ci(obj, &p.attr.attr);
    match (&p.filter, p.attr.sub.as_deref().or(p.sub.as_deref())) {
        // `attr`
        (None, None) => match op {
            Op::Remove => match (obj.get_mut(&key), value) {
                // Entra removes members by value: `{"path": "members", "value": [{"value": id}]}`.
                (Some(Value::Array(have)), Some(Value::Array(gone))) => {
                    have.retain(|h| !gone.iter().any(|g| same_item(h, g)));
                }
                _ => {
                    obj.remove(&key);
                }
            },
            _ => set(obj, op, &p.attr.attr, value.unwrap_or(Value::Null)),
        },
        // `attr.sub`
        (None, Some(sub)) => {
            let entry = obj.entry(key).or_insert_with(|| Value::Object(Map::new()));
            let Some(inner) = entry.as_object_mut() else {
                return Err(err("invalidPath", format!("operation {i}: '{}' has no sub-attributes", p.attr.attr)));
            };
            let k = key_ci(inner, sub);
            match op {
                Op::Remove => {
                    inner.remove(&k);
                }
                _ => {
                    inner.insert(k, value.unwrap_or(Value::Null));
                }
            }
        }
        // `attr[filter]` or `attr[filter].sub`
        (Some(filter), sub) => {
            let items = obj.entry(key).or_insert_with(|| Value::Array(Vec::new()));
            let Some(items) = items.as_array_mut() else {
                return Err(err("invalidPath", format!("operation {i}: '{}' is not multi-valued", p.attr.attr)));
            };
            let hits = items.iter().filter(|x| filter.matches(x)).count();
            if op != Op::Remove {
                spend(hits.max(1))?;
            }
            match (op, sub) {
                (Op::Remove, None) => items.retain(|x| !filter.matches(x)),
                (Op::Remove, Some(sub)) => {
                    for x in items.iter_mut().filter(|x| filter.matches(x)) {
                        if let Some(o) = x.as_object_mut() {
                            let k = key_ci(o, sub);
                            o.remove(&k);
                        }
                    }
                }
                (_, sub) if hits == 0 => {
                    // Providers set `emails[type eq "work"].value` on a user without one: the
                    // element the filter describes is made (only for a plain `x eq "v"` filter).
                    let Some(mut made) = element_of(filter) else {
                        return Err(err("noTarget", format!("operation {i}: no value matches the path's filter")));
                    };
                    match (sub, value) {
                        (Some(sub), Some(v)) => {
                            made.insert(sub.to_string(), v);
                        }
                        (None, Some(Value::Object(v))) => made.extend(v),
                        _ => {
                            return Err(err("invalidValue", format!("operation {i}: the value does not fit the path")))
                        }
                    }
                    items.push(Value::Object(made));
                }
                (_, Some(sub)) => {
                    for x in items.iter_mut().filter(|x| filter.matches(x)) {
                        if let Some(o) = x.as_object_mut() {
                            let k = key_ci(o, sub);
                            o.insert(k, value.clone().unwrap_or(Value::Null));
                        }
                    }
                }
                (_, None) => {
                    for x in items.iter_mut().filter(|x| filter.matches(x)) {
                        *x = value.clone().unwrap_or(Value::Null);
                    }
                }
            }
        }
    }
    Ok(())
}

/// `type eq "work"` → `{"type": "work"}`.
fn element_of(filter: &Filter) -> Option<Map<String, Value>> {
    match filter {
        Filter::Compare(p, super::filter::CmpOp::Eq, v) if p.sub.is_none() => {
            let mut m = Map::new();
            m.insert(p.attr.clone(), v.clone());
            Some(m)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
    const GROUP: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

    fn patch(doc: &mut Value, ops: Value, urn: &str) -> Result<(), PatchError> {
        apply(doc, &json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops}), urn)
    }

    #[test]
    fn test_group_members_as_the_rfc_entra_and_okta_send_them() {
        let mut g = json!({"displayName": "Sales", "members": [{"value": "a"}]});
        // RFC 7644 §3.5.2.1: add members.
        patch(&mut g, json!([{"op": "add", "path": "members", "value": [{"value": "b"}, {"value": "a"}]}]), GROUP)
            .unwrap();
        assert_eq!(g["members"], json!([{"value": "a"}, {"value": "b"}]));
        // §3.5.2.2: remove one member by filter.
        patch(&mut g, json!([{"op": "remove", "path": "members[value eq \"a\"]"}]), GROUP).unwrap();
        assert_eq!(g["members"], json!([{"value": "b"}]));
        // Entra: capitalised ops, removal by value.
        patch(
            &mut g,
            json!([{"op": "Add", "path": "members", "value": [{"value": "c"}]},
                             {"op": "Remove", "path": "members", "value": [{"value": "b"}]}]),
            GROUP,
        )
        .unwrap();
        assert_eq!(g["members"], json!([{"value": "c"}]));
        // Okta: replace of the whole list, and of the name without a path.
        patch(
            &mut g,
            json!([{"op": "replace", "path": "members", "value": [{"value": "d"}]},
                             {"op": "replace", "value": {"id": "g1", "displayName": "Sales EMEA"}}]),
            GROUP,
        )
        .unwrap();
        assert_eq!((g["members"].clone(), g["displayName"].clone()), (json!([{"value": "d"}]), json!("Sales EMEA")));
        // §3.5.2.2: remove all members.
        patch(&mut g, json!([{"op": "remove", "path": "members"}]), GROUP).unwrap();
        assert!(g.get("members").is_none());
    }

    #[test]
    fn test_user_attributes_as_entra_and_okta_send_them() {
        let mut u = json!({"userName": "a@x", "active": true, "name": {"givenName": "A"}});
        // Entra: boolean as a string, dotted keys, extension paths it does not know are skipped.
        patch(&mut u, json!([{"op": "Replace", "path": "active", "value": "False"},
                             {"op": "Add", "value": {"name.familyName": "Bee"}},
                             {"op": "Add", "path": "emails[type eq \"work\"].value", "value": "a@work.example"},
                             {"op": "Replace", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department", "value": "R&D"}]), USER).unwrap();
        assert_eq!(u["active"], "False");
        assert_eq!(u["name"], json!({"givenName": "A", "familyName": "Bee"}));
        assert_eq!(u["emails"], json!([{"type": "work", "value": "a@work.example"}]));
        assert!(u.get("department").is_none());
        // Okta: path-less replace of active.
        patch(&mut u, json!([{"op": "replace", "value": {"active": true}}]), USER).unwrap();
        assert_eq!(u["active"], true);
        // Case-insensitive attribute names.
        patch(&mut u, json!([{"op": "replace", "path": "USERNAME", "value": "b@x"}]), USER).unwrap();
        assert_eq!(u["userName"], "b@x");
        patch(&mut u, json!([{"op": "remove", "path": "name.givenName"}]), USER).unwrap();
        assert_eq!(u["name"], json!({"familyName": "Bee"}));
    }

    #[test]
    fn test_bad_patches_are_refused_with_the_rfc_scim_type() {
        let mut u = json!({"userName": "a@x"});
        let t = |r: Result<(), PatchError>| r.unwrap_err().scim_type;
        assert_eq!(t(apply(&mut u, &json!({}), USER)), "invalidSyntax");
        assert_eq!(t(patch(&mut u, json!([{"op": "move", "path": "x"}]), USER)), "invalidSyntax");
        assert_eq!(t(patch(&mut u, json!([{"op": "remove"}]), USER)), "noTarget");
        assert_eq!(t(patch(&mut u, json!([{"op": "add", "path": "emails[type eq"}]), USER)), "invalidPath");
        assert_eq!(t(patch(&mut u, json!([{"op": "replace", "path": "userName"}]), USER)), "invalidValue");
        assert_eq!(t(patch(&mut u, json!([{"op": "replace", "value": "x"}]), USER)), "invalidValue");
        // A filtered path copies its value into each match: bounded, whatever the body's size.
        let mut g = json!({"members": (0..2000).map(|i| json!({"value": i.to_string()})).collect::<Vec<_>>()});
        let big = "x".repeat(4096);
        assert_eq!(
            t(patch(&mut g, json!([{"op": "replace", "path": "members[value pr].display", "value": big}]), GROUP)),
            "tooMany"
        );
    }
}
