//! Parsing flotilla files (TOML) and API bodies (JSON) into specs, with every error located.
//!
//! Both formats go through the same steps: parse the text into a tree that remembers where
//! each value is; convert it to a `serde_json::Value`; deserialize the target type from it,
//! and on each error record it, drop the offending entry and try again, so that all unknown
//! fields and invalid values are reported together; then validate. Every error is located by
//! its field path in the original text.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde_json::Value;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{FieldError, SpecError, SpecErrors};
use crate::file::FlotillaFile;
use crate::locate::{JsonLocator, Locate, Target, TomlLocator, line_col};
use crate::object::Service;
use crate::path::{FieldPath, PathSeg};
use crate::service::ServiceSpec;
use crate::validate::{ENV_NAME_ERROR, validate_file, validate_name, validate_spec};

/// serde's type names in its messages, as a user of the file would say them.
fn plain_words(message: &str) -> String {
    const WORDS: [(&str, &str); 13] = [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number ≥ 0"),
        ("expected u64", "expected a whole number ≥ 0"),
        ("expected usize", "expected a whole number ≥ 0"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a table"),
        ("expected a boolean", "expected true or false"),
        ("invalid type: sequence", "invalid type: list"),
        ("invalid type: map", "invalid type: table"),
    ];
    let mut out = message.to_string();
    for (from, to) in WORDS {
        if let Some(at) = out.find(from) {
            // Only a whole word: `expected u32` but not `expected u320`.
            let end = at + from.len();
            if !out[end..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
                out.replace_range(at..end, to);
            }
        }
    }
    out
}

/// Deserialization attempts per document; each one removes at least one bad entry.
const MAX_ATTEMPTS: usize = 200;

/// Parses and validates a flotilla file. `file` names it in errors (`flotilla.toml:3:1: …`).
pub fn parse_file(text: &str, file: &str) -> Result<FlotillaFile, SpecErrors> {
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let (line, col) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            return Err(SpecErrors(vec![SpecError {
                file: Some(file.to_string()),
                line,
                col,
                path: String::new(),
                message: e.message().trim_end().to_string(),
            }]));
        }
    };
    let locator = TomlLocator { root: &root };
    let mut raw = Vec::new();
    let mut removed = BTreeSet::new();
    let value = toml_table_to_json(root.get_ref(), &FieldPath::root(), &mut raw, &mut removed);
    let parsed = deserialize_all::<FlotillaFile>(value, &mut raw, &mut removed);
    if let Some(f) = &parsed {
        // Entries dropped as invalid would make validation report consequences of those
        // errors (a dropped `ports` makes every probe "need a port"): validate only the
        // services (and `[up]`) that deserialized cleanly.
        let broken: BTreeSet<FieldPath> = removed.iter().map(file_entity).collect();
        raw.extend(
            validate_file(f)
                .into_iter()
                .filter(|e| !broken.contains(&file_entity(&e.path)))
                .map(RawError::value),
        );
    }
    match parsed {
        Some(f) if raw.is_empty() => Ok(f),
        _ => Err(locate_all(raw, &locator, text, Some(file))),
    }
}

/// Parses and validates a service spec sent to the API as JSON (paths from the spec's root,
/// e.g. `probes.readiness.period`).
pub fn parse_service_json(body: &[u8]) -> Result<ServiceSpec, SpecErrors> {
    parse_json_with(body, |spec: &ServiceSpec| validate_spec(spec))
}

/// Parses and validates a whole `Service` object sent to the API as JSON: `metadata.name` must
/// be a valid service name and `spec` a valid spec (paths such as `spec.replicas`). Unknown
/// fields are rejected inside `spec` only, as the object envelope is shared with other kinds.
pub fn parse_service_object_json(body: &[u8]) -> Result<Service, SpecErrors> {
    parse_json_with(body, |svc: &Service| {
        let mut errs = Vec::new();
        if let Err(m) = validate_name(&svc.metadata.name) {
            errs.push(FieldError::new(
                FieldPath::from_keys(["metadata", "name"]),
                m,
            ));
        }
        let prefix = FieldPath::root().key("spec");
        errs.extend(
            validate_spec(&svc.spec)
                .into_iter()
                .map(|e| e.prefixed(&prefix)),
        );
        errs
    })
}

fn parse_json_with<T, F>(body: &[u8], validate: F) -> Result<T, SpecErrors>
where
    T: DeserializeOwned,
    F: Fn(&T) -> Vec<FieldError>,
{
    let text = String::from_utf8_lossy(body);
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let msg = e.to_string();
            // serde_json appends " at line L column C"; we report those as fields.
            let msg = match msg.rfind(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            return Err(SpecErrors(vec![SpecError {
                file: None,
                line: e.line(),
                col: e.column(),
                path: String::new(),
                message: msg,
            }]));
        }
    };
    let locator = JsonLocator { text: body };
    let mut raw = Vec::new();
    let mut removed = BTreeSet::new();
    let parsed = deserialize_all::<T>(value, &mut raw, &mut removed);
    // Validate only a body that deserialized cleanly (see `parse_file`).
    if let Some(t) = parsed.as_ref().filter(|_| raw.is_empty()) {
        raw.extend(validate(t).into_iter().map(RawError::value));
    }
    match parsed {
        Some(t) if raw.is_empty() => Ok(t),
        _ => Err(locate_all(raw, &locator, &text, None)),
    }
}

/// The part of a file a path belongs to: `service.NAME` for services, else its first key.
fn file_entity(path: &FieldPath) -> FieldPath {
    let n = match path.0.first() {
        Some(PathSeg::Key(k)) if k == "service" => 2,
        _ => 1,
    };
    FieldPath(path.0.iter().take(n).cloned().collect())
}

/// An error with its path, before it is located in the text.
#[derive(Debug)]
struct RawError {
    /// Path shown to the user.
    path: FieldPath,
    message: String,
    /// Path of the thing to point at, and whether to point at its key or value.
    at: FieldPath,
    target: Target,
}

impl RawError {
    fn value(e: FieldError) -> Self {
        // Errors about a map key point at the key.
        let target = if e.message.starts_with(ENV_NAME_ERROR) {
            Target::Key
        } else {
            Target::Value
        };
        Self {
            at: e.path.clone(),
            path: e.path,
            message: e.message,
            target,
        }
    }
}

fn locate_all(raw: Vec<RawError>, loc: &dyn Locate, text: &str, file: Option<&str>) -> SpecErrors {
    let mut out: Vec<SpecError> = raw
        .into_iter()
        .map(|r| {
            let (line, col) = line_col(text, loc.nearest(&r.at, r.target));
            SpecError {
                file: file.map(str::to_string),
                line,
                col,
                path: r.path.to_string(),
                message: r.message,
            }
        })
        .collect();
    // Document order; errors at the same place keep the order they were found in.
    out.sort_by_key(|e| (e.line, e.col));
    out.dedup();
    SpecErrors(out)
}

// ---------------------------------------------------------------------------------------------
// Deserialization that reports every error.

/// Deserializes `T`, recording each error in `errs` and removing the offending entry to find
/// the next. Returns `T` only when no error at all was found (including earlier ones in `errs`,
/// in which case `None` is returned once the value is otherwise clean).
fn deserialize_all<T: DeserializeOwned>(
    mut value: Value,
    errs: &mut Vec<RawError>,
    removed: &mut BTreeSet<FieldPath>,
) -> Option<T> {
    for _ in 0..MAX_ATTEMPTS {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return Some(t),
            Err(e) => e,
        };
        let path = convert_path(err.path());
        let message = err.inner().to_string();

        if let Some(rest) = message.strip_prefix("unknown field `") {
            let (name, candidates) = split_backticked(rest);
            // serde_path_to_error includes the unknown key in the path; the table is its parent.
            let table = match path.last() {
                Some(PathSeg::Key(k)) if *k == name => path.parent(),
                _ => path.clone(),
            };
            errs.push(RawError {
                path: table.clone(),
                message: unknown_message("field", &name, &candidates),
                at: table.key(name.clone()),
                target: Target::Key,
            });
            if !remove_at(&mut value, &table.key(name.clone())) {
                return None;
            }
            removed.insert(table.key(name));
            continue;
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let (name, _) = split_backticked(rest);
            let table = match path.last() {
                Some(PathSeg::Key(k)) if *k == name => path.parent(),
                _ => path.clone(),
            };
            // A field we removed because it was invalid is already reported.
            if !removed.contains(&table.key(name.clone())) {
                errs.push(RawError {
                    path: table.clone(),
                    message: format!("missing field `{name}`"),
                    at: table.clone(),
                    target: Target::Key,
                });
            }
            // Drop the table that lacks it and go on, so one incomplete service does not hide
            // the problems of the others (the whole document cannot be dropped).
            if table.is_root() || !remove_at(&mut value, &table) {
                return None;
            }
            removed.insert(table);
            continue;
        }
        let message = match message.strip_prefix("unknown variant `") {
            Some(rest) => {
                let (name, candidates) = split_backticked(rest);
                unknown_message("value", &name, &candidates)
            }
            None => plain_words(&message),
        };
        errs.push(RawError {
            path: path.clone(),
            message,
            at: path.clone(),
            target: Target::Value,
        });
        // Drop the whole entry holding the bad value: for an array element, the array (so
        // later indices stay those of the text).
        let mut drop = path;
        while matches!(drop.last(), Some(PathSeg::Index(_))) {
            drop = drop.parent();
        }
        if drop.is_root() || !remove_at(&mut value, &drop) {
            return None;
        }
        removed.insert(drop);
    }
    None
}

fn convert_path(p: &serde_path_to_error::Path) -> FieldPath {
    use serde_path_to_error::Segment;
    let mut out = FieldPath::root();
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => out = out.index(*index),
            Segment::Map { key } => out = out.key(key.clone()),
            Segment::Enum { .. } => {}
            Segment::Unknown => break,
        }
    }
    out
}

/// Removes the entry at `path` (which must end in a key). True if something was removed.
fn remove_at(value: &mut Value, path: &FieldPath) -> bool {
    let Some((PathSeg::Key(last), init)) = path.0.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in init {
        let next = match seg {
            PathSeg::Key(k) => cur.get_mut(k.as_str()),
            PathSeg::Index(i) => cur.get_mut(*i),
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    cur.as_object_mut()
        .and_then(|m| m.remove(last.as_str()))
        .is_some()
}

/// Splits serde's "name`, expected one of `a`, `b`" (after the first backtick) into the name and
/// the expected names.
fn split_backticked(rest: &str) -> (String, Vec<String>) {
    let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
    let candidates = tail
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    (name.to_string(), candidates)
}

fn unknown_message(what: &str, name: &str, candidates: &[String]) -> String {
    if let Some(s) = suggest(name, candidates) {
        return format!("unknown {what} `{name}` — did you mean `{s}`?");
    }
    if candidates.is_empty() {
        return format!("unknown {what} `{name}`");
    }
    let list: Vec<String> = candidates.iter().map(|c| format!("`{c}`")).collect();
    format!(
        "unknown {what} `{name}`; expected one of {}",
        list.join(", ")
    )
}

/// The known name closest to `name`, if it is close enough to be what the user meant.
pub fn suggest<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase().replace('-', "_");
    let words = |s: &str| {
        let mut w: Vec<String> = s.split(['_', '-']).map(str::to_string).collect();
        w.sort();
        w
    };
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let cl = c.to_ascii_lowercase().replace('-', "_");
        let d = if words(&lower) == words(&cl) {
            0
        } else {
            strsim::damerau_levenshtein(&lower, &cl)
        };
        let limit = (cl.chars().count().max(lower.chars().count()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c.as_str()));
        }
    }
    best.map(|(_, c)| c)
}

// ---------------------------------------------------------------------------------------------
// TOML tree → JSON value

fn toml_table_to_json(
    table: &DeTable<'_>,
    path: &FieldPath,
    errs: &mut Vec<RawError>,
    removed: &mut BTreeSet<FieldPath>,
) -> Value {
    let mut map = serde_json::Map::new();
    for (k, v) in table.iter() {
        let key = k.get_ref().to_string();
        let p = path.key(key.clone());
        if let Some(j) = toml_to_json(v, &p, errs, removed) {
            map.insert(key, j);
        }
    }
    Value::Object(map)
}

fn toml_to_json(
    v: &Spanned<DeValue<'_>>,
    path: &FieldPath,
    errs: &mut Vec<RawError>,
    removed: &mut BTreeSet<FieldPath>,
) -> Option<Value> {
    let mut bad = |message: String| {
        errs.push(RawError {
            path: path.clone(),
            message,
            at: path.clone(),
            target: Target::Value,
        });
        removed.insert(path.clone());
        None
    };
    match v.get_ref() {
        DeValue::String(s) => Some(Value::String(s.to_string())),
        DeValue::Boolean(b) => Some(Value::Bool(*b)),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Some(Value::from(n)),
            Err(_) => bad(format!("integer {i} is out of range")),
        },
        DeValue::Float(f) => match f
            .as_str()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
        {
            Some(n) => Some(Value::Number(n)),
            None => bad(format!("invalid number {f}: must be finite")),
        },
        DeValue::Datetime(d) => bad(format!(
            "invalid type: date-time {d}; no field takes a date or time (quote it to make a string)"
        )),
        DeValue::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, item) in a.iter().enumerate() {
                // A bad element drops the whole array, so indices keep matching the text.
                match toml_to_json(item, &path.index(i), errs, removed) {
                    Some(j) => out.push(j),
                    None => {
                        removed.insert(path.clone());
                        return None;
                    }
                }
            }
            Some(Value::Array(out))
        }
        DeValue::Table(t) => Some(toml_table_to_json(t, path, errs, removed)),
    }
}

#[cfg(test)]
mod tests;
