//! The slow lane: statements learned to be slow hold at most a share of the pool and queue apart; fast requests
//! never wait behind them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pgsurge::backend::Pool;
use pgsurge::config::{Config, Settings};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, connect, eventually, pg, unique, Proxy};

const LONG: Duration = Duration::from_secs(20);

/// Test settings from TOML, with app allowed the admin console.
fn settings(toml_text: &str) -> Settings {
    Settings { admin_users: Some("app".into()), ..toml::from_str(toml_text).expect("test settings") }
}

async fn start(toml_text: &str) -> (Proxy, Client) {
    let proxy = Proxy::start(settings(toml_text)).await;
    let admin = connect(&proxy.url("app", "app", "pgsurge")).await;
    (proxy, admin)
}

fn pool(proxy: &Proxy) -> Arc<Pool> {
    proxy.app.pools().into_iter().next().expect("the pool exists once a client logged in")
}

/// Statements running upstream whose text contains `marker`.
async fn running(marker: &str) -> i64 {
    let s = pg().super_client("postgres").await;
    let sql =
        format!("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()");
    s.query_one(&sql, &[]).await.unwrap().get(0)
}

/// Runs `sql` on a client of its own in the background (a long sleep, to be cancelled by `cancel_all`).
async fn background(proxy: &Proxy, sql: String) -> JoinHandle<Result<(), tokio_postgres::Error>> {
    let c = proxy.client().await;
    tokio::spawn(async move { c.batch_execute(&sql).await })
}

/// Cancels every statement carrying `marker` until all of `tasks` have ended (queued ones start, and are cancelled
/// in turn); returns their results.
async fn cancel_all(marker: &str, tasks: Vec<JoinHandle<Result<(), tokio_postgres::Error>>>) -> Vec<Result<(), tokio_postgres::Error>> {
    let s = pg().super_client("postgres").await;
    let sql = format!("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()");
    let done = eventually(LONG, || async {
        s.batch_execute(&sql).await.unwrap();
        tasks.iter().all(|t| t.is_finished())
    });
    assert!(done.await, "every sleep was cancelled");
    let mut out = vec![];
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The rows of a console command, each as column -> value.
async fn show(admin: &Client, sql: &str) -> Vec<HashMap<String, String>> {
    let mut rows = vec![];
    for m in admin.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) {
        if let SimpleQueryMessage::Row(r) = m {
            let cols = r.columns().iter().enumerate();
            rows.push(cols.map(|(i, col)| (col.name().to_string(), r.get(i).unwrap_or("").to_string())).collect());
        }
    }
    rows
}

/// SHOW SLOW's row of the statement whose normalised text is `text`.
async fn slow_row(admin: &Client, text: &str) -> HashMap<String, String> {
    let rows = show(admin, "SHOW SLOW").await;
    rows.iter().find(|r| r["statement"] == text).cloned().unwrap_or_else(|| panic!("SHOW SLOW lists {text}: {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_crossing_the_threshold_moves_lanes_and_back() {
    let (proxy, admin) = start("pool_size = 4\nslow_query_threshold = \"50ms\"\n").await;
    let c = proxy.client().await;
    let tag = unique("cross");
    let text = format!("select pg_sleep(?) as {tag}");
    let sleep = |secs: &str| format!("SELECT pg_sleep({secs}) AS {tag}");
    for _ in 0..3 {
        c.batch_execute(&sleep("0")).await.unwrap();
    }
    let row = slow_row(&admin, &text).await;
    assert_eq!((row["class"].as_str(), row["executions"].as_str()), ("fast", "3"), "{row:?}");

    // One run far over the threshold: the statement is slow now, whatever its literal.
    c.batch_execute(&sleep("0.4")).await.unwrap();
    let row = slow_row(&admin, &text).await;
    assert_eq!((row["class"].as_str(), row["executions"].as_str(), row["slow_checkouts"].as_str()), ("slow", "4", "0"), "{row:?}");
    c.batch_execute(&sleep("0")).await.unwrap();
    assert_eq!(slow_row(&admin, &text).await["slow_checkouts"], "1", "its next run took the slow lane");
    // The prepared form, with a parameter, is the same statement: it takes the slow lane too.
    let prepared = c.prepare(&format!("SELECT pg_sleep($1) AS {tag}")).await.unwrap();
    c.execute(&prepared, &[&0.0f64]).await.unwrap();
    assert_eq!(slow_row(&admin, &text).await["slow_checkouts"], "2");

    // Fast runs bring its estimate back under the threshold: it is fast again and leaves the lane.
    let mut fast_again = false;
    for _ in 0..30 {
        c.batch_execute(&sleep("0")).await.unwrap();
        if slow_row(&admin, &text).await["class"] == "fast" {
            fast_again = true;
            break;
        }
    }
    assert!(fast_again, "{:?}", slow_row(&admin, &text).await);
    let before = slow_row(&admin, &text).await["slow_checkouts"].clone();
    c.batch_execute(&sleep("0")).await.unwrap();
    assert_eq!(slow_row(&admin, &text).await["slow_checkouts"], before, "a fast statement uses the pool's own queue");
    assert_eq!(pool(&proxy).lane.held(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_lookup_never_waits_for_a_slow_one() {
    // Pool 4, share 0.5: slow statements may hold 2 connections.
    let (proxy, admin) =
        start("pool_size = 4\nslow_pool_share = 0.5\nslow_query_threshold = \"20ms\"\nquery_wait_timeout = \"60s\"\n").await;
    let marker = unique("lanefull");
    let mut slow = vec![];
    for _ in 0..6 {
        slow.push(background(&proxy, format!("/* pgsurge:slow */ SELECT pg_sleep(30) /* {marker} */")).await);
    }
    let p = pool(&proxy);
    assert!(eventually(LONG, || async { running(&marker).await == 2 && p.lane.waiting() == 4 }).await, "2 run, 4 queue in the lane");

    // Every lane slot is held by a sleep and four slow requests queue ahead: fast requests still go, at once
    // and in parallel, on the rest of the pool.
    let mut fast = vec![];
    for _ in 0..4 {
        let c = proxy.client().await;
        fast.push(tokio::spawn(async move {
            for i in 0..5 {
                let r = c.query_one("SELECT $1::int + 1", &[&i]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), i + 1);
            }
        }));
    }
    for f in fast {
        tokio::time::timeout(LONG, f).await.expect("fast requests are not held up by the slow lane").unwrap();
    }
    assert_eq!(running(&marker).await, 2, "the sleeps were still running, and never more than the lane's share");
    assert_eq!((p.lane.held(), p.lane.waiting()), (2, 4), "the slow requests still queue: the fast ones overtook them");
    let pools = show(&admin, "SHOW POOLS").await;
    let row = &pools[0];
    assert_eq!((row["slow_lane"].as_str(), row["sv_slow"].as_str(), row["cl_slow_waiting"].as_str()), ("2", "2", "4"), "{row:?}");

    for r in cancel_all(&marker, slow).await {
        assert_eq!(code(&r.unwrap_err()), "57014");
    }
    let row = slow_row(&admin, "select pg_sleep(?) /* pgsurge:slow */").await;
    assert_eq!((row["class"].as_str(), row["slow_checkouts"].as_str()), ("slow", "6"), "{row:?}");
    assert!(eventually(LONG, || async { p.lane.held() == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slow_lanes_queue_times_out_with_53300_and_the_client_goes_on() {
    // Pool 2, share 0.5: one connection for slow statements.
    let (proxy, _admin) =
        start("pool_size = 2\nslow_pool_share = 0.5\nslow_query_threshold = \"20ms\"\nquery_wait_timeout = \"300ms\"\n").await;
    let marker = unique("lanewait");
    let holder = background(&proxy, format!("/* pgsurge:slow */ SELECT pg_sleep(30) /* {marker} */")).await;
    assert!(eventually(LONG, || async { running(&marker).await == 1 }).await);

    let c = proxy.client().await;
    let e = c.batch_execute("/* pgsurge:slow */ SELECT pg_sleep(0)").await.unwrap_err();
    assert_eq!(code(&e), "53300", "{e}");
    let message = e.as_db_error().unwrap().message().to_string();
    assert!(message.contains("slow lane") && message.contains("query_wait_timeout"), "{message}");
    c.batch_execute("SELECT 1").await.expect("the client is kept, and a fast statement takes the other connection");

    let metrics = pgsurge::admin::metrics::render(&proxy.app);
    assert!(metrics.contains(r#"pgsurge_slow_lane_timeouts_total{database="app",user="app"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"pgsurge_slow_lane_held{database="app",user="app"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"pgsurge_slow_lane_capacity{database="app",user="app"} 1"#), "{metrics}");
    cancel_all(&marker, vec![holder]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_the_share_live() {
    // Pool 4, share 0.25: one connection for slow statements.
    let toml = |share: &str, threshold: &str| {
        format!("pool_size = 4\nslow_pool_share = {share}\nslow_query_threshold = \"{threshold}\"\nquery_wait_timeout = \"60s\"\n")
    };
    let (proxy, admin) = start(&toml("0.25", "20ms")).await;
    let marker = unique("lanereload");
    let sql = format!("/* pgsurge:slow */ SELECT pg_sleep(30) /* {marker} */");
    let mut slow = vec![background(&proxy, sql.clone()).await, background(&proxy, sql.clone()).await];
    let p = pool(&proxy);
    assert!(eventually(LONG, || async { running(&marker).await == 1 && p.lane.waiting() == 1 }).await, "one runs, one queues");

    let reload = |share: &str, threshold: &str| {
        let s = Settings { upstream: Some(pg().app_url.clone()), listen: Some("127.0.0.1:0".into()), ..settings(&toml(share, threshold)) };
        proxy.app.reload(Config::build(s).unwrap())
    };
    reload("0.5", "20ms");
    assert!(eventually(LONG, || async { running(&marker).await == 2 }).await, "the bigger share let the queued one go");
    assert_eq!((p.lane.cap(), p.lane.waiting()), (2, 0));
    let config = show(&admin, "SHOW CONFIG").await;
    assert!(config.iter().any(|r| r["key"] == "slow_pool_share" && r["value"] == "0.5" && r["changeable"] == "yes"), "{config:?}");

    // Threshold 0 turns the lane off: what queued in it goes, and slow statements no longer wait for its share.
    slow.push(background(&proxy, sql.clone()).await);
    assert!(eventually(LONG, || async { p.lane.waiting() == 1 }).await, "the lane is full again");
    reload("0.5", "0");
    assert!(eventually(LONG, || async { running(&marker).await == 3 }).await, "the queued one went");
    slow.push(background(&proxy, sql.clone()).await);
    assert!(eventually(LONG, || async { running(&marker).await == 4 }).await, "with the lane off it runs on the pool");
    assert_eq!(p.lane.waiting(), 0);
    cancel_all(&marker, slow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_classed_by_its_first_statement_and_counted_against_the_lane_once_it_turns_slow() {
    // Pool 4, share 0.25: one connection for slow statements.
    let (proxy, _admin) =
        start("pool_size = 4\nslow_pool_share = 0.25\nslow_query_threshold = \"50ms\"\nquery_wait_timeout = \"60s\"\n").await;
    let a = proxy.client().await;
    let p = pool(&proxy);

    // Begun fast; a statement inside it runs past the threshold: from then on it holds the lane's slot.
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(p.lane.held(), 0);
    a.batch_execute("SELECT pg_sleep(0.2)").await.unwrap();
    assert_eq!(p.lane.held(), 1, "the transaction turned slow");
    let b = proxy.client().await;
    let waiter = tokio::spawn(async move { b.batch_execute("/* pgsurge:slow */ SELECT 42").await });
    assert!(eventually(LONG, || async { p.lane.waiting() == 1 }).await, "a slow request waits for the lane's only slot");
    a.batch_execute("SELECT 1").await.expect("fast statements go on inside the slow transaction");
    assert!(!waiter.is_finished());
    a.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(LONG, waiter).await.expect("the slot came back at COMMIT").unwrap().unwrap();
    assert!(eventually(LONG, || async { p.lane.held() == 0 }).await);
    let metrics = pgsurge::admin::metrics::render(&proxy.app);
    assert!(metrics.contains(r#"pgsurge_slow_lane_promoted_total{database="app",user="app"} 1"#), "{metrics}");

    // Begun slow: the whole transaction counts against the lane, its fast statements too, until it ends.
    a.batch_execute("/* pgsurge:slow */ BEGIN").await.unwrap();
    a.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(p.lane.held(), 1);
    a.batch_execute("COMMIT").await.unwrap();
    assert!(eventually(LONG, || async { p.lane.held() == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_threshold_at_zero_there_is_no_lane() {
    let (proxy, admin) = start("pool_size = 2\n").await;
    let c = proxy.client().await;
    c.batch_execute("/* pgsurge:slow */ SELECT pg_sleep(0.1)").await.unwrap();
    let p = pool(&proxy);
    assert!(p.lane.estimates_if_any().is_none(), "nothing measured, nothing kept");
    assert_eq!(p.lane.stats.checkouts.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(show(&admin, "SHOW SLOW").await.is_empty());
    assert_eq!(show(&admin, "SHOW POOLS").await[0]["slow_lane"], "0");
}
