//! Printing answers: tables for people, the API's JSON for scripts.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::Table;
use serde_json::Value;

use crate::cli::OutputFormat;

/// A column: its heading and a JSON pointer into each item; `a|b` shows `b` where `a` is empty
/// (an audit event's actor is a user or, for cloudpc's own changes, an application).
pub type Column = (&'static str, &'static str);

fn lookup<'a>(item: &'a Value, pointers: &str) -> Option<&'a Value> {
    pointers.split('|').filter_map(|p| item.pointer(p)).find(|v| !v.is_null() && *v != "")
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a.iter().map(|x| cell(Some(x))).collect::<Vec<_>>().join(", "),
        Some(other) => other.to_string(),
    }
}

pub fn list(format: OutputFormat, items: &[Value], columns: &[Column]) {
    if format == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&Value::Array(items.to_vec())).unwrap_or_default());
        return;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(columns.iter().map(|c| c.0));
    for item in items {
        t.add_row(columns.iter().map(|c| cell(lookup(item, c.1))));
    }
    println!("{t}");
}

pub fn entity(format: OutputFormat, item: &Value) {
    if format == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(item).unwrap_or_default());
        return;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    if let Some(map) = item.as_object() {
        for (k, v) in map.iter().filter(|(k, _)| !k.starts_with("@odata")) {
            let text = match v {
                Value::Array(_) | Value::Object(_) => serde_json::to_string(v).unwrap_or_default(),
                _ => cell(Some(v)),
            };
            t.add_row(vec![k.clone(), text]);
        }
    }
    println!("{t}");
}

/// Confirms a change that has no body to show.
pub fn done(format: OutputFormat, message: &str) {
    if format == OutputFormat::Json {
        println!("{}", serde_json::json!({ "result": "ok", "message": message }));
    } else {
        println!("{message}");
    }
}
