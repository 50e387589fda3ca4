//! Failover: an upstream listing several hosts as libpq does, a real streaming standby (`pg_basebackup -R`), and
//! `target_session_attrs` choosing among them; the primary killed and the standby promoted under writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsurge::config::{Dur, Settings};

use crate::harness::{try_connect, Pg, Proxy};

fn upstream(hosts: &[&Pg], attrs: &str) -> String {
    let list: Vec<String> = hosts.iter().map(|p| format!("127.0.0.1:{}", p.port)).collect();
    format!("postgres://app:app@{}/app?target_session_attrs={attrs}", list.join(","))
}

async fn in_recovery(proxy: &Proxy) -> bool {
    let c = try_connect(&proxy.app_url()).await.expect("login through pgsurge");
    c.query_one("SELECT pg_is_in_recovery()", &[]).await.expect("a server that will do").get(0)
}

async fn proxy_for(pg: &Pg, url: String, extra: Settings) -> Proxy {
    Proxy::start_for(pg, Settings { upstream: Some(url), ..extra }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_move_to_the_promoted_standby_within_two_seconds() {
    if std::env::var("PGSURGE_TEST_DATABASE_URL").is_ok() {
        return; // needs clusters of its own to kill and promote
    }
    let primary = Pg::start();
    primary.psql_super("app", "CREATE TABLE w (id bigserial PRIMARY KEY, at timestamptz DEFAULT now()); ALTER TABLE w OWNER TO app");
    let standby = tokio::task::spawn_blocking({
        let (bin, dir, port) = (primary.bin.clone(), primary.dir.clone(), primary.port);
        move || Pg { port, dir, bin, app_url: String::new(), super_url: String::new() }.start_standby()
    })
    .await
    .unwrap();
    let quiet = Settings::default;

    // Each attribute picks its host, whatever the order of the list.
    for (hosts, attrs, standby_wanted) in [
        (vec![&standby, &primary], "read-write", false),
        (vec![&standby, &primary], "primary", false),
        (vec![&primary, &standby], "read-only", true),
        (vec![&primary, &standby], "standby", true),
        (vec![&primary, &standby], "prefer-standby", true),
        (vec![&standby, &primary], "any", true),
    ] {
        let p = proxy_for(&primary, upstream(&hosts, attrs), quiet()).await;
        assert_eq!(in_recovery(&p).await, standby_wanted, "target_session_attrs={attrs}");
    }
    // prefer-standby with no standby listed takes any host.
    let p = proxy_for(&primary, upstream(&[&primary], "prefer-standby"), quiet()).await;
    assert!(!in_recovery(&p).await);
    // read-write with only the standby: an error that names the host and why, not a hang.
    let wait = Settings { query_wait_timeout: Some(Dur(Duration::from_millis(500))), ..quiet() };
    let p = proxy_for(&primary, upstream(&[&standby], "read-write"), wait).await;
    let e = tokio::time::timeout(Duration::from_secs(10), try_connect(&p.app_url())).await.expect("no hang");
    let Err(e) = e else { panic!("no server will do, yet a login succeeded") };
    assert!(format!("{e:?}").contains("is read-only"), "{e:?}");

    // The failover: writes through pgsurge while the primary is killed and the standby promoted.
    let settings = Settings { pool_size: Some(4), query_wait_timeout: Some(Dur(Duration::from_secs(10))), ..quiet() };
    let proxy = proxy_for(&primary, upstream(&[&primary, &standby], "read-write"), settings).await;
    let url = proxy.app_url();
    let log: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (log, stop) = (log.clone(), stop.clone());
        async move {
            let mut client = None;
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                if client.is_none() {
                    client = try_connect(&url).await.ok();
                }
                let ok = match &client {
                    Some(c) => c.execute("INSERT INTO w DEFAULT VALUES", &[]).await.is_ok(),
                    None => false,
                };
                if !ok {
                    client = None;
                }
                log.lock().unwrap().push((t, ok));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let primary = tokio::task::spawn_blocking(move || {
        primary.pg_ctl(&["-m", "immediate", "stop"]);
        primary
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let promoted_at = Instant::now();
    let standby = tokio::task::spawn_blocking(move || {
        standby.pg_ctl(&["-w", "promote"]);
        standby
    })
    .await
    .unwrap();
    let promote_took = promoted_at.elapsed();
    let ok_after = || log.lock().unwrap().iter().any(|(t, ok)| *ok && *t >= promoted_at);
    for _ in 0..400 {
        if ok_after() || promoted_at.elapsed() > Duration::from_secs(8) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let log = log.lock().unwrap().clone();
    let before: Vec<_> = log.iter().filter(|(t, _)| *t < killed_at).collect();
    let errors = log.iter().filter(|(_, ok)| !ok).count();
    let first = log.iter().find(|(t, ok)| *ok && *t >= promoted_at).map(|(t, _)| *t - promoted_at);
    eprintln!(
        "failover: writes again {:.2} s after the promotion began (pg_ctl promote took {:.2} s); {} writes before the kill, {} errors during the switch",
        first.map_or(f64::NAN, |d| d.as_secs_f64()),
        promote_took.as_secs_f64(),
        before.len(),
        errors
    );
    assert!(!before.is_empty() && before.iter().all(|(_, ok)| *ok), "every write before the kill succeeded");
    let first = first.unwrap_or_else(|| panic!("no write succeeded after the promotion; standby log:\n{}", standby.log_tail()));
    assert!(first <= Duration::from_secs(2), "writes resumed {first:?} after the promotion");
    let c = try_connect(&proxy.app_url()).await.unwrap();
    assert!(!c.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get::<_, bool>(0), "on the new primary");
    drop(primary);
}
