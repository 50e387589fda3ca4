//! PgBouncer's `pgbouncer.ini` (recognised by its `[pgbouncer]` section) read into the same layered `Settings` a
//! TOML file gives: `[databases]` connection strings, `[users]`, `[pgbouncer]` keys, `%include`. A key pgsurge
//! does not implement is collected by name in `ignored` (logged once by the caller), never a refusal to start.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{ConfigError, DatabaseSettings, Dur, Settings, UserSettings};

/// What one ini file (with its includes) amounts to.
#[derive(Debug, Default)]
pub struct Ini {
    pub settings: Settings,
    /// `[pgbouncer]` keys the file set (a console `SET` of one of them gives way to the file on RELOAD).
    pub keys: BTreeSet<String>,
    /// Keys read but not applied, each with why: "section.key: reason".
    pub ignored: Vec<String>,
}

/// True when `text` has a `[pgbouncer]` section: the file is a pgbouncer.ini, not TOML.
pub fn is_ini(text: &str) -> bool {
    text.lines().any(|l| l.trim().eq_ignore_ascii_case("[pgbouncer]"))
}

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// Reads `path` and every file it `%include`s.
pub fn read(path: &Path) -> Result<Ini, ConfigError> {
    let mut lines = Vec::new();
    collect(path, &mut lines, 0)?;
    let mut ini = Ini::default();
    // PgBouncer listens on /tmp unless told otherwise; the HTTP endpoint is pgsurge's own, off unless asked for.
    ini.settings.unix_socket_dir = Some("/tmp".into());
    ini.settings.admin_listen = Some(String::new());
    ini.settings.pool_size = Some(20);
    let (mut addr, mut port) = (None::<String>, 6432u16);
    let mut section = String::new();
    for (origin, line) in lines {
        let t = line.trim();
        if t.is_empty() || t.starts_with(';') || t.starts_with('#') {
            continue;
        }
        if let Some(s) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.trim().to_ascii_lowercase();
            continue;
        }
        let Some((k, v)) = t.split_once('=') else {
            return Err(bad(format!("{origin}: expected key = value, got {t:?}")));
        };
        let (k, v) = (k.trim(), unquote(v.trim()));
        match section.as_str() {
            "databases" => {
                let d = database(&v, k, &mut ini.ignored).map_err(|e| bad(format!("{origin}: databases.{k}: {e}")))?;
                ini.settings.databases.insert(k.to_string(), d);
            }
            "users" => {
                let u = user(&v, k, &mut ini.ignored).map_err(|e| bad(format!("{origin}: users.{k}: {e}")))?;
                ini.settings.users.insert(k.to_string(), u);
            }
            "pgbouncer" => {
                let key = k.to_ascii_lowercase();
                match key.as_str() {
                    "listen_addr" => addr = Some(v.clone()),
                    "listen_port" => port = v.parse().map_err(|_| bad(format!("{origin}: listen_port {v:?} is not a port")))?,
                    _ => apply(&mut ini.settings, &key, &v, &mut ini.ignored).map_err(|e| bad(format!("{origin}: {key}: {e}")))?,
                }
                ini.keys.insert(key);
            }
            other => ini.ignored.push(format!("[{other}] {k}: section not used by pgsurge")),
        }
    }
    let host = match addr.as_deref().map(|a| a.split(',').next().unwrap_or("").trim()) {
        None | Some("") | Some("localhost") => "127.0.0.1".to_string(),
        Some("*") => "0.0.0.0".to_string(),
        Some(a) if a.contains(':') => format!("[{a}]"),
        Some(a) => a.to_string(),
    };
    ini.settings.listen = Some(format!("{host}:{port}"));
    Ok(ini)
}

/// Every line of `path`, `%include`s expanded in place (relative to the including file), with where it came from.
fn collect(path: &Path, out: &mut Vec<(String, String)>, depth: usize) -> Result<(), ConfigError> {
    if depth > 10 {
        return Err(bad(format!("{}: %include nested more than 10 deep", path.display())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    for (no, line) in text.lines().enumerate() {
        if let Some(inc) = line.trim().strip_prefix("%include") {
            let inc = PathBuf::from(unquote(inc.trim()));
            let inc = if inc.is_relative() { path.parent().unwrap_or(Path::new(".")).join(inc) } else { inc };
            collect(&inc, out, depth + 1)?;
            continue;
        }
        out.push((format!("{}:{}", path.display(), no + 1), line.to_string()));
    }
    Ok(())
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    for q in ['\'', '"'] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return v[1..v.len() - 1].replace(&format!("{q}{q}"), &q.to_string());
        }
    }
    v.to_string()
}

/// `key=value key='quoted value' …` as in libpq connection strings.
pub fn connstr(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("expected {key}=value"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quote in {key}")),
                    Some('\\') => val.extend(chars.next()),
                    Some('\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                        val.push('\'');
                    }
                    Some('\'') => break,
                    Some(c) => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        out.push((key.to_ascii_lowercase(), val));
    }
}

fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.trim().parse().map_err(|_| format!("{v:?} is not a number"))
}

/// PgBouncer times are seconds (fractions allowed), or a value with a unit (`10s`, `500ms`).
pub fn seconds(v: &str) -> Result<Dur, String> {
    let v = v.trim();
    match v.parse::<f64>() {
        Ok(s) if s >= 0.0 && s.is_finite() => Ok(Dur(std::time::Duration::from_secs_f64(s))),
        Ok(_) => Err(format!("{v:?} is not a time")),
        Err(_) => v.parse::<Dur>(),
    }
}

fn database(v: &str, name: &str, ignored: &mut Vec<String>) -> Result<DatabaseSettings, String> {
    let mut d = DatabaseSettings::default();
    for (k, val) in connstr(v)? {
        match k.as_str() {
            // A host list (`h1,h2`, with `port = 5432,5433`) is tried in order, as libpq does.
            "host" => d.host = Some(val).filter(|h| !h.is_empty()),
            "port" => d.port = Some(super::Ports(super::upstream::parse_ports(&val)?)),
            "dbname" => d.dbname = Some(val),
            "user" | "username" => d.user = Some(val),
            "password" => d.password = Some(val),
            "pool_size" => d.pool_size = Some(num(&val)?),
            "min_pool_size" => d.min_pool_size = Some(num(&val)?),
            "reserve_pool_size" | "reserve_pool" => d.reserve_pool_size = Some(num(&val)?),
            "pool_mode" => d.pool_mode = Some(pool_mode(&val, ignored)),
            "max_db_connections" => d.max_db_connections = Some(num(&val)?),
            "max_db_client_connections" => d.max_db_client_connections = Some(num(&val)?),
            "connect_query" => d.connect_query = Some(val),
            "client_encoding" | "datestyle" | "timezone" => {
                d.startup.insert(k.clone(), val);
            }
            "auth_user" => d.auth_user = Some(val),
            "auth_dbname" => d.auth_dbname = Some(val),
            "server_lifetime" => d.server_lifetime = Some(seconds(&val)?),
            other => ignored.push(format!("databases.{name} {other}: not implemented by pgsurge")),
        }
    }
    Ok(d)
}

fn user(v: &str, name: &str, ignored: &mut Vec<String>) -> Result<UserSettings, String> {
    let mut u = UserSettings { settings_only: true, ..Default::default() };
    for (k, val) in connstr(v)? {
        match k.as_str() {
            "pool_size" => u.pool_size = Some(num(&val)?),
            "reserve_pool_size" => u.reserve_pool_size = Some(num(&val)?),
            "pool_mode" => u.pool_mode = Some(pool_mode(&val, ignored)),
            "max_user_connections" => u.max_user_connections = Some(num(&val)?),
            "max_user_client_connections" => u.max_user_client_connections = Some(num(&val)?),
            other => ignored.push(format!("users.{name} {other}: not implemented by pgsurge")),
        }
    }
    Ok(u)
}

/// `statement` mode is served as `transaction` (a multi-statement transaction is not refused).
fn pool_mode(v: &str, ignored: &mut Vec<String>) -> String {
    if v.eq_ignore_ascii_case("statement") {
        ignored.push("pool_mode = statement: served as transaction (multi-statement transactions are allowed)".into());
        return "transaction".into();
    }
    v.to_ascii_lowercase()
}

/// Applies one `[pgbouncer]` key (also what the console's `SET key = value` does).
pub fn apply(s: &mut Settings, key: &str, v: &str, ignored: &mut Vec<String>) -> Result<(), String> {
    let opt = |v: &str| Some(v.to_string()).filter(|v| !v.is_empty());
    let path = |v: &str| Some(PathBuf::from(v)).filter(|p| !p.as_os_str().is_empty());
    match key {
        "unix_socket_dir" => s.unix_socket_dir = Some(v.to_string()),
        "logfile" => s.logfile = path(v),
        "pidfile" => s.pidfile = path(v),
        "auth_file" => s.auth_file = path(v),
        "auth_type" => {
            s.auth_type = Some(match v {
                "trust" | "any" => "trust".into(),
                "md5" | "plain" => "md5".into(),
                "scram-sha-256" => "scram-sha-256".into(),
                other => {
                    ignored.push(format!("auth_type = {other}: not implemented; scram-sha-256 (md5 for md5 secrets) is used"));
                    "scram-sha-256".into()
                }
            })
        }
        "auth_query" => s.auth_query = opt(v),
        "auth_user" => s.auth_user = opt(v),
        "pool_mode" => s.pool_mode = Some(pool_mode(v, ignored)),
        "default_pool_size" => s.pool_size = Some(num::<usize>(v)?.max(1)),
        "min_pool_size" => s.min_pool_size = Some(num(v)?),
        "reserve_pool_size" => s.reserve_pool_size = Some(num(v)?),
        "reserve_pool_timeout" => s.reserve_pool_timeout = Some(seconds(v)?),
        "max_client_conn" => s.max_client_conn = Some(num(v)?),
        "max_db_connections" => s.max_db_connections = Some(num(v)?),
        "max_user_connections" => s.max_user_connections = Some(num(v)?),
        "max_db_client_connections" => s.max_db_client_connections = Some(num(v)?),
        "max_user_client_connections" => s.max_user_client_connections = Some(num(v)?),
        "query_timeout" => s.query_timeout = Some(seconds(v)?),
        "query_wait_timeout" => s.query_wait_timeout = Some(zero_is_forever(seconds(v)?)),
        "idle_transaction_timeout" => s.idle_transaction_timeout = Some(seconds(v)?),
        "client_idle_timeout" => s.client_idle_timeout = Some(seconds(v)?),
        // 0: a server connection is used once, then closed (as in PgBouncer).
        "server_lifetime" => s.server_lifetime = Some(seconds(v)?),
        "server_idle_timeout" => s.server_idle_timeout = Some(zero_is_forever(seconds(v)?)),
        "server_connect_timeout" => s.server_connect_timeout = Some(zero_is_forever(seconds(v)?)),
        "server_login_retry" => s.server_login_retry = Some(seconds(v)?),
        "client_login_timeout" => s.client_login_timeout = Some(zero_is_forever(seconds(v)?)),
        "server_check_delay" => s.server_check_delay = Some(seconds(v)?),
        "max_prepared_statements" => {
            // 0 turns PgBouncer's tracking off; pgsurge always tracks (the per-server set stays bounded).
            let n: usize = num(v)?;
            s.max_prepared_statements = Some(if n == 0 { 256 } else { n });
        }
        "admin_users" => s.admin_users = Some(v.to_string()),
        "stats_users" => s.stats_users = Some(v.to_string()),
        "client_tls_sslmode" => {
            s.client_tls_mode = match v {
                "disable" => None,
                "allow" | "prefer" => Some("allow".into()),
                _ => Some("require".into()),
            }
        }
        "client_tls_key_file" => s.client_tls_key = path(v),
        "client_tls_cert_file" => s.client_tls_cert = path(v),
        "server_tls_sslmode" => s.server_tls_mode = opt(v),
        "server_tls_ca_file" => s.server_tls_ca_file = path(v),
        "shutdown_timeout" => s.shutdown_timeout = Some(seconds(v)?),
        // PgBouncer's keepalive keys apply to pgsurge's server connections (clients are local: loopback or a
        // socket); 0 or empty keeps pgsurge's default.
        "tcp_keepalive" => s.server_tcp_keepalive = Some(matches!(v.trim(), "1" | "on" | "true" | "yes")),
        "tcp_keepidle" if num::<u64>(v)? > 0 => s.server_tcp_keepidle = Some(seconds(v)?),
        "tcp_keepintvl" if num::<u64>(v)? > 0 => s.server_tcp_keepintvl = Some(seconds(v)?),
        "tcp_keepcnt" if num::<u32>(v)? > 0 => s.server_tcp_keepcnt = Some(num(v)?),
        // Milliseconds, as in PgBouncer.
        "tcp_user_timeout" => s.tcp_user_timeout = Some(Dur(std::time::Duration::from_millis(num(v)?))),
        "tcp_keepidle" | "tcp_keepintvl" | "tcp_keepcnt" => {}
        // Keys whose behaviour pgsurge has without the key (or cannot have): named, not applied.
        _ => ignored.push(format!("{key}: {}", why_ignored(key))),
    }
    Ok(())
}

/// PgBouncer's "0 means no limit" for timeouts that are limits in pgsurge too.
fn zero_is_forever(d: Dur) -> Dur {
    if d.0.is_zero() {
        Dur(std::time::Duration::from_secs(100 * 365 * 24 * 3600))
    } else {
        d
    }
}

fn why_ignored(key: &str) -> &'static str {
    match key {
        "ignore_startup_parameters" | "track_extra_parameters" => "pgsurge accepts and tracks every startup parameter",
        "server_reset_query" | "server_reset_query_always" => "pgsurge resets server state itself (DISCARD ALL on session end)",
        "server_check_query" => "pgsurge checks liveness with an empty query",
        "tcp_defer_accept" | "tcp_socket_buffer" | "so_reuseport" | "pkt_buf" | "sbuf_loopcnt" | "listen_backlog" => {
            "socket tuning is the OS default in pgsurge"
        }
        "verbose" | "syslog" | "syslog_ident" | "syslog_facility" | "log_connections" | "log_disconnections" | "log_pooler_errors"
        | "log_stats" | "stats_period" => "logging is set with PGSURGE_LOG",
        "user" => "pgsurge does not switch OS users",
        _ => "not implemented by pgsurge",
    }
}

#[cfg(test)]
#[path = "ini_tests.rs"]
mod tests;
