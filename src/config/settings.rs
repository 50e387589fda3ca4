//! The raw, layered settings: one struct read from flags, environment (`PGSURGE_…`) and the TOML file.
//!
//! Every field is optional here; `Settings::layer` stacks flag > env > file, and `Config::build` fills defaults
//! and validates. clap handles flag > env itself, so only the file layer is merged by hand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// A duration written as `30s`, `250ms`, `5m` in flags, env and the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        humantime::parse_duration(s).map(Dur).map_err(|e| format!("invalid duration {s:?}: {e} (write e.g. 30s, 250ms, 5m)"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

macro_rules! settings {
    ($( $(#[$meta:meta])* $name:ident : $ty:ty ),* $(,)?) => {
        /// Flags and environment variables; the same names (with `_`) are the keys of config.toml.
        #[derive(Debug, Default, Clone, Parser, Deserialize)]
        #[command(name = "pgsurge", version, about = "A surge protector for PostgreSQL: pooling, caching, batching and rate limits")]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $( $(#[$meta])* pub $name: Option<$ty>, )*
            /// `[databases.NAME]` sections (file only).
            #[arg(skip)]
            #[serde(default)]
            pub databases: BTreeMap<String, DatabaseSettings>,
            /// `[users.NAME]` sections (file only).
            #[arg(skip)]
            #[serde(default)]
            pub users: BTreeMap<String, UserSettings>,
            /// `[cache]` table (file only; `--cache` below switches it on).
            #[arg(skip)]
            #[serde(default)]
            pub cache: crate::cache::config::CacheSettings,
            /// Serve repeated reads from the read cache (same as `[cache] enabled = true`).
            #[arg(long = "cache", env = "PGSURGE_CACHE", num_args = 0..=1, default_missing_value = "true")]
            #[serde(skip)]
            pub cache_flag: Option<bool>,
            /// How long a cached read may be served (same as `[cache] default_ttl`), e.g. 10s.
            #[arg(long = "cache-ttl", env = "PGSURGE_CACHE_TTL")]
            #[serde(skip)]
            pub cache_ttl: Option<Dur>,
            /// Share invalidations with other instances through Postgres LISTEN/NOTIFY (same as `[cache] notify`).
            #[arg(long = "cache-notify", env = "PGSURGE_CACHE_NOTIFY", num_args = 0..=1, default_missing_value = "true")]
            #[serde(skip)]
            pub cache_notify: Option<bool>,
            /// Keep the read cache's entries in Redis too, shared by every instance (same as `[cache] redis`; needs --redis).
            #[arg(long = "cache-redis", env = "PGSURGE_CACHE_REDIS", num_args = 0..=1, default_missing_value = "true")]
            #[serde(skip)]
            pub cache_redis: Option<bool>,
            /// `[batch]` table (file only; `--batch` below switches it on).
            #[arg(skip)]
            #[serde(default)]
            pub batch: crate::cache::config::BatchSettings,
            /// Merge concurrent point lookups into one query (same as `[batch] enabled = true`).
            #[arg(long = "batch", env = "PGSURGE_BATCH", num_args = 0..=1, default_missing_value = "true")]
            #[serde(skip)]
            pub batch_flag: Option<bool>,
            /// `[limits]` table (file only): see src/limit/config.rs and README.md.
            #[arg(skip)]
            #[serde(default)]
            pub limits: crate::limit::LimitSettings,
            /// pgbouncer.ini `[users]` lines (file only).
            #[arg(skip)]
            #[serde(skip)]
            pub ini_users: BTreeMap<String, IniUser>,
            /// Keys of a pgbouncer.ini that were read but not applied, with why (logged once; not a key).
            #[arg(skip)]
            #[serde(skip)]
            pub ignored: Vec<String>,
            /// Subcommand (`demo`); not a config key.
            #[command(subcommand)]
            #[serde(skip)]
            pub command: Option<Command>,
        }

        impl Settings {
            /// Fills every unset field of `self` from `lower`.
            pub fn layer(mut self, lower: Settings) -> Settings {
                $( if self.$name.is_none() { self.$name = lower.$name; } )*
                if self.databases.is_empty() { self.databases = lower.databases; }
                if self.users.is_empty() { self.users = lower.users; }
                if self.limits == Default::default() { self.limits = lower.limits; }
                if self.cache == Default::default() { self.cache = lower.cache; }
                if self.cache_flag.is_none() { self.cache_flag = lower.cache_flag; }
                if self.cache_ttl.is_none() { self.cache_ttl = lower.cache_ttl; }
                if self.cache_notify.is_none() { self.cache_notify = lower.cache_notify; }
                if self.cache_redis.is_none() { self.cache_redis = lower.cache_redis; }
                if self.batch == Default::default() { self.batch = lower.batch; }
                if self.batch_flag.is_none() { self.batch_flag = lower.batch_flag; }
                self.ignored.extend(lower.ignored);
                if self.ini_users.is_empty() { self.ini_users = lower.ini_users; }
                self
            }
        }
    };
}

settings! {
    /// Postgres to pool: postgres://USER:PASS@HOST:PORT/DB (a Unix socket: postgres://USER:PASS@/DB?host=/dir).
    /// Its user logs clients in with the same password.
    #[arg(long, env = "PGSURGE_UPSTREAM")]
    upstream: String,
    /// Address clients connect to.
    #[arg(long, env = "PGSURGE_LISTEN")]
    listen: String,
    /// HTTP address for /metrics, /healthz, /readyz ("" disables).
    #[arg(long, env = "PGSURGE_ADMIN_LISTEN")]
    admin_listen: String,
    /// A TOML file with any of these keys (see config.toml).
    #[arg(long, env = "PGSURGE_CONFIG")]
    #[serde(skip)]
    config: PathBuf,
    /// transaction | session.
    #[arg(long, env = "PGSURGE_POOL_MODE")]
    pool_mode: String,
    /// Server connections per (database, user) pool.
    #[arg(long, env = "PGSURGE_POOL_SIZE")]
    pool_size: usize,
    /// Server connections kept open per pool even when idle.
    #[arg(long, env = "PGSURGE_MIN_POOL_SIZE")]
    min_pool_size: usize,
    /// Client connections accepted at once.
    #[arg(long, env = "PGSURGE_MAX_CLIENT_CONN")]
    max_client_conn: usize,
    /// How long a client waits for a server connection before ERROR 53300.
    #[arg(long, env = "PGSURGE_QUERY_WAIT_TIMEOUT")]
    query_wait_timeout: Dur,
    /// Time allowed to open and log in a server connection.
    #[arg(long, env = "PGSURGE_SERVER_CONNECT_TIMEOUT")]
    server_connect_timeout: Dur,
    /// Server connections older than this are closed when released.
    #[arg(long, env = "PGSURGE_SERVER_LIFETIME")]
    server_lifetime: Dur,
    /// Idle server connections are closed after this.
    #[arg(long, env = "PGSURGE_SERVER_IDLE_TIMEOUT")]
    server_idle_timeout: Dur,
    /// A server connection idle longer than this is checked for liveness before reuse.
    #[arg(long, env = "PGSURGE_SERVER_CHECK_DELAY")]
    server_check_delay: Dur,
    /// TCP keepalive on server connections, so a vanished peer is noticed while idle: true | false (default true).
    #[arg(long, env = "PGSURGE_SERVER_TCP_KEEPALIVE", num_args = 0..=1, default_missing_value = "true")]
    server_tcp_keepalive: bool,
    /// Idle time before the first keepalive probe (default 30s; whole seconds).
    #[arg(long, env = "PGSURGE_SERVER_TCP_KEEPIDLE")]
    server_tcp_keepidle: Dur,
    /// Time between keepalive probes (default 10s; whole seconds).
    #[arg(long, env = "PGSURGE_SERVER_TCP_KEEPINTVL")]
    server_tcp_keepintvl: Dur,
    /// Unanswered keepalive probes before a server connection is dropped (default 3).
    #[arg(long, env = "PGSURGE_SERVER_TCP_KEEPCNT")]
    server_tcp_keepcnt: u32,
    /// Linux TCP_USER_TIMEOUT of server connections: data unacknowledged this long drops them (default 60s; 0: OS default).
    #[arg(long, env = "PGSURGE_TCP_USER_TIMEOUT")]
    tcp_user_timeout: Dur,
    /// After query_timeout sends a cancel, how long the server has to end the statement before pgsurge closes
    /// its connection and the client gets FATAL 57014 (default 1s).
    #[arg(long, env = "PGSURGE_QUERY_CANCEL_TIMEOUT")]
    query_cancel_timeout: Dur,
    /// Which of several upstream hosts to use, as libpq: any | read-write | read-only | primary | standby | prefer-standby.
    #[arg(long, env = "PGSURGE_TARGET_SESSION_ATTRS")]
    target_session_attrs: String,
    /// A client that has not finished startup and login within this is closed.
    #[arg(long, env = "PGSURGE_CLIENT_LOGIN_TIMEOUT")]
    client_login_timeout: Dur,
    /// On SIGTERM, how long in-flight transactions may take before connections are closed.
    #[arg(long, env = "PGSURGE_SHUTDOWN_TIMEOUT")]
    shutdown_timeout: Dur,
    /// Client authentication: scram-sha-256 | md5 | trust.
    #[arg(long, env = "PGSURGE_AUTH_TYPE")]
    auth_type: String,
    /// PgBouncer-style userlist: "user" "password or SCRAM secret" per line.
    #[arg(long, env = "PGSURGE_AUTH_FILE")]
    auth_file: PathBuf,
    /// Largest client message accepted, in bytes.
    #[arg(long, env = "PGSURGE_MAX_MESSAGE_SIZE")]
    max_message_size: usize,
    /// Named prepared statements kept per server connection (LRU).
    #[arg(long, env = "PGSURGE_MAX_PREPARED_STATEMENTS")]
    max_prepared_statements: usize,
    /// Runtime worker threads (0: 1 on up to 2 cores, else half the cores).
    #[arg(long, env = "PGSURGE_WORKERS")]
    workers: usize,
    /// Start a session of its own (setsid) unless a terminal runs pgsurge in its foreground: true | false.
    #[arg(long, env = "PGSURGE_OWN_SESSION", num_args = 0..=1, default_missing_value = "true")]
    own_session: bool,
    /// text | json.
    #[arg(long, env = "PGSURGE_LOG_FORMAT")]
    log_format: String,
    /// Users allowed every admin console command (comma-separated; they must be known users).
    #[arg(long, env = "PGSURGE_ADMIN_USERS")]
    admin_users: String,
    /// Users allowed the console's SHOW commands only (comma-separated).
    #[arg(long, env = "PGSURGE_STATS_USERS")]
    stats_users: String,
    /// auth_query: the upstream user that looks up the SCRAM secrets of users not in the config.
    #[arg(long, env = "PGSURGE_AUTH_USER")]
    auth_user: String,
    /// Password of `auth_user` (else its entry among the users).
    #[arg(long, env = "PGSURGE_AUTH_PASSWORD")]
    auth_password: String,
    /// The lookup `auth_user` runs; $1 is the user name; returns (name, secret).
    #[arg(long, env = "PGSURGE_AUTH_QUERY")]
    auth_query: String,
    /// PEM certificate chain pgsurge shows clients that ask for TLS.
    #[arg(long, env = "PGSURGE_CLIENT_TLS_CERT")]
    client_tls_cert: PathBuf,
    /// PEM private key of client_tls_cert.
    #[arg(long, env = "PGSURGE_CLIENT_TLS_KEY")]
    client_tls_key: PathBuf,
    /// disable | allow | require (allow when a certificate is given, else disable).
    #[arg(long, env = "PGSURGE_CLIENT_TLS_MODE")]
    client_tls_mode: String,
    /// TLS to Postgres, as libpq's sslmode: disable | prefer | require | verify-ca | verify-full.
    #[arg(long, env = "PGSURGE_SERVER_TLS_MODE", alias = "sslmode")]
    server_tls_mode: String,
    /// PEM CA certificates that verify-ca / verify-full check the server against.
    #[arg(long, env = "PGSURGE_SERVER_TLS_CA_FILE")]
    server_tls_ca_file: PathBuf,
    /// Queries per second each user may run (0: unlimited; more limits in the [limits] table).
    #[arg(long, env = "PGSURGE_LIMIT_QPS_PER_USER")]
    limit_qps_per_user: u32,
    /// Queries per second each client address may run (0: unlimited).
    #[arg(long, env = "PGSURGE_LIMIT_QPS_PER_ADDRESS")]
    limit_qps_per_address: u32,
    /// Default burst of every rate limit (default: one second's worth of the rate).
    #[arg(long, env = "PGSURGE_LIMIT_BURST")]
    limit_burst: u32,
    /// How long a statement over its rate waits for a token before ERROR 53400 (outside transactions).
    #[arg(long, env = "PGSURGE_LIMIT_MAX_DELAY")]
    limit_max_delay: Dur,
    /// Server connections all pools of one database may hold together, shared round-robin (0: no cap).
    #[arg(long, env = "PGSURGE_MAX_DB_CONNECTIONS")]
    max_db_connections: usize,
    /// Server connections all pools of one user may hold together (0: no cap).
    #[arg(long, env = "PGSURGE_MAX_USER_CONNECTIONS")]
    max_user_connections: usize,
    /// Who waits in turn for a shared connection budget: user | address.
    #[arg(long, env = "PGSURGE_FAIRNESS")]
    fairness: String,
    /// pgsurge cancels a statement running longer than this, ERROR 57014 (0: off).
    #[arg(long, env = "PGSURGE_QUERY_TIMEOUT")]
    query_timeout: Dur,
    /// A client idle inside a transaction longer than this gets FATAL 25P03 (0: off).
    #[arg(long, env = "PGSURGE_IDLE_TRANSACTION_TIMEOUT")]
    idle_transaction_timeout: Dur,
    /// Statements whose runs average longer than this are slow and use the slow lane (0: no lane).
    #[arg(long, env = "PGSURGE_SLOW_QUERY_THRESHOLD")]
    slow_query_threshold: Dur,
    /// Share of each pool's server connections slow statements may hold, in (0, 1] (at least one connection).
    #[arg(long, env = "PGSURGE_SLOW_POOL_SHARE")]
    slow_pool_share: f64,
    /// Online restart (PgBouncer's `-R`): ask the running instance on the Unix socket to drain and stop, then take
    /// its place.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip)]
    reboot: bool,
    /// Directory of a Unix-domain socket `.s.PGSQL.<listen port>` clients may connect to as well ("" : none).
    #[arg(long, env = "PGSURGE_UNIX_SOCKET_DIR")]
    unix_socket_dir: String,
    /// Also write the log to this file (appended), as PgBouncer's `logfile`.
    #[arg(long, env = "PGSURGE_LOGFILE")]
    logfile: PathBuf,
    /// Write the process id to this file at start, remove it at exit.
    #[arg(long, env = "PGSURGE_PIDFILE")]
    pidfile: PathBuf,
    /// A client idle outside a transaction longer than this is disconnected, FATAL 57P05 (0: off).
    #[arg(long, env = "PGSURGE_CLIENT_IDLE_TIMEOUT")]
    client_idle_timeout: Dur,
    /// A transaction open longer than this ends its client's connection, FATAL 25P04 (0: off).
    #[arg(long, env = "PGSURGE_TRANSACTION_TIMEOUT")]
    transaction_timeout: Dur,
    /// Extra server connections a pool may open when a client has waited `reserve_pool_timeout` (0: none).
    #[arg(long, env = "PGSURGE_RESERVE_POOL_SIZE")]
    reserve_pool_size: usize,
    /// How long a client waits before the reserve pool may serve it.
    #[arg(long, env = "PGSURGE_RESERVE_POOL_TIMEOUT")]
    reserve_pool_timeout: Dur,
    /// Client connections each database may have at once (0: no cap; per database in [databases]).
    #[arg(long, env = "PGSURGE_MAX_DB_CLIENT_CONNECTIONS")]
    max_db_client_connections: usize,
    /// Client connections each user may have at once (0: no cap; per user in [users]).
    #[arg(long, env = "PGSURGE_MAX_USER_CLIENT_CONNECTIONS")]
    max_user_client_connections: usize,
    /// Redis shared by every instance: global rate limits (and the shared cache tier with --cache-redis).
    /// redis://[user:password@]host:port[/db] or rediss:// (TLS).
    #[arg(long = "redis", env = "PGSURGE_REDIS_URL")]
    redis_url: String,
    /// Longest a request waits for one Redis call before deciding without it (local limits, cache skipped).
    #[arg(long, env = "PGSURGE_REDIS_TIMEOUT")]
    redis_timeout: Dur,
    /// Prefix of every Redis key pgsurge writes.
    #[arg(long, env = "PGSURGE_REDIS_PREFIX")]
    redis_prefix: String,
    /// PEM CA certificates a rediss:// Redis is verified against (default: the system's trust store).
    #[arg(long, env = "PGSURGE_REDIS_TLS_CA_FILE")]
    redis_tls_ca_file: PathBuf,
}

/// Subcommands beside the proxy itself.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Show the five fixes on a throwaway database.
    Demo(DemoArgs),
    /// Install (or --drop) triggers that announce every write to the cache invalidation channel, so instances with
    /// [cache] notify hear of writes that bypass pgsurge.
    InstallTriggers(crate::cache::triggers::TriggerArgs),
}

/// Flags of `pgsurge demo` (the demo itself lives with the binary, src/demo).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Time per workload, split evenly between Postgres directly and pgsurge.
    #[arg(long, default_value = "5s")]
    pub duration: Dur,
    /// Leave the cluster's directory behind (stopped) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Print the results as JSON on stdout and exit, instead of the table and a running pgsurge.
    #[arg(long)]
    pub json: bool,
}

/// `[databases.NAME]`: a client-visible database name mapped to an upstream.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// One host, or several as libpq takes them: `"h1,h2"`.
    pub host: Option<String>,
    /// One port (`5432`), or one per host (`"5432,5433"`).
    pub port: Option<Ports>,
    /// any | read-write | read-only | primary | standby | prefer-standby (default: the top-level key, else any).
    pub target_session_attrs: Option<String>,
    pub dbname: Option<String>,
    /// Log in upstream as this user for every client (else each client logs in as itself).
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: Option<usize>,
    pub pool_mode: Option<String>,
    pub min_pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    /// Server connections all pools of this database may hold together.
    pub max_db_connections: Option<usize>,
    /// Client connections this database may have at once.
    pub max_db_client_connections: Option<usize>,
    /// SQL run on each new server connection of this database.
    pub connect_query: Option<String>,
    /// Startup parameters sent upstream (`client_encoding`, `datestyle`, `timezone`).
    #[serde(default)]
    pub startup: BTreeMap<String, String>,
    /// auth_query for this database's clients: look secrets up as this user (in `auth_dbname`).
    pub auth_user: Option<String>,
    pub auth_dbname: Option<String>,
    pub server_lifetime: Option<Dur>,
}

/// `port` of a `[databases.NAME]` section: a number, or a string of comma-separated numbers (one per host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(u16),
            List(String),
        }
        match Raw::deserialize(d)? {
            Raw::One(p) => Ok(Ports(vec![p])),
            Raw::List(s) => super::upstream::parse_ports(&s).map(Ports).map_err(serde::de::Error::custom),
        }
    }
}

/// `[users.NAME]`: a user clients may log in as.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    /// Plaintext password, md5 hash (`md5…`) or SCRAM secret (`SCRAM-SHA-256$…`).
    pub password: Option<String>,
    /// scram-sha-256 | md5 | trust for this user.
    pub auth_type: Option<String>,
    pub pool_size: Option<usize>,
}

/// A pgbouncer.ini `[users]` line: pool settings only; the user logs in as auth_file/auth_query say.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IniUser {
    pub pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    pub pool_mode: Option<String>,
    /// Server connections all pools of this user may hold together.
    pub max_user_connections: Option<usize>,
    /// Client connections this user may have at once.
    pub max_user_client_connections: Option<usize>,
    /// This user's own timeouts.
    pub query_timeout: Option<Dur>,
    pub idle_transaction_timeout: Option<Dur>,
    pub client_idle_timeout: Option<Dur>,
    pub transaction_timeout: Option<Dur>,
}
