//! An upstream reached over Postgres' Unix-domain socket (`?host=/dir`, as libpq): login, pooling, cancel.

use std::time::Duration;

use pgsurge::config::{Dur, Settings};

use crate::harness::*;

/// pgsurge in front of the shared cluster's socket directory, pool size 1, every reuse checked for liveness.
async fn over_the_socket(password: &str) -> Option<Proxy> {
    let pg = pg();
    let dir = pg.dir.as_ref()?; // PGSURGE_TEST_DATABASE_URL: no socket directory of ours to point at
    let settings = Settings {
        upstream: Some(format!("postgres://app:{password}@/app?host={}&port={}", dir.display(), pg.port)),
        pool_size: Some(1),
        server_check_delay: Some(Dur(Duration::ZERO)),
        ..Default::default()
    };
    Some(Proxy::start(settings).await)
}

#[tokio::test]
async fn queries_reach_postgres_over_its_unix_socket_with_scram_and_reuse_one_connection() {
    let Some(proxy) = over_the_socket("app").await else { return };
    let c = proxy.url("app", "app", "app");
    let first = connect(&c).await;
    // inet_server_addr() is NULL exactly when the backend's client came in over a Unix-domain socket.
    let row = first.query_one("SELECT inet_server_addr() IS NULL, current_user, pg_backend_pid()", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0), "the server connection is not on the Unix socket");
    assert_eq!(row.get::<_, String>(1), "app");
    let pid: i32 = row.get(2);
    drop(first);
    // The idle connection passed its liveness check (a peek on the socket) and was reused, not replaced.
    let second = connect(&c).await;
    let again: i32 = second.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(again, pid);
}

#[tokio::test]
async fn a_wrong_upstream_password_over_the_socket_is_refused_by_postgres() {
    let Some(proxy) = over_the_socket("wrong").await else { return };
    let err = try_connect(&proxy.url("app", "wrong", "app")).await.expect_err("Postgres refuses the password");
    assert_eq!(code(&err), "28P01", "{err}");
}

#[tokio::test]
async fn a_cancel_is_forwarded_over_the_socket() {
    let Some(proxy) = over_the_socket("app").await else { return };
    let c = connect(&proxy.url("app", "app", "app")).await;
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await });
    let sup = pg().super_client("app").await;
    let running = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(60)'";
    assert!(
        eventually(Duration::from_secs(10), || async { sup.query_one(running, &[]).await.unwrap().get::<_, i64>(0) == 1 }).await,
        "the sleep never started in Postgres"
    );
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), sleeper).await.expect("the cancel ended the sleep").unwrap().unwrap_err();
    assert_eq!(code(&err), "57014", "{err}");
}
