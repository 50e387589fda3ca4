//! Surviving the world: Postgres restarting under load, connection caps, slow logins.

use std::time::Duration;

use pgsurge::config::{Dur, Settings};
use tokio::io::AsyncReadExt;

use crate::harness::{code, connect, try_connect, Pg, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_succeed_again_soon_after_postgres_restarts_under_load() {
    if std::env::var("PGSURGE_TEST_DATABASE_URL").is_ok() {
        return; // needs a cluster of its own to restart
    }
    let pg = Pg::start();
    let proxy = Proxy::start_for(
        &pg,
        Settings { pool_size: Some(4), query_wait_timeout: Some(Dur(Duration::from_secs(20))), ..Default::default() },
    )
    .await;
    let url = proxy.app_url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ok = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok < 100_000 {
                    match try_connect(&url).await {
                        Ok(c) => {
                            while c.query_one("SELECT 1", &[]).await.is_ok() {
                                ok += 1;
                                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                                    break;
                                }
                            }
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                ok
            })
        })
        .collect();
    let c = connect(&url).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1, "load is running");
    pg.pg_ctl_stop();
    // While Postgres is down, a query from a connected client waits in the queue instead of failing at once...
    let waiting = tokio::spawn(async move { c.query_one("SELECT 'back'::text", &[]).await.map(|r| r.get::<_, String>(0)) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back_at = std::time::Instant::now();
    pg.pg_ctl_start();
    // ...and succeeds once it is back.
    let answer = waiting.await.unwrap();
    assert_eq!(answer.map_err(|e| code(&e)).as_deref(), Ok("back"), "{}", pg.log_tail());
    let recovered_in = back_at.elapsed();
    let fresh = connect(&url).await;
    assert_eq!(fresh.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // Not a timing assertion on the runner: a bound wide enough that only a missing reconnect could break it.
    assert!(recovered_in < Duration::from_secs(15), "recovered after {recovered_in:?}");
}

#[tokio::test]
async fn max_client_conn_refuses_with_fatal_53300_at_startup() {
    let proxy = Proxy::start(Settings { max_client_conn: Some(2), ..Default::default() }).await;
    let _a = proxy.client().await;
    let _b = proxy.client().await;
    let Err(err) = try_connect(&proxy.app_url()).await else { panic!("third client refused") };
    assert_eq!(code(&err), "53300");
}

#[tokio::test]
async fn a_client_that_never_finishes_startup_is_closed_after_client_login_timeout() {
    let proxy = Proxy::start(Settings { client_login_timeout: Some(Dur(Duration::from_millis(200))), ..Default::default() }).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = vec![];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("closed by the proxy, not by our deadline");
    assert!(n.is_ok());
    assert_eq!(buf.first(), Some(&b'E'), "an error explains why");
}
