//! Rate limits, connection caps, fairness over a shared database budget, and the session timeouts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use pgsurge::config::{Settings, UserSettings};
use tokio_postgres::NoTls;

use crate::harness::{code, connect, connect_killable, eventually, pg, try_connect, unique, Proxy};

/// A new login role with password = its name, allowed into database app; returns its name.
fn role(prefix: &str) -> String {
    let name = unique(prefix);
    pg().psql_super("app", &format!("CREATE ROLE {name} LOGIN PASSWORD '{name}'; GRANT ALL ON DATABASE app TO {name};"));
    name
}

/// An auth file with app and the given roles (password = name).
fn auth_file(roles: &[&str]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.txt", unique("users")));
    let mut text = "\"app\" \"app\"\n".to_string();
    for r in roles {
        text.push_str(&format!("\"{r}\" \"{r}\"\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn settings(toml_text: &str) -> Settings {
    toml::from_str(toml_text).expect("test settings")
}

/// Whether anything matching `marker` is running upstream.
async fn running(marker: &str) -> i64 {
    let s = pg().super_client("postgres").await;
    let sql =
        format!("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()");
    s.query_one(&sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_rate_is_delayed_then_refused_with_53400_and_another_user_is_unaffected() {
    let b = role("limb");
    let file = auth_file(&[&b]);
    let s = settings("limit_qps_per_user = 20\nlimit_burst = 2\nlimit_max_delay = \"100ms\"\n");
    let proxy = Proxy::start(Settings { auth_file: Some(file.clone()), ..s }).await;
    let mut a_clients = vec![];
    for _ in 0..8 {
        a_clients.push(proxy.client().await);
    }
    let b_client = connect(&proxy.url(&b, &b, "app")).await;

    // 8 requests at once against a burst of 2 and one token every 50 ms, waiting 100 ms at most.
    let results = join_all(a_clients.iter().map(|c| c.simple_query("SELECT 1"))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(ok >= 3, "the burst and the tokens within max_delay were served: {ok}");
    assert!(!refused.is_empty(), "the rest were refused");
    for e in &refused {
        assert_eq!(code(e), "53400", "{e}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("rate limit"), "{}", db.message());
        assert!(db.detail().is_some_and(|d| d.starts_with("retry after ")), "{:?}", db.detail());
    }
    // The refused clients keep their connections and may retry later.
    assert!(eventually(Duration::from_secs(5), || async { a_clients[0].simple_query("SELECT 1").await.is_ok() }).await);

    // User b has its own bucket: its burst is there at once.
    for _ in 0..2 {
        b_client.simple_query("SELECT 1").await.expect("another user is not limited by a's rate");
    }
    let (cols, rows) = proxy.app.limits.show_rows();
    let col = |n: &str| cols.iter().position(|c| *c == n).unwrap();
    let row = |user: &str| rows.iter().find(|r| r[0] == "user" && r[1] == user).cloned().unwrap();
    let a = row("app");
    assert!(a[col("delayed")].parse::<u64>().unwrap() >= 1, "some of a's requests waited: {a:?}");
    assert!(a[col("rejected")].parse::<u64>().unwrap() >= 1, "{a:?}");
    let bs = row(&b);
    assert_eq!((bs[col("delayed")].as_str(), bs[col("rejected")].as_str()), ("0", "0"), "{bs:?}");
    std::fs::remove_file(file).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_a_transaction_a_limited_statement_waits_instead_of_failing() {
    let s = settings("limit_qps_per_user = 5\nlimit_burst = 1\nlimit_max_delay = \"10ms\"\nquery_wait_timeout = \"10s\"\n");
    let proxy = Proxy::start(s).await;
    let c = proxy.client().await;
    let t = unique("txwait");
    c.batch_execute(&format!("CREATE TABLE {t}(x int)")).await.unwrap();
    // Outside a transaction, the next statement (200 ms away) is past max_delay: refused.
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "53400");
    // Inside one, each statement waits for its token and the transaction commits whole.
    assert!(eventually(Duration::from_secs(5), || async { c.batch_execute("BEGIN").await.is_ok() }).await);
    for i in 0..3 {
        c.batch_execute(&format!("INSERT INTO {t} VALUES ({i})")).await.expect("waits inside the transaction");
    }
    c.batch_execute("COMMIT").await.expect("commit waits too");
    let n = eventually(Duration::from_secs(5), || async {
        match c.simple_query(&format!("SELECT count(*) FROM {t}")).await {
            Ok(m) => m.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("3"))),
            Err(_) => false,
        }
    });
    assert!(n.await, "all three rows committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_answer_53300_before_any_server_connection_is_used() {
    let b = role("limc");
    let file = auth_file(&[&b]);
    let s = settings("[limits.per_user]\nmax_connections = 2\n");
    let proxy = Proxy::start(Settings { auth_file: Some(file.clone()), ..s }).await;
    let c1 = proxy.client().await;
    let _c2 = proxy.client().await;
    let connects = |p: &Proxy| p.app.pools().iter().map(|p| p.stats.connects.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();
    let before = connects(&proxy);
    let Err(e) = try_connect(&proxy.app_url()).await else { panic!("a third connection of app is refused") };
    assert_eq!(code(&e), "53300");
    assert_eq!(connects(&proxy), before, "no server login for a refused client");
    connect(&proxy.url(&b, &b, "app")).await.simple_query("SELECT 1").await.expect("another user has its own cap");
    drop(c1);
    assert!(eventually(Duration::from_secs(5), || async { try_connect(&proxy.app_url()).await.is_ok() }).await, "a slot frees up");

    // Connection rate per address: the second login within the second is refused, before its pool exists.
    let s = settings("[limits.per_address]\nconnections_per_second = 1\nburst = 1\n");
    let proxy = Proxy::start(Settings { auth_file: Some(file.clone()), ..s }).await;
    let _c = proxy.client().await;
    let Err(e) = try_connect(&proxy.url(&b, &b, "app")).await else { panic!("over the connection rate") };
    assert_eq!(code(&e), "53300");
    assert!(e.as_db_error().unwrap().message().contains("new connections"), "{e}");
    assert!(proxy.app.pools().iter().all(|p| p.key.user != b), "no pool, no server connection for the refused user");
    std::fs::remove_file(file).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_shared_database_budget_a_quiet_user_is_served_between_a_noisy_users_queries() {
    let b = role("limf");
    let file = auth_file(&[&b]);
    let mut users = std::collections::BTreeMap::new();
    // trust logins: 200 SCRAM handshakes in a debug build would dominate the test
    for u in ["app", b.as_str()] {
        users.insert(u.to_string(), UserSettings { password: Some(u.to_string()), auth_type: Some("trust".into()), pool_size: None });
    }
    let s = settings("max_db_connections = 4\nquery_wait_timeout = \"60s\"\n");
    let proxy = Proxy::start(Settings { auth_file: Some(file.clone()), users, ..s }).await;
    let url = |u: &str| format!("host=127.0.0.1 port={} user={u} dbname=app", proxy.addr.port());
    let done = Arc::new(parking_lot::Mutex::new(Vec::<char>::new()));

    let mut a_clients = vec![];
    for _ in 0..200 {
        a_clients.push(connect(&url("app")).await);
    }
    let b_clients = [connect(&url(&b)).await, connect(&url(&b)).await];
    let mut tasks = vec![];
    for c in a_clients {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            c.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
            done.lock().push('A');
        }));
    }
    let app_pool = proxy.app.pools().into_iter().find(|p| p.key.user == "app").unwrap();
    let saturated =
        eventually(Duration::from_secs(30), || async { app_pool.stats.waiting.load(std::sync::atomic::Ordering::Relaxed) >= 100 });
    assert!(saturated.await, "user app saturates the database budget");
    for c in b_clients {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                c.batch_execute("SELECT 1").await.unwrap();
                done.lock().push('B');
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(120), join_all(tasks)).await.expect("everyone finishes");
    let order: String = done.lock().iter().collect();
    let last_b = order.rfind('B').unwrap();
    let a_before = order[..last_b].matches('A').count();
    assert!(a_before < 100, "b's 20 queries finished while a still had most of its 200 waiting ({a_before} of a's done first): {order}");
    let (_, rows) = proxy.app.limits.show_rows();
    assert!(rows.iter().any(|r| r[0] == "max_db_connections" && r[1] == "app"), "{rows:?}");
    std::fs::remove_file(file).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_the_upstream_query_with_57014() {
    let proxy = Proxy::start(settings("query_timeout = \"300ms\"\n")).await;
    let c = proxy.client().await;
    let marker = unique("qt");
    let e = c.batch_execute(&format!("SELECT pg_sleep(30) /* {marker} */")).await.unwrap_err();
    assert_eq!(code(&e), "57014");
    assert!(eventually(Duration::from_secs(5), || async { running(&marker).await == 0 }).await, "gone from pg_stat_activity");
    c.batch_execute("SELECT pg_sleep(0.01)").await.expect("the client goes on; short statements are fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_in_a_transaction_too_long_gets_25p03_and_its_work_is_rolled_back() {
    let proxy = Proxy::start(settings("idle_transaction_timeout = \"300ms\"\n")).await;
    let t = unique("idletx");
    proxy.client().await.batch_execute(&format!("CREATE TABLE {t}(x int)")).await.unwrap();
    let (client, connection) = tokio_postgres::connect(&proxy.app_url(), NoTls).await.unwrap();
    let conn = tokio::spawn(connection);
    client.batch_execute(&format!("BEGIN; INSERT INTO {t} VALUES (1)")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await.expect("closed by pgsurge").unwrap();
    let e = ended.expect_err("ends with an error");
    assert_eq!(code(&e), "25P03");
    let n: i64 = proxy.client().await.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the open transaction was rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_is_closed_with_57p05_after_client_idle_timeout_even_if_it_never_sent_a_query() {
    let proxy = Proxy::start(settings("client_idle_timeout = \"300ms\"\n")).await;
    // One that never sends anything after login (it waits parked from the start), one that goes quiet after a query.
    let (_silent, silent_conn) = tokio_postgres::connect(&proxy.app_url(), NoTls).await.unwrap();
    let (quiet, quiet_conn) = tokio_postgres::connect(&proxy.app_url(), NoTls).await.unwrap();
    let (silent_conn, quiet_conn) = (tokio::spawn(silent_conn), tokio::spawn(quiet_conn));
    quiet.simple_query("SELECT 1").await.unwrap();
    for conn in [silent_conn, quiet_conn] {
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await.expect("closed by pgsurge").unwrap();
        assert_eq!(code(&ended.expect_err("ends with an error")), "57P05");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_query_has_it_cancelled_upstream() {
    let proxy = Proxy::start(Settings::default()).await;
    let marker = unique("gone");
    let (doomed, socket) = connect_killable(&proxy.app_url()).await;
    let sql = format!("SELECT pg_sleep(30) /* {marker} */");
    let q = tokio::spawn(async move {
        let _ = doomed.batch_execute(&sql).await;
    });
    assert!(eventually(Duration::from_secs(5), || async { running(&marker).await == 1 }).await);
    socket.abort();
    let _ = q.await;
    assert!(eventually(Duration::from_secs(5), || async { running(&marker).await == 0 }).await, "cancelled upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_change_on_reload_without_dropping_clients() {
    let proxy = Proxy::start(Settings::default()).await;
    let c = proxy.client().await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let s = Settings {
        upstream: Some(pg().app_url.clone()),
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some(String::new()),
        ..settings("limit_qps_per_user = 1\nlimit_burst = 1\nlimit_max_delay = \"0\"\n")
    };
    proxy.app.reload(pgsurge::Config::build(s).unwrap());
    c.simple_query("SELECT 1").await.expect("the connected client stays, with a fresh bucket");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "53400", "and is now held to the new rate");
}
