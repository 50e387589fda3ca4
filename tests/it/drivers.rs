//! Real drivers through pgsurge in transaction mode with a pool of 2: tests/drivers/run.sh (psycopg 3, asyncpg,
//! node-postgres, postgres.js, pgJDBC, pgbench -M prepared) against Postgres itself (the reference) and through
//! pgsurge; and the same checks written for tokio-postgres, the Rust driver.

use std::time::Duration;

use futures_util::future::join_all;
use pgsurge::config::Settings;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use crate::harness::{code, connect, pg, unique, Proxy};

fn tiny_pool() -> Settings {
    Settings { pool_size: Some(2), ..Default::default() }
}

async fn run_suite(url: &str) -> (bool, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new(format!("{root}/tests/drivers/run.sh"))
        .arg(url)
        .env("POOL_SIZE", "2")
        .output()
        .await
        .expect("tests/drivers/run.sh runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_driver_behaves_through_pgsurge_as_against_postgres() {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(&format!("{root}/tests/drivers/.venv")).exists()
            && std::path::Path::new(&format!("{root}/tests/drivers/node/node_modules")).exists(),
        "the driver suite is not installed: run `tests/drivers/run.sh --install` (.ci/run does)"
    );
    let (ok, out) = run_suite(&pg().app_url).await;
    assert!(ok, "the reference run against Postgres itself failed:\n{out}");
    let proxy = Proxy::start(tiny_pool()).await;
    // What the server connections were doing, every 5 s (the last few are shown if the suite fails).
    let watched = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let into = watched.clone();
    let watch = tokio::spawn(async move {
        let s = pg().super_client("postgres").await;
        let mut seen = std::collections::VecDeque::new();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let rows = s
                .simple_query(
                    "SELECT concat_ws(' | ', pid, application_name, state, wait_event_type, wait_event, \
                     round(extract(epoch FROM now() - state_change)::numeric, 1), left(query, 80)) \
                     FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                )
                .await
                .unwrap_or_default();
            let lines: Vec<String> = rows
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
                .collect();
            seen.push_back(lines.join("\n"));
            if seen.len() > 3 {
                seen.pop_front();
            }
            into.lock().unwrap().clone_from(&seen);
        }
    });
    let (ok, out) = run_suite(&proxy.pg_url()).await;
    watch.abort();
    let watched = watched.lock().unwrap().iter().cloned().collect::<Vec<_>>().join("\n--\n");
    assert!(ok, "drivers through pgsurge (transaction mode, pool 2):\n{out}\nserver connections, the last 15 s:\n{watched}");
    assert!(out.lines().any(|l| l.ends_with(" passed, 0 failed")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_types_round_trip_exactly() {
    let proxy = Proxy::start(tiny_pool()).await;
    let c = proxy.client().await;
    let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let row = c
        .query_one(
            "SELECT $1::int4, $2::int8, $3::text, $4::bytea, $5::int4[], $6::text IS NULL, \
             '12345678901234567890.123456789'::numeric::text, '2024-02-29 12:34:56.789012+00'::timestamptz::text, \
             $7::text::uuid::text, '{\"a\": [1, 2]}'::jsonb::text",
            &[&i32::MIN, &i64::MAX, &"tab\tquote' é", &(0u8..=255).collect::<Vec<u8>>(), &vec![1i32, -2, 3], &None::<String>, &uuid],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), i32::MIN);
    assert_eq!(row.get::<_, i64>(1), i64::MAX);
    assert_eq!(row.get::<_, String>(2), "tab\tquote' é");
    assert_eq!(row.get::<_, Vec<u8>>(3), (0u8..=255).collect::<Vec<u8>>());
    assert_eq!(row.get::<_, Vec<i32>>(4), vec![1, -2, 3]);
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, String>(6), "12345678901234567890.123456789");
    assert!(row.get::<_, String>(7).starts_with("2024-02-29 "));
    assert_eq!(row.get::<_, String>(8), uuid);
    assert_eq!(row.get::<_, String>(9), r#"{"a": [1, 2]}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_twenty_clients_reuse_prepared_statements_across_two_servers() {
    let proxy = Proxy::start(tiny_pool()).await;
    let url = proxy.app_url();
    let clients = join_all((0..20).map(|_| connect(&url))).await;
    join_all(clients.iter().enumerate().map(|(i, c)| async move {
        let echo = c.prepare("SELECT $1::int8 * 10 + $2::int8").await.unwrap();
        let other = c.prepare("SELECT $1::text || '-' || $2::text").await.unwrap();
        for k in 0..50i64 {
            let r = c.query_one(&echo, &[&(i as i64), &k]).await.unwrap();
            assert_eq!(r.get::<_, i64>(0), i as i64 * 10 + k, "client {i} got someone else's answer");
            if k % 7 == 0 {
                let r = c.query_one(&other, &[&format!("c{i}"), &k.to_string()]).await.unwrap();
                assert_eq!(r.get::<_, String>(0), format!("c{i}-{k}"));
                c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
            }
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_errors_carry_their_sqlstate_and_the_connection_recovers() {
    let proxy = Proxy::start(tiny_pool()).await;
    let c = proxy.client().await;
    let e = c.query_one("SELECT 1 / $1::int", &[&0i32]).await.unwrap_err();
    assert_eq!(code(&e), "22012");
    let e = c.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    let e = c.query("SELECT * FROM no_such_table_here", &[]).await.unwrap_err();
    assert_eq!(code(&e), "42P01");
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(code(&c.batch_execute("SELECT 1/0").await.unwrap_err()), "22012");
    assert_eq!(code(&c.batch_execute("SELECT 1").await.unwrap_err()), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(c.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_search_path_and_time_zone_follow_the_client() {
    let proxy = Proxy::start(tiny_pool()).await;
    let (a, b) = (proxy.client().await, proxy.client().await);
    let s = unique("sp");
    a.batch_execute(&format!("CREATE SCHEMA {s}; CREATE TABLE {s}.only_here(x int); INSERT INTO {s}.only_here VALUES (42)")).await.unwrap();
    a.batch_execute(&format!("SET search_path = {s}, public; SET TimeZone = 'America/New_York'")).await.unwrap();
    for _ in 0..10 {
        b.batch_execute("SELECT pg_sleep(0.001)").await.unwrap(); // b takes turns on the same two servers
        assert_eq!(a.query_one("SELECT x FROM only_here", &[]).await.unwrap().get::<_, i32>(0), 42);
        let t: String = a.query_one("SELECT '2024-01-01 00:00:00+00'::timestamptz::text", &[]).await.unwrap().get(0);
        assert_eq!(t, "2023-12-31 19:00:00-05");
        assert!(b.query_one("SELECT x FROM only_here", &[]).await.is_err(), "b never inherits a's search_path");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_listen_notify_works_in_transaction_mode() {
    let proxy = Proxy::start(tiny_pool()).await;
    let (listener, mut conn) = tokio_postgres::connect(&proxy.app_url(), NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    let chan = unique("chan");
    listener.batch_execute(&format!("LISTEN {chan}")).await.unwrap();
    let notifier = proxy.client().await;
    let busy = proxy.client().await;
    busy.batch_execute("SELECT 1").await.unwrap(); // the other server connection still serves everyone else
    notifier.batch_execute(&format!("NOTIFY {chan}, 'hello'")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("notification within 5 s").unwrap();
    assert_eq!(got, (chan.clone(), "hello".to_string()));
    assert_eq!(proxy.app.pools()[0].stats.pinned.load(std::sync::atomic::Ordering::Relaxed), 1, "the listener is pinned, and counted");
    listener.batch_execute("UNLISTEN *").await.unwrap();
    assert_eq!(proxy.app.pools()[0].stats.pinned.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_big_results_and_pipelining_arrive_whole_and_in_order() {
    let proxy = Proxy::start(tiny_pool()).await;
    let c = proxy.client().await;
    let rows = c.query("SELECT g, md5(g::text) FROM generate_series(1, 200000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 200_000);
    assert_eq!(rows[199_999].get::<_, i32>(0), 200_000);
    let mut text = 0usize;
    for m in c.simple_query("SELECT md5(g::text) FROM generate_series(1, 50000) g").await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            text += r.get(0).unwrap().len();
        }
    }
    assert_eq!(text, 50_000 * 32);
    // tokio-postgres pipelines concurrent queries on one connection.
    let stmt = c.prepare("SELECT $1::int4 + 1").await.unwrap();
    let answers = join_all((0..100).map(|i| {
        let (c, stmt) = (&c, &stmt);
        async move { c.query_one(stmt, &[&i]).await.unwrap().get::<_, i32>(0) }
    }))
    .await;
    assert_eq!(answers, (1..=100).collect::<Vec<i32>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_survives_a_ddl_that_changes_its_result_type() {
    // One server connection, so the statement really is stale where it runs.
    let proxy = Proxy::start(Settings { pool_size: Some(1), ..Default::default() }).await;
    let c = proxy.client().await;
    let t = unique("ddl");
    c.batch_execute(&format!("CREATE TABLE {t}(id int, v varchar(10)); INSERT INTO {t} VALUES (1, 'one')")).await.unwrap();
    let stmt = c.prepare(&format!("SELECT v FROM {t} WHERE id = $1")).await.unwrap();
    assert_eq!(c.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, String>(0), "one");
    proxy.client().await.batch_execute(&format!("ALTER TABLE {t} ALTER COLUMN v TYPE text")).await.unwrap();
    // Postgres itself would answer 0A000 "cached plan must not change result type"; outside a transaction
    // pgsurge re-prepares and runs it again, once.
    assert_eq!(c.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, String>(0), "one");
    assert_eq!(c.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, String>(0), "one");
    // Inside a transaction the error is the client's to see.
    c.batch_execute(&format!("ALTER TABLE {t} ALTER COLUMN v TYPE varchar(20)")).await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let e = c.query_one(&stmt, &[&1i32]).await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    c.batch_execute("ROLLBACK").await.unwrap();
}
