//! Raw wire behaviour: SSL refusal, protocol negotiation, cancel routing, and hostile input answered 08P01
//! without touching other clients.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgsurge::config::Settings;
use pgsurge::protocol::encode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{code, Proxy};

/// Reads until the peer closes or 5 s pass; returns everything received.
async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// The SQLSTATE of the first ErrorResponse in `bytes`.
fn error_code(bytes: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let len = i32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize;
        if bytes[at] == b'E' {
            let e = pgsurge::protocol::view::ErrorView::parse(&bytes[at + 5..at + 1 + len])?;
            return Some(e.code);
        }
        at += 1 + len;
    }
    None
}

#[tokio::test]
async fn ssl_and_gss_requests_are_answered_n_and_login_continues() {
    let proxy = Proxy::start(Settings::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&encode::startup(&[("user", "app"), ("database", "app")])).await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"R", "authentication request follows");
}

#[tokio::test]
async fn a_protocol_3_2_client_is_negotiated_down_to_3_0() {
    let proxy = Proxy::start(Settings::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pkt = BytesMut::new();
    pkt.put_i32(0);
    pkt.put_u32(196_610);
    for kv in ["user", "app", "database", "app", "_pq_.future", "1", ""] {
        pkt.put_slice(kv.as_bytes());
        pkt.put_u8(0);
    }
    let len = pkt.len() as i32;
    pkt[..4].copy_from_slice(&len.to_be_bytes());
    s.write_all(&pkt).await.unwrap();
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'v');
    let mut body = vec![0u8; i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize - 4];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body[..4], &[0, 0, 0, 0], "newest minor version: 0");
    assert_eq!(&body[4..8], &[0, 0, 0, 1], "one option not taken");
    assert_eq!(&body[8..], b"_pq_.future\0");
}

#[tokio::test]
async fn hostile_startup_packets_get_08p01_and_other_clients_carry_on() {
    let proxy = Proxy::start(Settings::default()).await;
    let good = proxy.client().await;
    for junk in [&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0][..], &[0, 0, 0, 2], &[0, 0, 0, 9, 0, 3, 0, 0, b'u'], &[0, 0, 0, 8, 0, 2, 0, 0]] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        let reply = read_all(&mut s).await;
        assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "for {junk:?}");
    }
    assert_eq!(good.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

/// Logs in over a raw socket with SCRAM (via tokio-postgres' own SCRAM client code would need a codec; use
/// trust for raw clients instead).
async fn raw_logged_in(proxy: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&encode::startup(&[("user", "app"), ("database", "app")])).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        s.read_buf(&mut buf).await.unwrap();
        if buf.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
            return s;
        }
    }
}

fn trusting() -> Settings {
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
    Settings { users, pool_size: Some(1), ..Default::default() }
}

#[tokio::test]
async fn oversized_and_unknown_messages_get_08p01_and_only_that_client_is_closed() {
    let proxy = Proxy::start(trusting()).await;
    let good = crate::harness::connect(&format!("host=127.0.0.1 port={} user=app dbname=app", proxy.addr.port())).await;

    let mut s = raw_logged_in(&proxy).await;
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(error_code(&read_all(&mut s).await).as_deref(), Some("08P01"), "a 2 GiB claim is refused before any allocation");

    let mut s = raw_logged_in(&proxy).await;
    s.write_all(&[b'Q', 0, 0, 0, 2]).await.unwrap();
    assert_eq!(error_code(&read_all(&mut s).await).as_deref(), Some("08P01"), "a length below 4");

    let mut s = raw_logged_in(&proxy).await;
    s.write_all(&[b'z', 0, 0, 0, 4]).await.unwrap();
    assert_eq!(error_code(&read_all(&mut s).await).as_deref(), Some("08P01"), "an unknown message type");

    assert_eq!(good.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2, "the well-behaved client never noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_only_the_query_of_the_client_that_sent_it() {
    let proxy = Proxy::start(Settings { pool_size: Some(1), ..Default::default() }).await;
    let a = proxy.client().await;
    let b = proxy.client().await;

    // a's cancel after its query finished must not hit b's query now running on the same server.
    a.query_one("SELECT 1", &[]).await.unwrap();
    let a_token = a.cancel_token();
    let b_run = tokio::spawn(async move { b.query_one("SELECT pg_sleep(0.5)::text", &[]).await.map(|_| b) });
    tokio::time::sleep(Duration::from_millis(150)).await;
    a_token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let b = b_run.await.unwrap().expect("b's query was not cancelled by a's stale cancel");

    // b's own cancel stops b's query with 57014, and b stays usable.
    let b_token = b.cancel_token();
    let running = tokio::spawn(async move { (b.query_one("SELECT pg_sleep(10)::text", &[]).await.err(), b) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    b_token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (err, b) = running.await.unwrap();
    assert_eq!(code(&err.expect("cancelled")), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(b.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_waiting_for_a_server_ends_the_wait_with_57014() {
    let proxy = Proxy::start(Settings { pool_size: Some(1), ..Default::default() }).await;
    let holder = proxy.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiter = proxy.client().await;
    let token = waiter.cancel_token();
    let w = tokio::spawn(async move { (waiter.query_one("SELECT 1", &[]).await.err(), waiter) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (err, waiter) = w.await.unwrap();
    assert_eq!(code(&err.expect("cancelled in the queue")), "57014");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiter.query_one("SELECT 4", &[]).await.unwrap().get::<_, i32>(0), 4);
}

/// Frontend messages of the extended protocol, unnamed statement and portal, no parameters.
fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    encode::put_msg(out, b'P', |b| {
        encode::put_cstr(b, name);
        encode::put_cstr(b, sql);
        b.put_i16(0);
    });
}

fn bind(out: &mut BytesMut, statement: &str) {
    encode::put_msg(out, b'B', |b| {
        encode::put_cstr(b, "");
        encode::put_cstr(b, statement);
        b.put_slice(&[0, 0, 0, 0, 0, 0]);
    });
}

fn describe_execute(out: &mut BytesMut) {
    encode::put_msg(out, b'D', |b| b.put_slice(b"P\0"));
    encode::put_msg(out, b'E', |b| b.put_slice(&[0, 0, 0, 0, 0]));
}

/// Reads whole messages until one with tag `until` has arrived; returns their tags and the bytes.
async fn read_until(s: &mut TcpStream, buf: &mut BytesMut, until: u8) -> (Vec<u8>, Vec<u8>) {
    let (mut tags, mut bytes) = (vec![], vec![]);
    loop {
        while buf.len() >= 5 {
            let n = 1 + u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < n {
                break;
            }
            let m = buf.split_to(n);
            tags.push(m[0]);
            bytes.extend_from_slice(&m);
            if m[0] == until {
                return (tags, bytes);
            }
        }
        assert!(s.read_buf(buf).await.unwrap() > 0, "connection closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_in_a_pipeline_whose_sync_is_not_sent_yet_skips_to_that_sync_and_frees_the_server() {
    // psycopg's pipeline mode: the error comes back (after a Flush) before the rest of the run and its Sync
    // are sent. Postgres ignores everything up to that Sync and answers only the Sync; so must pgsurge, and the
    // one server connection of the pool must be free again for the next client.
    let proxy = Proxy::start(trusting()).await;
    let mut s = raw_logged_in(&proxy).await;
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    parse(&mut out, "", "SELECT 1/0");
    bind(&mut out, "");
    out.extend_from_slice(&encode::flush());
    s.write_all(&out).await.unwrap();
    let (tags, bytes) = read_until(&mut s, &mut buf, b'E').await;
    assert_eq!(tags, b"1E");
    assert_eq!(error_code(&bytes).as_deref(), Some("22012"));

    let mut out = BytesMut::new();
    describe_execute(&mut out);
    parse(&mut out, "", "SELECT 1");
    bind(&mut out, "");
    describe_execute(&mut out);
    parse(&mut out, "named_after_error", "SELECT 2");
    out.extend_from_slice(&encode::query("SELECT 3"));
    encode::put_msg(&mut out, b'S', |_| {});
    out.extend_from_slice(&encode::flush());
    s.write_all(&out).await.unwrap();
    let (tags, _) = read_until(&mut s, &mut buf, b'Z').await;
    assert_eq!(tags, b"Z", "only the Sync is answered, as Postgres does");

    let other = crate::harness::connect(&format!("host=127.0.0.1 port={} user=app dbname=app", proxy.addr.port())).await;
    let n = tokio::time::timeout(Duration::from_secs(20), other.query_one("SELECT 2", &[])).await;
    assert_eq!(n.expect("the pool's one server connection was given back").unwrap().get::<_, i32>(0), 2);

    // The same connection works on, and the statement skipped after the error was never prepared.
    let mut out = BytesMut::new();
    bind(&mut out, "named_after_error");
    encode::put_msg(&mut out, b'S', |_| {});
    s.write_all(&out).await.unwrap();
    let (tags, bytes) = read_until(&mut s, &mut buf, b'Z').await;
    assert_eq!(tags, b"EZ");
    assert_eq!(error_code(&bytes).as_deref(), Some("26000"), "prepared statement does not exist, as in Postgres");
    let mut out = BytesMut::new();
    parse(&mut out, "", "SELECT 41 + 1");
    bind(&mut out, "");
    describe_execute(&mut out);
    encode::put_msg(&mut out, b'S', |_| {});
    s.write_all(&out).await.unwrap();
    let (tags, _) = read_until(&mut s, &mut buf, b'Z').await;
    assert_eq!(tags, b"12TDCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_flush_or_sync_takes_no_server_connection() {
    // psycopg sends a Flush after every pipeline: with nothing pending it asks nothing of a server, and must not
    // hold the pool's one connection while the client thinks.
    let proxy = Proxy::start(trusting()).await;
    let mut s = raw_logged_in(&proxy).await;
    let mut buf = BytesMut::new();
    s.write_all(&encode::flush()).await.unwrap();
    let other = crate::harness::connect(&format!("host=127.0.0.1 port={} user=app dbname=app", proxy.addr.port())).await;
    let n = tokio::time::timeout(Duration::from_secs(20), other.query_one("SELECT 2", &[])).await;
    assert_eq!(n.expect("the Flush did not take the pool's one server connection").unwrap().get::<_, i32>(0), 2);

    let mut out = BytesMut::new();
    encode::put_msg(&mut out, b'S', |_| {});
    out.extend_from_slice(&encode::flush());
    s.write_all(&out).await.unwrap();
    let (tags, bytes) = read_until(&mut s, &mut buf, b'Z').await;
    assert_eq!((tags, bytes.last().copied()), (b"Z".to_vec(), Some(b'I')), "a lone Sync is answered ReadyForQuery idle");
    let n = tokio::time::timeout(Duration::from_secs(20), other.query_one("SELECT 3", &[])).await;
    assert_eq!(n.expect("nor did the Sync").unwrap().get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_eviction_an_error_skipped_is_closed_before_it_is_prepared_again() {
    // One server connection that keeps one prepared statement: preparing B evicts A (pgsurge sends Close A), but
    // an error earlier in the same run makes the server skip that Close. Preparing A again must first close it
    // for real, or Postgres answers 42P05 "prepared statement already exists".
    let mut settings = trusting();
    settings.max_prepared_statements = Some(1);
    let proxy = Proxy::start(settings).await;
    let mut s = raw_logged_in(&proxy).await;
    let mut buf = BytesMut::new();

    let mut out = BytesMut::new();
    parse(&mut out, "a", "SELECT 1");
    encode::put_msg(&mut out, b'S', |_| {});
    s.write_all(&out).await.unwrap();
    assert_eq!(read_until(&mut s, &mut buf, b'Z').await.0, b"1Z");

    let mut out = BytesMut::new();
    parse(&mut out, "", "SELECT 1/0");
    bind(&mut out, "");
    describe_execute(&mut out);
    parse(&mut out, "b", "SELECT 2");
    encode::put_msg(&mut out, b'S', |_| {});
    s.write_all(&out).await.unwrap();
    let (tags, bytes) = read_until(&mut s, &mut buf, b'Z').await;
    assert_eq!((tags, error_code(&bytes).as_deref()), (b"1EZ".to_vec(), Some("22012")));

    let mut out = BytesMut::new();
    parse(&mut out, "a_again", "SELECT 1");
    bind(&mut out, "a_again");
    describe_execute(&mut out);
    encode::put_msg(&mut out, b'S', |_| {});
    s.write_all(&out).await.unwrap();
    let (tags, bytes) = read_until(&mut s, &mut buf, b'Z').await;
    assert_eq!(error_code(&bytes), None);
    assert_eq!(tags, b"12TDCZ");
}
