//! Transaction pooling: many clients over few server connections, each seeing only its own work.

use std::time::Duration;

use futures_util::future::join_all;
use pgsurge::config::{Dur, Settings};

use crate::harness::{code, connect, connect_killable, pg, unique, Proxy};

fn pool(size: usize) -> Settings {
    Settings { pool_size: Some(size), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_both_work() {
    let proxy = Proxy::start(pool(2)).await;
    let c = proxy.client().await;
    let rows = c.simple_query("SELECT 1 AS a; SELECT 'x' AS b").await.unwrap();
    assert_eq!(rows.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count(), 2);
    let row = c.query_one("SELECT $1::int8 * 2, $2::text || '!'", &[&21i64, &"hi"]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, String>(1)), (42, "hi!".to_string()));
    let stmt = c.prepare("SELECT $1::int4 + 1").await.unwrap();
    for i in 0..5 {
        assert_eq!(c.query_one(&stmt, &[&i]).await.unwrap().get::<_, i32>(0), i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_interleaving_transactions_over_one_server_see_only_their_own_work() {
    let proxy = Proxy::start(pool(1)).await;
    let t = unique("interleave");
    proxy.client().await.batch_execute(&format!("CREATE TABLE {t}(owner text, n int)")).await.unwrap();
    let run = |who: &'static str| {
        let (url, t) = (proxy.app_url(), t.clone());
        async move {
            let c = connect(&url).await;
            for n in 0..40 {
                c.batch_execute("BEGIN").await.unwrap();
                c.execute(&format!("INSERT INTO {t} VALUES ($1, $2)"), &[&who, &n]).await.unwrap();
                let mine: i64 = c.query_one(&format!("SELECT count(*) FROM {t} WHERE owner = $1"), &[&who]).await.unwrap().get(0);
                let rolled_back = n as i64 / 5; // transactions 4, 9, 14, ... rolled back
                assert_eq!(mine, n as i64 + 1 - rolled_back, "{who} sees exactly its own rows inside its transaction");
                let echo: String = c.query_one("SELECT $1::text", &[&who]).await.unwrap().get(0);
                assert_eq!(echo, who);
                if n % 5 == 4 {
                    c.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    c.batch_execute("COMMIT").await.unwrap();
                }
            }
        }
    };
    tokio::join!(run("alice"), run("bob"));
    let c = proxy.client().await;
    for who in ["alice", "bob"] {
        let n: i64 = c.query_one(&format!("SELECT count(*) FROM {t} WHERE owner = $1"), &[&who]).await.unwrap().get(0);
        assert_eq!(n, 32, "8 of {who}'s 40 transactions rolled back");
    }
    assert_eq!(proxy.app.pools()[0].total_servers.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_over_a_pool_of_ten_all_get_their_own_answers() {
    // Trust auth: this is about pooling, and a thousand SCRAM logins would only measure PBKDF2.
    let mut users = std::collections::BTreeMap::new();
    users.insert(
        "app".to_string(),
        pgsurge::config::UserSettings {
            password: Some("app".into()),
            auth_type: Some("trust".into()),
            pool_size: None,
            ..Default::default()
        },
    );
    let proxy = Proxy::start(Settings { users, ..pool(10) }).await;
    let url = format!("host=127.0.0.1 port={} user=app dbname=app", proxy.addr.port());
    let clients = join_all((0..1000).map(|_| connect(&url))).await;
    let answers = join_all(clients.iter().enumerate().map(|(i, c)| async move {
        let r = c.query_one("SELECT $1::int4", &[&(i as i32)]).await.unwrap();
        r.get::<_, i32>(0)
    }))
    .await;
    assert_eq!(answers, (0..1000).collect::<Vec<i32>>());
    let servers = proxy.app.pools()[0].total_servers.load(std::sync::atomic::Ordering::Relaxed);
    assert!(servers <= 10, "{servers} server connections for a pool of 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_answers_53300_after_the_wait_and_keeps_the_client() {
    let proxy = Proxy::start(Settings { query_wait_timeout: Some(Dur(Duration::from_millis(300))), ..pool(1) }).await;
    let holder = proxy.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = proxy.client().await;
    let err = waiter.query_one("SELECT 2", &[]).await.unwrap_err();
    assert_eq!(code(&err), "53300");
    let err = waiter.simple_query("SELECT 2").await.unwrap_err();
    assert_eq!(code(&err), "53300");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiter.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3, "same client, usable again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_transaction_never_leaves_a_dirty_connection() {
    let proxy = Proxy::start(pool(1)).await;
    let t = unique("killed");
    proxy.client().await.batch_execute(&format!("CREATE TABLE {t}(x int)")).await.unwrap();
    let (doomed, socket) = connect_killable(&proxy.app_url()).await;
    doomed.batch_execute(&format!("BEGIN; INSERT INTO {t} VALUES (1); SET LOCAL statement_timeout = '1ms'")).await.unwrap();
    socket.abort();
    let next = proxy.client().await;
    let n: i64 = next.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the dead client's insert was rolled back");
    let fresh = next.simple_query("SELECT now() = statement_timestamp()").await.unwrap();
    let fresh = fresh.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
    assert!(fresh, "the next client does not inherit an open transaction");
    next.batch_execute("SELECT pg_sleep(0.01)").await.expect("no leftover statement_timeout");

    // Killed mid-query: the server is cancelled and closed, and the next client gets a working one.
    let (doomed, socket) = connect_killable(&proxy.app_url()).await;
    // The marker keeps other tests' sleeps (they share the cluster) out of the count.
    let sleep = format!("SELECT pg_sleep(30) /* {t} */");
    let q = tokio::spawn({
        let sleep = sleep.clone();
        async move {
            let _ = doomed.batch_execute(&sleep).await;
        }
    });
    let s = pg().super_client("postgres").await;
    assert!(
        crate::harness::eventually(Duration::from_secs(5), || async {
            s.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", &[&sleep])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 1
        })
        .await
    );
    socket.abort();
    let _ = q.await;
    assert_eq!(next.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
    assert!(
        crate::harness::eventually(Duration::from_secs(5), || async {
            s.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", &[&sleep])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        })
        .await,
        "the abandoned query was cancelled upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_settings_follow_their_client_across_server_connections() {
    let proxy = Proxy::start(pool(1)).await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'; SET application_name = 'client-a'").await.unwrap();
    let tz_b: String = b.query_one("SELECT current_setting('TimeZone')", &[]).await.unwrap().get(0);
    assert_ne!(tz_b, "Asia/Tokyo", "b does not inherit a's setting");
    let tz_a: String = a.query_one("SELECT current_setting('TimeZone')", &[]).await.unwrap().get(0);
    assert_eq!(tz_a, "Asia/Tokyo", "a keeps its setting on its next transaction");
    let app_b: String = b.query_one("SELECT current_setting('application_name')", &[]).await.unwrap().get(0);
    assert_ne!(app_b, "client-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_reach_the_server_connection() {
    let proxy = Proxy::start(pool(1)).await;
    let c = connect(&format!("{} application_name=startup-app options='-c search_path=pg_catalog,public'", proxy.app_url())).await;
    let other = proxy.client().await;
    other.batch_execute("SELECT 1").await.unwrap();
    let row = c.query_one("SELECT current_setting('application_name'), current_setting('search_path')", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("startup-app".into(), "pg_catalog,public".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_one_server_per_client_and_discards_it_after() {
    let proxy = Proxy::start(Settings { pool_mode: Some("session".into()), ..pool(1) }).await;
    {
        let c = proxy.client().await;
        c.batch_execute("SET search_path = pg_catalog; PREPARE p AS SELECT 1").await.unwrap();
        let sp: String = c.query_one("SHOW search_path", &[]).await.unwrap().get(0);
        assert_eq!(sp, "pg_catalog");
    }
    let c = proxy.client().await;
    let sp: String = c.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(sp, "\"$user\", public", "DISCARD ALL ran between the two sessions");
    let n: i64 = c.query_one("SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_pass_through() {
    use bytes::Bytes;
    use futures_util::{SinkExt, TryStreamExt};
    let proxy = Proxy::start(pool(1)).await;
    let c = proxy.client().await;
    let t = unique("copy");
    c.batch_execute(&format!("CREATE TABLE {t}(id int, v text)")).await.unwrap();
    let sink = c.copy_in(&format!("COPY {t} FROM STDIN")).await.unwrap();
    futures_util::pin_mut!(sink);
    let data: String = (0..5000).map(|i| format!("{i}\tv{i}\n")).collect();
    sink.send(Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);
    let out: Vec<Bytes> =
        c.copy_out(&format!("COPY (SELECT * FROM {t} ORDER BY id) TO STDOUT")).await.unwrap().try_collect().await.unwrap();
    assert_eq!(out.concat(), data.into_bytes());
    assert_eq!(c.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_run_through_it() {
    let proxy = Proxy::start(pool(4)).await;
    let url = proxy.pg_url();
    let out = std::process::Command::new("psql").args(["-X", "-At", "-c", "SELECT 40 + 2", &url]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{}", String::from_utf8_lossy(&out.stderr));
    let init = tokio::process::Command::new("pgbench").args(["-i", "-s", "1", "-q", &url]).output().await.unwrap();
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    for mode in ["simple", "extended"] {
        let run = tokio::process::Command::new("pgbench")
            .args(["-n", "-c", "16", "-j", "2", "-t", "100", "-M", mode, &url])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "pgbench -M {mode}: {text}{}", String::from_utf8_lossy(&run.stderr));
        assert!(text.contains("number of transactions actually processed: 1600/1600"), "{text}");
        assert!(text.contains("number of failed transactions: 0"), "{text}");
    }
}
