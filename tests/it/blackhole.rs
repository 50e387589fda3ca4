//! A network that stops answering: a relay between pgsurge and Postgres that can stop forwarding without closing
//! anything (a black hole: no FIN, no RST, nothing). Clients get an error within the configured bounds instead of
//! hanging, and new queries succeed soon after the relay forwards again.

use std::time::{Duration, Instant};

use pgsurge::config::{Dur, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::harness::{code, connect, pg, try_connect, Proxy};

/// A TCP relay to `upstream` whose forwarding can be switched off and on. Switched off it holds what it reads,
/// as a pulled cable would (the peers retransmit and, once the path is back, everything arrives).
struct Relay {
    port: u16,
    on: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (on, rx) = watch::channel(true);
        let task = tokio::spawn(async move {
            // Bounded: the test ends the relay (abort) when it is done.
            while let Ok((down, _)) = listener.accept().await {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    if rx.wait_for(|f| *f).await.is_err() {
                        return;
                    }
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(pump(dr, uw, rx.clone()), pump(ur, dw, rx));
                });
            }
        });
        Relay { port, on, task }
    }

    fn forward(&self, on: bool) {
        self.on.send_replace(on);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction while forwarding is on; while off, reads are held (and an end of stream too).
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut on: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if on.wait_for(|f| *f).await.is_err() || n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_gives_errors_in_time_and_recovers_at_once() {
    let relay = Relay::start(pg().port).await;
    let settings = Settings {
        upstream: Some(format!("postgres://app:app@127.0.0.1:{}/app", relay.port)),
        pool_size: Some(2),
        query_timeout: Some(Dur(Duration::from_secs(1))),
        query_cancel_timeout: Some(Dur(Duration::from_secs(1))),
        server_connect_timeout: Some(Dur(Duration::from_secs(1))),
        query_wait_timeout: Some(Dur(Duration::from_secs(3))),
        ..Default::default()
    };
    let proxy = Proxy::start(settings).await;
    let held = connect(&proxy.app_url()).await;
    let fresh = connect(&proxy.app_url()).await;
    assert_eq!(held.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1, "through the relay");

    relay.forward(false);
    let started = Instant::now();
    // `held` gets the pooled connection, whose server no longer answers: query_timeout cancels (the cancel is
    // swallowed too), query_cancel_timeout later the connection is closed and the client gets 57014.
    let on_pooled = tokio::spawn(async move {
        let r = held.query_one("SELECT 1", &[]).await;
        (r.map(|_| ()).map_err(|e| code(&e)), started.elapsed())
    });
    // `fresh` needs a new server connection: each login attempt times out (server_connect_timeout), and the wait
    // ends at query_wait_timeout with the upstream's reason.
    let tokio_started = tokio::time::Instant::now();
    let on_new = tokio::spawn(async move {
        tokio::time::sleep_until(tokio_started + Duration::from_millis(200)).await; // after `held` took the pooled one
        let r = fresh.query_one("SELECT 1", &[]).await;
        (r.map(|_| ()).map_err(|e| code(&e)), started.elapsed())
    });
    let bound = Duration::from_secs(10); // generous: the limits themselves are 2 s and 3 s
    let (pooled, pooled_after) = tokio::time::timeout(bound, on_pooled).await.expect("an error, not a hang").unwrap();
    let (new, new_after) = tokio::time::timeout(bound, on_new).await.expect("an error, not a hang").unwrap();
    assert_eq!(pooled, Err("57014".to_string()), "query_timeout holds though the cancel cannot be delivered");
    assert!(new == Err("08001".to_string()) || new == Err("53300".to_string()), "no server connection: {new:?}");
    assert!(pooled_after >= Duration::from_secs(2) && pooled_after < Duration::from_secs(6), "{pooled_after:?}");
    assert!(new_after >= Duration::from_secs(2) && new_after < Duration::from_secs(8), "{new_after:?}");

    relay.forward(true);
    let healed = Instant::now();
    let mut recovered = None;
    for _ in 0..100 {
        if let Ok(c) = try_connect(&proxy.app_url()).await {
            if c.query_one("SELECT 1", &[]).await.is_ok() {
                recovered = Some(healed.elapsed());
                break;
            }
        }
        if healed.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = recovered.expect("queries succeed again once the relay forwards");
    eprintln!(
        "blackhole: pooled connection error after {:.2} s (query_timeout 1s + query_cancel_timeout 1s), new connection \
         error after {:.2} s (query_wait_timeout 3s), recovered {:.3} s after the path healed",
        pooled_after.as_secs_f64(),
        new_after.as_secs_f64(),
        recovered.as_secs_f64()
    );
    assert!(recovered < Duration::from_secs(2), "recovered after {recovered:?}");
    // The closed connection's pool slot came back: both of the pool's connections can be used at once.
    let a = connect(&proxy.app_url()).await;
    a.batch_execute("BEGIN").await.unwrap();
    let b = connect(&proxy.app_url()).await;
    b.batch_execute("BEGIN").await.unwrap();
    assert_eq!(b.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2, "two transactions at once on a pool of 2");
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("COMMIT").await.unwrap();
}
