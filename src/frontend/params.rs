//! Session settings a client wants (from its startup packet and the ParameterStatus it has seen), and the
//! SET/RESET that brings a server connection in line with them on checkout.

use std::collections::BTreeMap;

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

/// Settings from the startup packet, including `options=-c name=value` / `--name=value`.
pub fn from_startup(params: &[(String, String)]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in params {
        if k == "options" {
            parse_options(v, &mut out);
        } else if !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with("_pq_.") {
            out.insert(k.clone(), v.clone());
        }
    }
    out
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
            out.insert(k.replace('-', "_"), v.to_string());
        }
    }
}

/// Whether a reported parameter is one a client session can change and pgsurge must keep in sync.
pub fn is_session_setting(name: &str) -> bool {
    !SERVER_FACTS.contains(&name)
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
}

/// The SQL that turns a server's `applied` settings into the client's `wanted` ones, or None if they agree.
pub fn sync_sql(wanted: &BTreeMap<String, String>, applied: &BTreeMap<String, String>) -> Option<String> {
    // set_config takes the value as text, parsed exactly as a startup parameter would be (lists included).
    let sets: Vec<String> = wanted
        .iter()
        .filter(|(k, v)| applied.get(*k) != Some(*v) && valid_name(k))
        .map(|(k, v)| format!("pg_catalog.set_config('{k}', '{}', false)", v.replace('\'', "''")))
        .collect();
    let mut sql = String::new();
    if !sets.is_empty() {
        sql = format!("SELECT {};", sets.join(", "));
    }
    for k in applied.keys() {
        if !wanted.contains_key(k) && valid_name(k) {
            sql.push_str(&format!("RESET {k};"));
        }
    }
    (!sql.is_empty()).then_some(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn startup_options_become_settings() {
        let p = vec![
            ("user".into(), "app".into()),
            ("application_name".into(), "psql".into()),
            ("options".into(), "-c search_path=a,b --statement-timeout=5s -csearch_path=x\\ y".into()),
        ];
        let s = from_startup(&p);
        assert_eq!(s, map(&[("application_name", "psql"), ("search_path", "x y"), ("statement_timeout", "5s")]));
    }

    #[test]
    fn sync_sets_what_differs_and_resets_what_the_client_never_set() {
        let wanted = map(&[("TimeZone", "UTC"), ("application_name", "it's")]);
        let applied = map(&[("TimeZone", "UTC"), ("DateStyle", "German")]);
        assert_eq!(
            sync_sql(&wanted, &applied).unwrap(),
            "SELECT pg_catalog.set_config('application_name', 'it''s', false);RESET DateStyle;"
        );
        assert_eq!(sync_sql(&wanted, &wanted), None);
    }
}
