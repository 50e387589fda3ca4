//! Typed, validated configuration: flags > environment > file > defaults, resolved into databases and users.

mod authfile;
pub mod ini;
pub mod keys;
mod network;
pub mod reload;
mod settings;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use authfile::parse_auth_file;
pub use settings::{Command, DatabaseSettings, DemoArgs, Dur, IniUser, Ports, Settings, UserSettings};
pub use upstream::UpstreamUrl;

use crate::auth::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// The server connection is held for one transaction.
    Transaction,
    /// The server connection is held for the whole client session.
    Session,
}

impl PoolMode {
    pub fn name(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where a client-visible database lives.
#[derive(Debug, Clone, PartialEq)]
pub struct Database {
    pub name: String,
    /// The first upstream host (of several, as libpq lists them) and its port.
    pub host: String,
    pub port: u16,
    /// The hosts tried after the first, in order, and what a host must be to be used.
    pub more_hosts: Vec<(String, u16)>,
    pub target_session_attrs: crate::backend::hosts::TargetSessionAttrs,
    pub dbname: String,
    /// Forced upstream login, else the client's own user.
    pub user: Option<(String, Option<String>)>,
    pub pool_size: usize,
    pub pool_mode: PoolMode,
    /// pgbouncer.ini extras: kept open even when idle (else the global `min_pool_size`) ...
    pub min_pool_size: Option<usize>,
    /// ... run on each new server connection ...
    pub connect_query: Option<String>,
    /// ... startup parameters sent upstream (client_encoding, datestyle, timezone) ...
    pub startup: BTreeMap<String, String>,
    /// ... a server lifetime of its own ...
    pub server_lifetime: Option<Duration>,
    /// ... a reserve pool of its own ...
    pub reserve_pool_size: Option<usize>,
    /// ... and auth_query settings of its own: look secrets up as this user, in that configured database.
    pub auth_user: Option<String>,
    pub auth_dbname: Option<String>,
}

/// A user clients may log in as, with what pgsurge knows of its password.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub secret: Secret,
    pub auth: AuthMethod,
    pub pool_size: Option<usize>,
}

/// The whole validated configuration. Immutable; a reload builds a new one and swaps it in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: String,
    pub admin_listen: Option<String>,
    pub pool_mode: PoolMode,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub max_client_conn: usize,
    pub query_wait_timeout: Duration,
    pub server_connect_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_idle_timeout: Duration,
    pub server_check_delay: Duration,
    /// server_tcp_keepalive / _keepidle / _keepintvl / _keepcnt and tcp_user_timeout.
    pub server_tcp: crate::backend::socket::TcpOpts,
    pub client_login_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub auth_type: AuthMethod,
    pub max_message_size: usize,
    pub max_prepared_statements: usize,
    pub workers: usize,
    pub own_session: bool,
    pub log_format: LogFormat,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    /// auth_query: (user, password) pgsurge looks secrets up as; None disables the lookup.
    pub auth_user: Option<(String, Option<String>)>,
    pub auth_query: String,
    pub client_tls_mode: crate::tls::ClientTlsMode,
    pub client_tls: Option<crate::tls::Shared<rustls::ServerConfig>>,
    pub server_tls: crate::tls::ServerTls,
    pub databases: BTreeMap<String, Database>,
    pub users: BTreeMap<String, User>,
    /// Rate limits, connection caps, fairness and timeouts (src/limit).
    pub limits: crate::limit::LimitConfig,
    /// The read cache (src/cache).
    pub cache: crate::cache::config::CacheConfig,
    /// The N+1 batcher (src/batch).
    pub batch: crate::cache::config::BatchConfig,
    /// The slow lane (backend/lane.rs): runs averaging over this are slow (zero: no lane) ...
    pub slow_query_threshold: Duration,
    /// ... and may hold this share of each pool's server connections (at least one).
    pub slow_pool_share: f64,
    /// Extra server connections per pool for clients that waited `reserve_pool_timeout` (0: none).
    pub reserve_pool_size: usize,
    pub reserve_pool_timeout: Duration,
    /// Directory of the Unix-domain socket `.s.PGSQL.<port>` (None: TCP only).
    pub unix_socket_dir: Option<std::path::PathBuf>,
    /// Log lines are appended here too (PgBouncer's `logfile`).
    pub logfile: Option<std::path::PathBuf>,
    /// The process id is written here at start.
    pub pidfile: Option<std::path::PathBuf>,
    /// Keys of a pgbouncer.ini read but not applied, with why.
    pub ignored: Vec<String>,
    /// Redis shared by the instances (`redis_url`): global rate limits and the shared cache tier (src/redis.rs).
    pub redis: Option<crate::redis::RedisConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Config {
    /// Server connections pgsurge may open at most, estimated for the open-files check: every database's pool for
    /// each configured user (one when none is configured or the database forces its login user).
    pub fn server_conn_estimate(&self) -> usize {
        let users = self.users.len().max(1);
        let biggest_user_pool = self.users.values().filter_map(|u| u.pool_size).max().unwrap_or(0);
        let per_db = |d: &Database| match d.user {
            Some(_) => d.pool_size,
            None => d.pool_size.max(biggest_user_pool) * users,
        };
        self.databases.values().map(per_db).sum::<usize>().max(self.pool_size)
    }

    /// Reads the file named by `cli.config` (if any) under the flags/env already in `cli`, and builds.
    pub fn load(cli: Settings) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        Config::build(cli.layer(file))
    }

    /// Defaults, validation and resolution of databases and users.
    pub fn build(s: Settings) -> Result<Config, ConfigError> {
        let pool_mode = parse_pool_mode(s.pool_mode.as_deref().unwrap_or("transaction"))?;
        let pool_size = s.pool_size.unwrap_or(20);
        if pool_size == 0 {
            return Err(bad("pool_size must be at least 1"));
        }
        let min_pool_size = s.min_pool_size.unwrap_or(0);
        if min_pool_size > pool_size {
            return Err(bad(format!("min_pool_size {min_pool_size} is larger than pool_size {pool_size}")));
        }
        let auth_type = parse_auth(s.auth_type.as_deref().unwrap_or("scram-sha-256"))?;
        let log_format = match s.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            o => return Err(bad(format!("log_format must be text or json, not {o:?}"))),
        };
        let max_message_size = s.max_message_size.unwrap_or(256 << 20);
        if !(1024..=1 << 30).contains(&max_message_size) {
            return Err(bad("max_message_size must be between 1024 bytes and 1 GiB (Postgres' own limit)"));
        }
        let listen = s.listen.clone().unwrap_or_else(|| "127.0.0.1:6432".into());
        check_addr("listen", &listen)?;
        let admin_listen = match s.admin_listen.clone() {
            Some(a) if a.is_empty() => None,
            Some(a) => Some(a),
            None => Some("127.0.0.1:9930".into()),
        };
        if let Some(a) = &admin_listen {
            check_addr("admin_listen", a)?;
        }

        let upstream = s.upstream.as_deref().map(UpstreamUrl::parse).transpose().map_err(bad)?;
        let attrs = network::upstream_attrs(s.target_session_attrs.as_deref())?;
        let server_tcp = network::server_tcp(&s)?;
        let (client_tls_mode, client_tls) = client_tls(&s)?;
        let server_tls = server_tls(&s, upstream.as_ref().and_then(|u| u.sslmode.as_deref()))?;

        let mut users = BTreeMap::new();
        let mut databases = BTreeMap::new();
        if let Some(u) = upstream {
            users.insert(
                u.user.clone(),
                User { name: u.user.clone(), secret: Secret::from_config(&u.password), auth: auth_type, pool_size: None },
            );
            databases.insert(
                u.dbname.clone(),
                Database {
                    name: u.dbname.clone(),
                    host: u.host,
                    port: u.port,
                    more_hosts: u.more_hosts,
                    target_session_attrs: u.target_session_attrs.unwrap_or(attrs),
                    dbname: u.dbname,
                    user: None,
                    pool_size,
                    pool_mode,
                    min_pool_size: None,
                    connect_query: None,
                    startup: BTreeMap::new(),
                    server_lifetime: None,
                    auth_user: None,
                    auth_dbname: None,
                    reserve_pool_size: None,
                },
            );
        }
        if let Some(path) = &s.auth_file {
            let text = std::fs::read_to_string(path).map_err(|e| bad(format!("auth_file {}: {e}", path.display())))?;
            for (name, pw) in parse_auth_file(&text).map_err(|e| bad(format!("auth_file {}: {e}", path.display())))? {
                users.insert(name.clone(), User { name, secret: Secret::from_config(&pw), auth: auth_type, pool_size: None });
            }
        }
        // pgbouncer.ini [users]: pool settings for a user that logs in as auth_file/auth_query say.
        for (name, u) in &s.ini_users {
            if let Some(known) = users.get_mut(name) {
                known.pool_size = u.pool_size.or(known.pool_size);
            }
        }
        for (name, u) in &s.users {
            let auth = match &u.auth_type {
                Some(a) => parse_auth(a)?,
                None => auth_type,
            };
            let secret = match &u.password {
                Some(p) => Secret::from_config(p),
                None => users.get(name).map(|x: &User| x.secret.clone()).unwrap_or(Secret::None),
            };
            if secret == Secret::None && auth != AuthMethod::Trust {
                return Err(bad(format!("users.{name}: no password, and auth_type is not trust")));
            }
            users.insert(name.clone(), User { name: name.clone(), secret, auth, pool_size: u.pool_size });
        }
        for (name, d) in &s.databases {
            let default_host = databases.values().next().map(|x: &Database| (x.host.clone(), x.port));
            let (host, port, more_hosts) = network::database_hosts(name, d, default_host)?;
            let db_mode = match &d.pool_mode {
                Some(m) => parse_pool_mode(m)?,
                None => pool_mode,
            };
            let target_session_attrs = match &d.target_session_attrs {
                Some(a) => network::upstream_attrs(Some(a)).map_err(|e| bad(format!("databases.{name}.{}", e.0)))?,
                None => attrs,
            };
            databases.insert(
                name.clone(),
                Database {
                    name: name.clone(),
                    host,
                    port,
                    more_hosts,
                    target_session_attrs,
                    dbname: d.dbname.clone().unwrap_or_else(|| name.clone()),
                    user: d.user.clone().map(|u| (u, d.password.clone())),
                    pool_size: d.pool_size.unwrap_or(pool_size),
                    pool_mode: db_mode,
                    min_pool_size: d.min_pool_size,
                    connect_query: d.connect_query.clone(),
                    startup: d.startup.clone(),
                    server_lifetime: d.server_lifetime.map(|x| x.0),
                    auth_user: d.auth_user.clone(),
                    auth_dbname: d.auth_dbname.clone(),
                    reserve_pool_size: d.reserve_pool_size,
                },
            );
        }
        if databases.is_empty() {
            return Err(bad("no upstream: give --upstream postgres://USER:PASS@HOST:PORT/DB or a [databases] section"));
        }
        if users.is_empty() {
            return Err(bad("no users: give --upstream with a user and password, --auth-file, or [users] sections"));
        }
        let limits = crate::limit::LimitConfig::build(&client_caps(&s))?;
        let cache_flags =
            crate::cache::config::CacheFlags { enabled: s.cache_flag, ttl: s.cache_ttl, notify: s.cache_notify, redis: s.cache_redis };
        let redis = match s.redis_url.as_deref().filter(|u| !u.is_empty()) {
            Some(u) => Some(
                crate::redis::RedisConfig::build(u, s.redis_timeout.map(|d| d.0), s.redis_prefix.as_deref())
                    .and_then(|r| r.with_tls_ca(s.redis_tls_ca_file.as_deref()))
                    .map_err(bad)?,
            ),
            None => None,
        };
        let cache = crate::cache::config::CacheConfig::build(&s.cache, cache_flags).map_err(bad)?;
        if cache.redis && redis.is_none() {
            return Err(bad("cache.redis (--cache-redis) needs redis_url (--redis)"));
        }
        let batch = crate::cache::config::BatchConfig::build(&s.batch, s.batch_flag).map_err(bad)?;
        let slow_pool_share = s.slow_pool_share.unwrap_or(0.5);
        if !(slow_pool_share > 0.0 && slow_pool_share <= 1.0) {
            return Err(bad(format!("slow_pool_share must be more than 0 and at most 1, not {slow_pool_share}")));
        }
        Ok(Config {
            slow_query_threshold: s.slow_query_threshold.map(|d| d.0).unwrap_or_default(),
            slow_pool_share,
            redis,
            limits,
            cache,
            batch,
            listen,
            admin_listen,
            pool_mode,
            pool_size,
            min_pool_size,
            max_client_conn: s.max_client_conn.unwrap_or(10_000),
            query_wait_timeout: s.query_wait_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
            server_connect_timeout: s.server_connect_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
            server_lifetime: s.server_lifetime.map(|d| d.0).unwrap_or(Duration::from_secs(3600)),
            server_idle_timeout: s.server_idle_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(600)),
            server_check_delay: s.server_check_delay.map(|d| d.0).unwrap_or(Duration::from_secs(1)),
            server_tcp,
            client_login_timeout: s.client_login_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(10)),
            shutdown_timeout: s.shutdown_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
            auth_type,
            max_message_size,
            max_prepared_statements: s.max_prepared_statements.unwrap_or(256).max(1),
            workers: s.workers.unwrap_or(0),
            own_session: s.own_session.unwrap_or(true),
            log_format,
            admin_users: list(&s.admin_users),
            stats_users: list(&s.stats_users),
            auth_user: s.auth_user.clone().filter(|u| !u.is_empty()).map(|u| (u, s.auth_password.clone())),
            auth_query: s.auth_query.clone().unwrap_or_else(|| DEFAULT_AUTH_QUERY.into()),
            client_tls_mode,
            client_tls,
            server_tls,
            databases,
            users,
            unix_socket_dir: s.unix_socket_dir.as_deref().filter(|d| !d.is_empty()).map(std::path::PathBuf::from),
            logfile: s.logfile.clone(),
            reserve_pool_size: s.reserve_pool_size.unwrap_or(0),
            reserve_pool_timeout: s.reserve_pool_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
            pidfile: s.pidfile.clone(),
            ignored: s.ignored.clone(),
        })
    }

    /// Where the Unix-domain socket lives: `<unix_socket_dir>/.s.PGSQL.<listen port>`.
    pub fn unix_socket_path(&self) -> Option<std::path::PathBuf> {
        let port = self.listen.rsplit(':').next()?;
        Some(self.unix_socket_dir.as_ref()?.join(format!(".s.PGSQL.{port}")))
    }
}

/// PgBouncer's client caps (`max_db_client_connections`, `max_user_client_connections`, global and per
/// database/user) are connection caps of the `[limits]` table; one written there wins.
fn client_caps(s: &Settings) -> Settings {
    let mut s = s.clone();
    let l = &mut s.limits;
    if let Some(n) = s.max_db_client_connections.filter(|n| *n > 0) {
        l.per_database.max_connections.get_or_insert(n);
    }
    if let Some(n) = s.max_user_client_connections.filter(|n| *n > 0) {
        l.per_user.max_connections.get_or_insert(n);
    }
    for (name, d) in &s.databases {
        if let Some(n) = d.max_db_client_connections.filter(|n| *n > 0) {
            l.databases.entry(name.clone()).or_default().max_connections.get_or_insert(n);
        }
    }
    for (name, u) in &s.ini_users {
        if let Some(n) = u.max_user_client_connections.filter(|n| *n > 0) {
            l.users.entry(name.clone()).or_default().max_connections.get_or_insert(n);
        }
    }
    s
}

/// PgBouncer's default lookup; needs a superuser, or use a SECURITY DEFINER function (see README).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";

type ClientTls = (crate::tls::ClientTlsMode, Option<crate::tls::Shared<rustls::ServerConfig>>);

fn client_tls(s: &Settings) -> Result<ClientTls, ConfigError> {
    use crate::tls::ClientTlsMode as M;
    let config = match (&s.client_tls_cert, &s.client_tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::Shared(std::sync::Arc::new(crate::tls::server_config(c, k).map_err(bad)?))),
        (None, None) => None,
        _ => return Err(bad("client_tls_cert and client_tls_key go together")),
    };
    let mode = match s.client_tls_mode.as_deref() {
        None => {
            if config.is_some() {
                M::Allow
            } else {
                M::Disable
            }
        }
        Some("disable") => M::Disable,
        Some("allow") => M::Allow,
        Some("require") => M::Require,
        Some(o) => return Err(bad(format!("client_tls_mode must be disable, allow or require, not {o:?}"))),
    };
    if mode != M::Disable && config.is_none() {
        return Err(bad("client_tls_mode allow/require needs client_tls_cert and client_tls_key"));
    }
    Ok((mode, config))
}

/// `server_tls_mode`, or the upstream URL's `sslmode` standing in for it.
fn server_tls(s: &Settings, url_sslmode: Option<&str>) -> Result<crate::tls::ServerTls, ConfigError> {
    let name = match (s.server_tls_mode.as_deref(), url_sslmode) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(format!("server_tls_mode is {a:?} but the upstream URL says sslmode={b}: keep one")));
        }
        (a, b) => a.or(b).unwrap_or("prefer"),
    };
    let mode = crate::tls::SslMode::parse(name)
        .ok_or_else(|| bad(format!("server_tls_mode must be disable, prefer, require, verify-ca or verify-full, not {name:?}")))?;
    let config = crate::tls::client_config(mode, s.server_tls_ca_file.as_deref()).map_err(bad)?;
    Ok(crate::tls::ServerTls { mode, config: config.map(|c| crate::tls::Shared(std::sync::Arc::new(c))) })
}

/// A comma-separated list of names.
fn list(s: &Option<String>) -> Vec<String> {
    s.as_deref().unwrap_or("").split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    if ini::is_ini(&text) {
        let ini = ini::read(path)?;
        let mut s = ini.settings;
        s.ignored = ini.ignored;
        return Ok(s);
    }
    toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
}

fn parse_pool_mode(s: &str) -> Result<PoolMode, ConfigError> {
    match s {
        "transaction" => Ok(PoolMode::Transaction),
        "session" => Ok(PoolMode::Session),
        o => Err(bad(format!("pool_mode must be transaction or session, not {o:?}"))),
    }
}

fn parse_auth(s: &str) -> Result<AuthMethod, ConfigError> {
    match s {
        "scram-sha-256" => Ok(AuthMethod::ScramSha256),
        "md5" => Ok(AuthMethod::Md5),
        "trust" => Ok(AuthMethod::Trust),
        o => Err(bad(format!("auth_type must be scram-sha-256, md5 or trust, not {o:?}"))),
    }
}

fn check_addr(key: &str, a: &str) -> Result<(), ConfigError> {
    a.parse::<SocketAddr>().map(|_| ()).map_err(|e| bad(format!("{key} {a:?} is not HOST:PORT with a numeric IP: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_upstream() -> Settings {
        Settings { upstream: Some("postgres://app:secret@127.0.0.1:5433/appdb".into()), ..Default::default() }
    }

    #[test]
    fn upstream_alone_gives_one_database_and_its_user() {
        let c = Config::build(with_upstream()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6432");
        assert_eq!(c.pool_mode, PoolMode::Transaction);
        let db = &c.databases["appdb"];
        assert_eq!((db.host.as_str(), db.port, db.pool_size), ("127.0.0.1", 5433, 20));
        assert_eq!(c.users["app"].secret, Secret::Plain("secret".into()));
        assert_eq!((c.slow_query_threshold, c.slow_pool_share), (Duration::ZERO, 0.5), "the slow lane is off by default");
    }

    #[test]
    fn sslmode_in_the_upstream_url_is_server_tls_mode_unless_they_disagree() {
        let url = |q: &str| Settings { upstream: Some(format!("postgres://app:pw@127.0.0.1:5433/appdb?{q}")), ..Default::default() };
        let c = Config::build(url("sslmode=disable")).unwrap();
        assert_eq!(c.server_tls.mode, crate::tls::SslMode::Disable);
        let both = Settings { server_tls_mode: Some("require".into()), ..url("sslmode=disable") };
        let e = Config::build(both).unwrap_err();
        assert!(e.to_string().contains("server_tls_mode"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = Settings { pool_size: Some(3), ..with_upstream() };
        let file: Settings = toml::from_str("pool_size = 7\nquery_wait_timeout = \"2s\"").unwrap();
        let c = Config::build(flags.layer(file)).unwrap();
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.query_wait_timeout, Duration::from_secs(2));
    }

    #[test]
    fn nonsense_is_refused_with_the_key_named() {
        let e = Config::build(Settings { pool_mode: Some("statement-ish".into()), ..with_upstream() }).unwrap_err();
        assert!(e.to_string().contains("pool_mode"), "{e}");
        for share in [0.0, 1.5, -0.2, f64::NAN] {
            let e = Config::build(Settings { slow_pool_share: Some(share), ..with_upstream() }).unwrap_err();
            assert!(e.to_string().contains("slow_pool_share"), "{e}");
        }
        let e = toml::from_str::<Settings>("pool_sise = 3").unwrap_err();
        assert!(e.to_string().contains("pool_sise"), "{e}");
        assert!(Config::build(Settings::default()).is_err());
    }
}
