//! Session settings a client expects on whatever server connection it lands on, the statements that bring a
//! server in line on checkout, and the output-changing subset that cache and batch keys include. Each setting is
//! kept as the SQL that establishes it: `set_config(...)` for startup parameters and reported values, the
//! client's own `SET` text for what it set itself.

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;

/// Lowercase setting name -> the SQL that establishes it.
pub type Settings = BTreeMap<String, String>;

/// Startup keys that are not session settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// Reported values that describe the server, not the session; never re-applied.
const SERVER_FACTS: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "in_hot_standby",
    "is_superuser",
    "scram_iterations",
    "session_authorization",
];

pub use crate::sql::session::set_config_sql;

/// Settings from the startup packet, including `options=-c name=value` / `--name=value`.
pub fn from_startup(params: &[(String, String)]) -> Settings {
    let mut raw = BTreeMap::new();
    for (k, v) in params {
        if k == "options" {
            parse_options(v, &mut raw);
        } else if !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with("_pq_.") {
            raw.insert(k.to_ascii_lowercase(), v.clone());
        }
    }
    raw.into_iter().filter(|(k, _)| valid_name(k)).map(|(k, v)| (k.clone(), set_config_sql(&k, &v))).collect()
}

fn parse_options(opts: &str, out: &mut BTreeMap<String, String>) {
    // Backslash escapes a space, as libpq documents for `options`.
    let mut words = vec![];
    let mut cur = String::new();
    let mut chars = opts.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ' ' | '\t' => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let kv = if w == "-c" {
            it.next()
        } else if let Some(r) = w.strip_prefix("--") {
            Some(r.to_string())
        } else {
            w.strip_prefix("-c").map(str::to_string)
        };
        if let Some((k, v)) = kv.as_deref().and_then(|kv| kv.split_once('=')) {
            out.insert(k.replace('-', "_").to_ascii_lowercase(), v.to_string());
        }
    }
}

/// Whether a reported parameter is one a client session can change and pgsurge must keep in sync.
pub fn is_session_setting(name: &str) -> bool {
    !SERVER_FACTS.iter().any(|f| f.eq_ignore_ascii_case(name))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
}

/// The statements (setting name, SQL) that turn a server's `applied` settings into the client's `wanted` ones.
pub fn sync_statements(wanted: &Settings, applied: &Settings) -> Vec<(String, String)> {
    if wanted == applied {
        return Vec::new(); // the common case, once per checkout: one ordered walk instead of a lookup per key
    }
    let mut out: Vec<(String, String)> =
        wanted.iter().filter(|(k, v)| applied.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    for k in applied.keys() {
        if !wanted.contains_key(k) && valid_name(k) {
            out.push((k.clone(), format!("RESET {k}")));
        }
    }
    out
}

/// Settings that change what a SELECT returns (correctness.md): part of every cache and batch key, with every
/// custom (dotted) setting, which row-level security policies read through `current_setting`.
pub const OUTPUT_SETTINGS: &[&str] = &[
    "search_path",
    "timezone",
    "datestyle",
    "intervalstyle",
    "client_encoding",
    "extra_float_digits",
    "bytea_output",
    "standard_conforming_strings",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "role",
    "session_authorization",
    "row_security",
];

/// The output-changing settings of `s` as one canonical byte string.
pub fn output_text(s: &Settings) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in s.iter().filter(|(k, _)| OUTPUT_SETTINGS.contains(&k.as_str()) || k.contains('.')) {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// A number for each distinct set of output-changing settings, so keys carry 8 bytes instead of the text. Numbers
/// are never reused: when `MAX_OUTPUTS` sets are remembered the memory starts over, and a set seen again gets a new
/// number (its earlier entries are merely missed, never confused with another set's).
#[derive(Default)]
pub struct Outputs {
    ids: Mutex<HashMap<Box<[u8]>, u64>>,
    next: std::sync::atomic::AtomicU64,
}

const MAX_OUTPUTS: usize = 65_536;

impl Outputs {
    pub fn id(&self, s: &Settings) -> u64 {
        let text = output_text(s);
        let mut ids = self.ids.lock();
        if let Some(id) = ids.get(text.as_slice()) {
            return *id;
        }
        if ids.len() >= MAX_OUTPUTS {
            ids.clear();
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        ids.insert(text.into_boxed_slice(), id);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_become_settings() {
        let p = vec![
            ("user".into(), "app".into()),
            ("application_name".into(), "psql".into()),
            ("options".into(), "-c search_path=a,b --statement-timeout=5s -csearch_path=x\\ y".into()),
        ];
        let s = from_startup(&p);
        assert_eq!(s.keys().collect::<Vec<_>>(), ["application_name", "search_path", "statement_timeout"]);
        assert_eq!(s["search_path"], "SELECT pg_catalog.set_config('search_path', 'x y', false)");
    }

    #[test]
    fn sync_sets_what_differs_and_resets_what_the_client_never_set() {
        let wanted: Settings =
            [("timezone".into(), "SET TimeZone = 'UTC'".into()), ("application_name".into(), set_config_sql("application_name", "it's"))]
                .into();
        let applied: Settings =
            [("timezone".into(), "SET TimeZone = 'UTC'".into()), ("datestyle".into(), "SET DateStyle = German".into())].into();
        assert_eq!(
            sync_statements(&wanted, &applied),
            vec![
                ("application_name".into(), "SELECT pg_catalog.set_config('application_name', 'it''s', false)".into()),
                ("datestyle".into(), "RESET datestyle".into())
            ]
        );
        assert!(sync_statements(&wanted, &wanted).is_empty());
    }

    #[test]
    fn only_output_changing_settings_tell_keys_apart() {
        let o = Outputs::default();
        let a: Settings = [("application_name".into(), "a".into()), ("timezone".into(), "SET TimeZone = 'UTC'".into())].into();
        let b: Settings = [("application_name".into(), "b".into()), ("timezone".into(), "SET TimeZone = 'UTC'".into())].into();
        let c: Settings = [("app.tenant".into(), "SET app.tenant = 7".into()), ("timezone".into(), "SET TimeZone = 'UTC'".into())].into();
        assert_eq!(o.id(&a), o.id(&b));
        assert_ne!(o.id(&a), o.id(&c), "custom settings feed row-level security policies");
    }
}
