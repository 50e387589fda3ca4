//! Coming from PgBouncer: pgsurge started from a pgbouncer.ini, clients and the console on the Unix socket
//! `.s.PGSQL.<port>`, and the console commands PgBouncer users script against, against a real Postgres.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgsurge::config::{Config, Settings};
use pgsurge::App;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, connect, eventually, pg, try_connect};

/// pgsurge running from a pgbouncer.ini written for this test, with its Unix socket in the test's directory.
struct Bouncer {
    app: Arc<App>,
    port: u16,
    dir: PathBuf,
    ini: PathBuf,
}

impl Bouncer {
    /// `databases`: the `[databases]` lines; `extra`: more `[pgbouncer]` lines.
    async fn start(databases: &str, extra: &str) -> Bouncer {
        let filter = tracing_subscriber::EnvFilter::try_from_env("PGSURGE_LOG").unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let dir = std::env::temp_dir().join(format!("pgsurge-pgb-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("userlist.txt"), "\"app\" \"app\"\n").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ini = dir.join("pgbouncer.ini");
        let text = format!(
            "[databases]\n{databases}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {dir}\n\
             auth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\npool_mode = transaction\ndefault_pool_size = 4\n\
             logfile = {dir}/pgbouncer.log\ntcp_defer_accept = 1\n{extra}\n",
            dir = dir.display()
        );
        std::fs::write(&ini, text).unwrap();
        let settings = Settings { config: Some(ini.clone()), ..Default::default() };
        let config = Config::load(settings.clone()).expect("the ini starts pgsurge");
        assert!(config.ignored.iter().any(|n| n.starts_with("tcp_defer_accept")), "an unimplemented key is named: {:?}", config.ignored);
        let path = config.unix_socket_path().expect("a unix socket");
        let unix = pgsurge::frontend::unix::bind(&path).unwrap();
        let app = App::new(config);
        app.set_settings(settings);
        tokio::spawn(pgsurge::serve_with_unix(app.clone(), listener, None, Some((unix, path))));
        Bouncer { app, port, dir, ini }
    }

    fn upstream() -> String {
        format!("host=127.0.0.1 port={} dbname=app", pg().port)
    }

    /// `user` to `db` over the Unix socket.
    fn unix_url(&self, user: &str, db: &str) -> String {
        format!("host={} port={} user={user} password=app dbname={db}", self.dir.display(), self.port)
    }

    fn tcp_url(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} password=app dbname={db}", self.port)
    }

    /// The console, as PgBouncer's own tools reach it: user `pgbouncer` over the socket, let in by its OS user.
    async fn console(&self) -> Client {
        connect(&self.unix_url("pgbouncer", "pgbouncer")).await
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        self.app.shutdown_now();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn show(c: &Client, sql: &str) -> Vec<HashMap<String, String>> {
    let mut rows = vec![];
    for m in c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) {
        if let SimpleQueryMessage::Row(r) = m {
            let cols = r.columns().iter().enumerate();
            rows.push(cols.map(|(i, col)| (col.name().to_string(), r.get(i).unwrap_or("").to_string())).collect());
        }
    }
    rows
}

async fn backend_pid(c: &Client) -> String {
    match &c.simple_query("SELECT pg_backend_pid()").await.unwrap()[1] {
        SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
        _ => panic!("no row"),
    }
}

#[tokio::test]
async fn the_unix_socket_serves_clients_and_the_console_as_pgbouncer() {
    let b = Bouncer::start(&format!("app = {}", Bouncer::upstream()), "").await;
    let c = connect(&b.unix_url("app", "app")).await;
    c.simple_query("SELECT 1").await.unwrap();
    let console = b.console().await;
    let version = show(&console, "SHOW VERSION").await;
    assert!(version[0]["version"].starts_with("pgsurge "), "{version:?}");
    // Over TCP `pgbouncer` is nobody in particular: not a known user, so its login fails.
    let e = try_connect(&b.tcp_url("pgbouncer", "pgbouncer")).await.expect_err("refused over TCP");
    assert_eq!(code(&e), "28P01");
}

#[tokio::test]
async fn set_applies_one_key_and_reload_rereads_the_ini() {
    let b = Bouncer::start(&format!("app = {}", Bouncer::upstream()), "").await;
    let console = b.console().await;
    console.simple_query("SET default_pool_size = 3").await.unwrap();
    let dbs = show(&console, "SHOW DATABASES").await;
    let app = dbs.iter().find(|r| r["name"] == "app").expect("app is listed");
    assert_eq!(app["pool_size"], "3");
    assert!(dbs.iter().any(|r| r["name"] == "pgbouncer"), "the console database is listed");
    let e = console.simple_query("SET server_lifetime = soon").await.expect_err("a bad value is refused");
    assert_eq!(code(&e), "F0000");
    // RELOAD re-reads the ini: a new database appears.
    let text =
        std::fs::read_to_string(&b.ini).unwrap().replace("[databases]\n", &format!("[databases]\nother = {}\n", Bouncer::upstream()));
    std::fs::write(&b.ini, text).unwrap();
    console.simple_query("RELOAD").await.unwrap();
    let c = connect(&b.tcp_url("app", "other")).await;
    c.simple_query("SELECT 1").await.unwrap();
    // A broken file is refused and the running configuration stays.
    std::fs::write(&b.ini, "[pgbouncer]\nserver_lifetime = invalid\n").unwrap();
    let e = console.simple_query("RELOAD").await.expect_err("a broken file is refused");
    assert_eq!(code(&e), "F0000");
    connect(&b.tcp_url("app", "other")).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn kill_kill_client_reconnect_wait_close_disable_and_enable() {
    let b = Bouncer::start(&format!("app = {}\n", Bouncer::upstream()), "").await;
    let console = b.console().await;
    let c1 = connect(&b.tcp_url("app", "app")).await;
    let pid1 = backend_pid(&c1).await;
    console.simple_query("RECONNECT app").await.unwrap();
    console.simple_query("WAIT_CLOSE app").await.unwrap();
    assert_ne!(backend_pid(&c1).await, pid1, "RECONNECT closed the server connection; a new one serves the client");

    let clients = show(&console, "SHOW CLIENTS").await;
    let id = clients.iter().find(|r| r["database"] == "app").expect("the client is listed")["id"].clone();
    console.simple_query(&format!("KILL_CLIENT {id}")).await.unwrap();
    assert!(c1.simple_query("SELECT 1").await.is_err(), "the killed client is gone");
    assert_eq!(code(&console.simple_query("KILL_CLIENT 999999").await.err().unwrap()), "08P01");
    assert_eq!(code(&console.simple_query("KILL_CLIENT nonsense").await.err().unwrap()), "08P01");

    let c2 = connect(&b.tcp_url("app", "app")).await;
    console.simple_query("KILL app").await.unwrap();
    assert!(c2.simple_query("SELECT 1").await.is_err(), "KILL closed the database's clients");
    let e = console.simple_query("KILL nosuchdb").await.err().unwrap();
    assert_eq!(code(&e), "08P01");

    console.simple_query("DISABLE app").await.unwrap();
    let e = try_connect(&b.tcp_url("app", "app")).await.expect_err("a disabled database refuses clients");
    assert_eq!(code(&e), "57P03");
    console.simple_query("ENABLE app").await.unwrap();
    connect(&b.tcp_url("app", "app")).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn the_shows_pgbouncer_tools_read_answer_with_their_columns() {
    let b = Bouncer::start(&format!("app = {}", Bouncer::upstream()), "").await;
    let c = connect(&b.tcp_url("app", "app")).await;
    c.simple_query("SELECT 1").await.unwrap();
    let console = b.console().await;
    for (cmd, col) in [
        ("SHOW STATE", "key"),
        ("SHOW TOTALS", "name"),
        ("SHOW STATS_TOTALS", "xact_count"),
        ("SHOW STATS_AVERAGES", "query_count"),
        ("SHOW MEM", "memtotal"),
        ("SHOW SOCKETS", "id"),
        ("SHOW USERS", "max_user_client_connections"),
        ("SHOW DATABASES", "current_client_connections"),
    ] {
        let rows = show(&console, cmd).await;
        assert!(rows.first().is_some_and(|r| r.contains_key(col)), "{cmd} has {col}: {rows:?}");
    }
    for cmd in ["SHOW FDS", "SHOW PEERS", "SHOW PEER_POOLS", "SHOW DNS_HOSTS", "SHOW DNS_ZONES", "SHOW ACTIVE_SOCKETS"] {
        show(&console, cmd).await;
    }
    let totals = show(&console, "SHOW TOTALS").await;
    assert!(totals.iter().any(|r| r["name"] == "total_xact_count" && r["value"] != "0"), "{totals:?}");
}

#[tokio::test]
async fn suspend_is_served_as_pause_and_resume_ends_it() {
    let b = Bouncer::start(&format!("app = {}", Bouncer::upstream()), "").await;
    let console = b.console().await;
    let c = connect(&b.tcp_url("app", "app")).await;
    c.simple_query("SELECT 1").await.unwrap();
    console.simple_query("SUSPEND").await.unwrap();
    let state = show(&console, "SHOW STATE").await;
    assert!(state.iter().any(|r| r["key"] == "paused" && r["value"] == "yes"), "{state:?}");
    let q = tokio::spawn(async move { c.simple_query("SELECT 1").await.map(|_| ()) });
    console.simple_query("RESUME").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), q).await.expect("the query ran after RESUME").unwrap().unwrap();
}

#[tokio::test]
async fn the_star_entry_serves_databases_not_listed() {
    let b = Bouncer::start(&format!("* = host=127.0.0.1 port={}", pg().port), "").await;
    let c = connect(&b.tcp_url("app", "app")).await;
    assert!(eventually(Duration::from_secs(5), || async { c.simple_query("SELECT 1").await.is_ok() }).await);
}
