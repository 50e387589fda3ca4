//! Every configuration key as (key, value, default, applies-on-reload) rows: what SHOW CONFIG lists and what a
//! reload compares.

use std::time::Duration;

use super::{AuthMethod, Config, LogFormat};

fn path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Keys whose new value a reload cannot apply (they are reported, and the running value stays).
pub const RESTART_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "workers",
    "own_session",
    "log_format",
    "cache.enabled",
    "cache.max_bytes",
    "cache.max_entry_bytes",
    "cache.default_ttl",
    "cache.rules",
    "unix_socket_dir",
    "logfile",
    "pidfile",
    "cache.redis",
    "redis_url",
    "redis_timeout",
    "redis_prefix",
    "redis_tls_ca_file",
];

pub fn rows(c: &Config) -> Vec<(&'static str, String, &'static str, bool)> {
    let auth = match c.auth_type {
        AuthMethod::ScramSha256 => "scram-sha-256",
        AuthMethod::Md5 => "md5",
        AuthMethod::Trust => "trust",
    };
    let log = match c.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let v: Vec<(&'static str, String, &'static str)> = vec![
        ("listen", c.listen.clone(), "127.0.0.1:6432"),
        ("admin_listen", c.admin_listen.clone().unwrap_or_default(), "127.0.0.1:9930"),
        ("pool_mode", c.pool_mode.name().into(), "transaction"),
        ("pool_size", c.pool_size.to_string(), "20"),
        ("min_pool_size", c.min_pool_size.to_string(), "0"),
        ("max_client_conn", c.max_client_conn.to_string(), "10000"),
        ("query_wait_timeout", dur(c.query_wait_timeout), "30s"),
        ("server_connect_timeout", dur(c.server_connect_timeout), "5s"),
        ("server_lifetime", dur(c.server_lifetime), "1h"),
        ("server_idle_timeout", dur(c.server_idle_timeout), "10m"),
        ("server_check_delay", dur(c.server_check_delay), "1s"),
        ("server_tcp_keepalive", c.server_tcp.keepalive.to_string(), "true"),
        ("server_tcp_keepidle", dur(c.server_tcp.idle), "30s"),
        ("server_tcp_keepintvl", dur(c.server_tcp.interval), "10s"),
        ("server_tcp_keepcnt", c.server_tcp.count.to_string(), "3"),
        ("tcp_user_timeout", dur(c.server_tcp.user_timeout), "1m"),
        ("client_login_timeout", dur(c.client_login_timeout), "10s"),
        ("shutdown_timeout", dur(c.shutdown_timeout), "30s"),
        ("auth_type", auth.into(), "scram-sha-256"),
        ("max_message_size", c.max_message_size.to_string(), "268435456"),
        ("max_prepared_statements", c.max_prepared_statements.to_string(), "256"),
        ("workers", c.workers.to_string(), "0"),
        ("own_session", c.own_session.to_string(), "true"),
        ("log_format", log.into(), "text"),
        ("admin_users", c.admin_users.join(","), ""),
        ("stats_users", c.stats_users.join(","), ""),
        ("auth_user", c.auth_user.as_ref().map(|u| u.0.clone()).unwrap_or_default(), ""),
        ("auth_query", c.auth_query.clone(), super::DEFAULT_AUTH_QUERY),
        ("client_tls_mode", format!("{:?}", c.client_tls_mode).to_ascii_lowercase(), "disable (allow with a certificate)"),
        ("server_tls_mode", c.server_tls.mode.name().into(), "prefer"),
        ("cache.enabled", c.cache.enabled.to_string(), "false"),
        ("cache.max_bytes", c.cache.max_bytes.to_string(), "268435456"),
        ("cache.max_entry_bytes", c.cache.max_entry_bytes.to_string(), "1048576"),
        ("cache.default_ttl", dur(c.cache.default_ttl), "1s"),
        ("cache.rules", c.cache.rules.len().to_string(), "0"),
        ("cache.redis", c.cache.redis.to_string(), "false"),
        ("redis_url", c.redis.as_ref().map(|r| crate::redis::redact(&r.url)).unwrap_or_default(), ""),
        ("redis_timeout", c.redis.as_ref().map(|r| dur(r.timeout)).unwrap_or_default(), "5ms"),
        ("redis_prefix", c.redis.as_ref().map(|r| r.prefix.clone()).unwrap_or_default(), "pgsurge:"),
        (
            "redis_tls_ca_file",
            c.redis.as_ref().and_then(|r| r.tls_ca.as_ref()).map(|(p, _)| p.display().to_string()).unwrap_or_default(),
            "",
        ),
        ("batch.enabled", c.batch.enabled.to_string(), "false"),
        ("batch.max_batch_size", c.batch.max_batch_size.to_string(), "500"),
        ("batch.max_wait", dur(c.batch.max_wait), "0s"),
        ("slow_query_threshold", dur(c.slow_query_threshold), "0 (no slow lane)"),
        ("slow_pool_share", c.slow_pool_share.to_string(), "0.5"),
        ("unix_socket_dir", path(&c.unix_socket_dir), "(none; /tmp from a pgbouncer.ini)"),
        ("logfile", path(&c.logfile), ""),
        ("pidfile", path(&c.pidfile), ""),
    ];
    v.into_iter().map(|(k, val, d)| (k, val, d, !RESTART_KEYS.contains(&k))).collect()
}
