//! Operating pgsurge: the admin console, /metrics and health, reload, pause, and the SIGTERM drain.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pgsurge::config::{Config, Settings, UserSettings};
use pgsurge::{App, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, connect, eventually, pg, try_connect, unique, Proxy};

/// pgsurge with its admin HTTP endpoint, started from `settings` as main does (the config file is read, and
/// kept for RELOAD); the handle ends when pgsurge has stopped.
struct Ops {
    proxy: Proxy,
    http: SocketAddr,
    run: JoinHandle<std::io::Result<()>>,
}

async fn start(mut settings: Settings) -> Ops {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    settings.upstream.get_or_insert_with(|| pg().app_url.clone());
    settings.listen = Some("127.0.0.1:0".into());
    settings.admin_listen = Some("127.0.0.1:0".into());
    let config = Config::load(settings.clone()).expect("valid test config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, http) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
    let app = App::new(config);
    app.set_settings(settings);
    let run = tokio::spawn(pgsurge::serve(app.clone(), listener, Some(admin)));
    Ops { proxy: Proxy { app, addr }, http, run }
}

fn admins(users: &str) -> Settings {
    Settings { admin_users: Some(users.into()), ..Default::default() }
}

async fn console(p: &Proxy, user: &str, password: &str) -> Client {
    connect(&p.url(user, password, "pgsurge")).await
}

/// The rows of a console command, each as column -> value.
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

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (status, body)
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

/// The value of one sample line of a Prometheus text body.
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[tokio::test]
async fn an_admin_sees_pools_stats_clients_and_servers_with_pgbouncer_column_names() {
    let proxy = Proxy::start(admins("app")).await;
    let c = proxy.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    let admin = console(&proxy, "app", "app").await;

    let pools = show(&admin, "SHOW POOLS").await;
    let pool = pools.iter().find(|r| r["database"] == "app" && r["user"] == "app").expect("a row for the app pool");
    for col in ["cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "maxwait", "maxwait_us", "pool_mode"] {
        assert!(pool.contains_key(col), "SHOW POOLS has {col}");
    }
    assert_eq!((pool["cl_idle"].as_str(), pool["sv_idle"].as_str(), pool["pool_mode"].as_str()), ("1", "1", "transaction"));

    let stats = show(&admin, "show stats;").await;
    let app_stats = stats.iter().find(|r| r["database"] == "app").unwrap();
    assert!(app_stats["total_query_count"].parse::<u64>().unwrap() >= 1);
    assert!(app_stats["total_xact_count"].parse::<u64>().unwrap() >= 1);

    let clients = show(&admin, "SHOW CLIENTS").await;
    assert!(clients.iter().any(|r| r["database"] == "app" && r["state"] == "idle" && r["addr"] == "127.0.0.1"), "{clients:?}");
    assert!(clients.iter().any(|r| r["database"] == "pgsurge"), "the console client is listed too");

    let servers = show(&admin, "SHOW SERVERS").await;
    assert_eq!(servers.iter().filter(|r| r["database"] == "app" && r["state"] == "idle").count(), 1, "{servers:?}");
    assert!(servers[0]["remote_pid"].parse::<u32>().unwrap() > 0);

    let dbs = show(&admin, "SHOW DATABASES").await;
    assert_eq!(dbs[0]["name"], "app");
    let config = show(&admin, "SHOW CONFIG").await;
    let pool_size = config.iter().find(|r| r["key"] == "pool_size").unwrap();
    assert_eq!((pool_size["value"].as_str(), pool_size["changeable"].as_str()), ("20", "yes"));
    assert!(show(&admin, "SHOW VERSION").await[0]["version"].starts_with("pgsurge "));
    assert!(show(&admin, "SHOW USERS").await.iter().any(|r| r["name"] == "app" && r["admin"] == "admin"));
    assert!(show(&admin, "SHOW LISTS").await.iter().any(|r| r["list"] == "pools" && r["items"] == "1"));

    let alias = connect(&proxy.url("app", "app", "pgbouncer")).await;
    assert_eq!(show(&alias, "SHOW POOLS").await.len(), 1, "the pgbouncer alias answers the same");
    drop(c);
    assert!(
        eventually(Duration::from_secs(5), || async { !show(&admin, "SHOW CLIENTS").await.iter().any(|r| r["database"] == "app") }).await,
        "a client that left is no longer listed"
    );
}

#[tokio::test]
async fn non_admins_get_42501_and_stats_users_may_only_show() {
    let mut users = BTreeMap::new();
    users.insert("watcher".to_string(), UserSettings { password: Some("w".into()), ..Default::default() });
    let proxy = Proxy::start(Settings { stats_users: Some("watcher".into()), users, ..Default::default() }).await;

    let Err(err) = try_connect(&proxy.url("app", "app", "pgsurge")).await else { panic!("app is no admin here") };
    assert_eq!(code(&err), "42501");
    let Err(err) = try_connect(&proxy.url("watcher", "wrong", "pgsurge")).await else { panic!("a wrong password is refused") };
    assert_eq!(code(&err), "28P01", "console users authenticate like any user");

    let watcher = console(&proxy, "watcher", "w").await;
    proxy.client().await.simple_query("SELECT 1").await.unwrap();
    let stats = show(&watcher, "SHOW STATS").await;
    let app_stats = stats.iter().find(|r| r["database"] == "app").unwrap_or_else(|| panic!("SHOW STATS lists app: {stats:?}"));
    assert!(app_stats["total_query_count"].parse::<u64>().unwrap() >= 1, "{app_stats:?}");
    let dbs = show(&watcher, "SHOW DATABASES").await;
    assert!(dbs.iter().any(|r| r["name"] == "app"), "SHOW DATABASES lists app: {dbs:?}");
    for cmd in ["RELOAD", "PAUSE", "RESUME", "SHUTDOWN"] {
        let err = watcher.simple_query(cmd).await.err().unwrap_or_else(|| panic!("{cmd} refused to a stats user"));
        assert_eq!(code(&err), "42501", "{cmd}");
    }
    assert_eq!(proxy.app.shutdown_state(), Shutdown::Running);
}

#[tokio::test]
async fn unknown_commands_are_42601_and_the_extended_protocol_is_refused_clearly() {
    let proxy = Proxy::start(admins("app")).await;
    let admin = console(&proxy, "app", "app").await;
    let err = admin.simple_query("SHOW NOTHING").await.unwrap_err();
    assert_eq!(code(&err), "42601");
    assert!(message(&err).contains("SHOW HELP"), "{err}");
    assert_eq!(code(&admin.simple_query("FROBNICATE").await.unwrap_err()), "42601");

    let err = admin.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(code(&err), "0A000");
    assert!(message(&err).contains("simple query"), "{err}");
    assert_eq!(show(&admin, "SHOW POOLS").await.len(), 0, "the console still answers after a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_transactions_in_flight_and_holds_new_queries_until_resume() {
    let proxy = Proxy::start(admins("app")).await;
    let admin = Arc::new(console(&proxy, "app", "app").await);
    let busy = proxy.client().await;
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let pausing = tokio::spawn({
        let admin = admin.clone();
        async move { admin.simple_query("PAUSE app").await.map(|_| ()) }
    });
    let pool = proxy.app.pools()[0].clone();
    assert!(eventually(Duration::from_secs(5), || async { pool.is_paused() }).await);
    assert!(!pausing.is_finished(), "PAUSE answers only once the open transaction has ended");
    busy.batch_execute("COMMIT").await.expect("a transaction in flight finishes under PAUSE");
    tokio::time::timeout(Duration::from_secs(5), pausing).await.expect("PAUSE returned").unwrap().unwrap();

    let waiter = tokio::spawn(async move { busy.query_one("SELECT 7", &[]).await.map(|r| r.get::<_, i32>(0)) });
    assert!(eventually(Duration::from_secs(5), || async { pool.stats.waiting.load(Ordering::Relaxed) == 1 }).await);
    let paused = show(&admin, "SHOW POOLS").await;
    assert_eq!((paused[0]["cl_waiting"].as_str(), paused[0]["paused"].as_str()), ("1", "1"));
    assert!(!waiter.is_finished(), "a new query waits while paused (it does not fail)");

    admin.simple_query("RESUME").await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("resumed").unwrap().unwrap();
    assert_eq!(v, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_spent_paused_does_not_count_against_the_wait_for_a_server() {
    let wait = Duration::from_secs(2);
    let settings = Settings { query_wait_timeout: Some(pgsurge::config::Dur(wait)), pool_size: Some(1), ..admins("app") };
    let proxy = Proxy::start(settings).await;
    let admin = console(&proxy, "app", "app").await;
    let (first, second) = (proxy.client().await, proxy.client().await);
    first.batch_execute("SELECT 1").await.unwrap();
    admin.simple_query("PAUSE app").await.unwrap();
    let first = tokio::spawn(async move { first.batch_execute("SELECT pg_sleep(0.2)").await });
    let pool = proxy.app.pools()[0].clone();
    assert!(eventually(Duration::from_secs(5), || async { pool.stats.waiting.load(Ordering::Relaxed) == 1 }).await);
    let second = tokio::spawn(async move { second.query_one("SELECT 8", &[]).await.map(|r| r.get::<_, i32>(0)) });
    tokio::time::sleep(wait * 3 / 2).await; // paused longer than a client may wait for a server
    assert!(!second.is_finished(), "still waiting while paused, not failed with 53300");
    admin.simple_query("RESUME").await.unwrap();
    // The second waits behind the first's 0.2 s on the one server: well within its 2 s, counted from RESUME.
    tokio::time::timeout(Duration::from_secs(5), first).await.expect("first served").unwrap().unwrap();
    let v = tokio::time::timeout(Duration::from_secs(5), second).await.expect("second served").unwrap();
    assert_eq!(v.expect("served after RESUME, not 53300"), 8);
}

#[tokio::test]
async fn metrics_move_with_traffic_and_health_endpoints_answer() {
    let ops = start(Settings::default()).await;
    let (status, body) = http_get(ops.http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE pgsurge_pool_wait_seconds histogram"));
    assert_eq!(http_get(ops.http, "/healthz").await.0, 200);
    assert_eq!(http_get(ops.http, "/readyz").await.0, 200, "the upstream is reachable");
    assert_eq!(http_get(ops.http, "/nope").await.0, 404);

    let c = ops.proxy.client().await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let _ = try_connect(&ops.proxy.url("app", "wrong", "app")).await.unwrap_err();
    let body = http_get(ops.http, "/metrics").await.1;
    let pool = r#"{database="app",user="app"}"#;
    assert!(metric(&body, &format!("pgsurge_pool_queries_total{pool}")).unwrap() >= 5.0, "{body}");
    assert!(metric(&body, &format!("pgsurge_pool_transactions_total{pool}")).unwrap() >= 5.0);
    assert!(metric(&body, &format!("pgsurge_pool_received_bytes_total{pool}")).unwrap() > 0.0);
    assert!(metric(&body, &format!("pgsurge_pool_wait_seconds_count{pool}")).unwrap() >= 5.0);
    assert_eq!(metric(&body, r#"pgsurge_client_connections{state="idle"}"#), Some(1.0));
    assert_eq!(metric(&body, r#"pgsurge_pool_server_connections{database="app",user="app",state="idle"}"#), Some(1.0));
    assert_eq!(metric(&body, r#"pgsurge_errors_total{sqlstate="28P01"}"#), Some(1.0), "errors are counted by SQLSTATE");

    ops.proxy.app.shutdown.send_replace(Shutdown::Draining);
    let (status, body) = http_get(ops.http, "/readyz").await;
    assert_eq!((status, body.trim()), (503, "draining: not accepting new clients"));
}

#[tokio::test]
async fn reload_grows_the_pool_live_and_a_bad_file_changes_nothing() {
    let file = std::env::temp_dir().join(format!("{}.toml", unique("reload")));
    std::fs::write(&file, "pool_size = 1\nadmin_users = \"app\"\n").unwrap();
    let ops = start(Settings { config: Some(file.clone()), ..Default::default() }).await;
    let proxy = &ops.proxy;
    let admin = console(proxy, "app", "app").await;

    let holder = proxy.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let second = proxy.client().await;
    let waiting = tokio::spawn(async move { second.query_one("SELECT 2", &[]).await.map(|r| r.get::<_, i32>(0)) });
    let pool = proxy.app.pools()[0].clone();
    assert!(eventually(Duration::from_secs(5), || async { pool.stats.waiting.load(Ordering::Relaxed) == 1 }).await);

    std::fs::write(&file, "pool_size = 3\nadmin_users = \"app\"\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let notices = admin.simple_query("RELOAD").await.unwrap();
    assert!(matches!(notices.last(), Some(SimpleQueryMessage::CommandComplete(_))));
    let v = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("the pool grew").unwrap().unwrap();
    assert_eq!(v, 2);
    assert_eq!(pool.total_servers.load(Ordering::Relaxed), 2, "two server connections at once: the pool grew live");
    let config = show(&admin, "SHOW CONFIG").await;
    let get = |k: &str| config.iter().find(|r| r["key"] == k).unwrap()["value"].clone();
    assert_eq!(get("pool_size"), "3");
    assert_ne!(get("listen"), "127.0.0.1:1", "listen needs a restart: the running value stays");

    std::fs::write(&file, "pool_size = \"lots\"\n").unwrap();
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&err), "F0000");
    assert!(message(&err).contains("pool_size"), "the error says why: {}", message(&err));
    std::fs::write(&file, "pool_size = 0\nadmin_users = \"app\"\n").unwrap();
    assert_eq!(code(&admin.simple_query("RELOAD").await.unwrap_err()), "F0000");
    assert_eq!(proxy.app.config.load().pool_size, 3, "a bad file changes nothing");
    assert_eq!(pool.size(), 3);
    holder.batch_execute("COMMIT").await.unwrap();
    std::fs::remove_file(file).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_lets_an_open_transaction_commit_then_run_returns() {
    let ops = start(Settings::default()).await;
    let table = unique("drain");
    let c = ops.proxy.client().await;
    c.batch_execute(&format!("CREATE TABLE {table} (x int)")).await.unwrap();
    c.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)")).await.unwrap();

    ops.proxy.app.shutdown.send_replace(Shutdown::Draining);
    assert!(
        eventually(Duration::from_secs(5), || async { try_connect(&ops.proxy.app_url()).await.is_err() }).await,
        "no new clients once draining"
    );
    c.batch_execute("COMMIT").await.expect("the open transaction commits while draining");
    tokio::time::timeout(Duration::from_secs(10), ops.run).await.expect("run returns once the transaction is done").unwrap().unwrap();

    let direct = connect(&pg().app_url).await;
    let n: i64 = direct.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    direct.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
}

#[tokio::test]
async fn a_user_not_in_the_config_logs_in_through_auth_query_by_scram_passthrough() {
    let pg = pg();
    let (user, lookup) = (unique("aq"), unique("pgsurge_lookup"));
    // What the README recommends instead of a superuser auth_user: a SECURITY DEFINER function.
    pg.psql_super(
        "app",
        &format!(
            "CREATE ROLE {user} LOGIN PASSWORD 'aq-secret'; GRANT ALL ON DATABASE app TO {user};
             CREATE FUNCTION {lookup}(text) RETURNS TABLE(usename name, passwd text) LANGUAGE sql SECURITY DEFINER
               AS $$ SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1 $$;
             REVOKE ALL ON FUNCTION {lookup}(text) FROM public; GRANT EXECUTE ON FUNCTION {lookup}(text) TO app;"
        ),
    );
    let auth_query = format!("SELECT usename, passwd FROM {lookup}($1)");
    let proxy = Proxy::start(Settings { auth_user: Some("app".into()), auth_query: Some(auth_query), ..Default::default() }).await;

    let c = connect(&proxy.url(&user, "aq-secret", "app")).await;
    let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, user, "logged in upstream as itself by SCRAM passthrough, no password stored");
    let Err(err) = try_connect(&proxy.url(&user, "wrong", "app")).await else { panic!("a wrong password is refused") };
    assert_eq!(code(&err), "28P01");
    let Err(err) = try_connect(&proxy.url("nobody_here", "x", "app")).await else { panic!("a user auth_query does not find is refused") };
    assert_eq!(code(&err), "28P01");

    let without = Proxy::start(Settings::default()).await;
    let Err(err) = try_connect(&without.url(&user, "aq-secret", "app")).await else { panic!("no auth_query, no login") };
    assert_eq!(code(&err), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_shutdown_ends_idle_and_busy_clients_with_57p01() {
    let proxy = Proxy::start(Settings { pool_size: Some(2), ..Default::default() }).await;
    let (idle, idle_conn) = crate::harness::connect_killable(&proxy.pg_url()).await;
    let busy = proxy.client().await;
    let sleeping = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    assert!(
        eventually(Duration::from_secs(10), || async { proxy.app.pools().iter().any(|p| p.stats.active.load(Ordering::Relaxed) == 1) })
            .await
    );

    proxy.app.shutdown_now();
    assert_eq!(proxy.app.shutdown_state(), Shutdown::Immediate);
    let err = tokio::time::timeout(Duration::from_secs(20), sleeping).await.expect("the busy client was ended").unwrap().unwrap_err();
    assert!(err.as_db_error().is_none_or(|e| e.code().code() == "57P01"), "{err}");
    tokio::time::timeout(Duration::from_secs(20), idle_conn).await.expect("the idle client's connection was closed").unwrap();
    assert!(idle.simple_query("SELECT 1").await.is_err());
}
