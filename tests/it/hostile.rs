//! Hostile clients (issue 15): a startup trickled byte by byte, and after login lengths that lie, counts that
//! overflow, a huge claimed length trickled in; each gets an error or a close quickly, and a well-behaved client
//! beside them never notices.

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pgsurge::config::{Dur, Settings, UserSettings};
use pgsurge::protocol::encode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{connect, Proxy};

/// User `app` logs in without a password, so a raw socket can log in.
fn trusting() -> Settings {
    let mut users = std::collections::BTreeMap::new();
    users.insert(
        "app".to_string(),
        UserSettings { password: Some("app".into()), auth_type: Some("trust".into()), pool_size: None, ..Default::default() },
    );
    Settings { users, pool_size: Some(2), ..Default::default() }
}

async fn logged_in(proxy: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&encode::startup(&[("user", "app"), ("database", "app")])).await.unwrap();
    let mut buf = BytesMut::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !buf.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        assert!(Instant::now() < deadline, "no ReadyForQuery within 20 s");
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed during login");
    }
    s
}

/// Everything the peer sends until it closes, or `None` if it has not closed within `within`.
async fn until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut out = vec![];
    tokio::time::timeout(within, s.read_to_end(&mut out)).await.ok().map(|_| out)
}

/// The SQLSTATE of the first ErrorResponse in `bytes`.
fn error_code(bytes: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize;
        if bytes[at] == b'E' && at + 1 + len <= bytes.len() {
            return pgsurge::protocol::view::ErrorView::parse(&bytes[at + 5..at + 1 + len]).map(|e| e.code);
        }
        at += 1 + len;
    }
    None
}

/// Reads until a ReadyForQuery or an ErrorResponse-then-close; returns the bytes. Bounded to 10 s.
async fn answer(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if buf.len() >= 6 && buf[buf.len() - 6] == b'Z' {
            return buf.to_vec();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return buf.to_vec(),
        }
    }
}

async fn still_fine(good: &tokio_postgres::Client, n: i32) {
    let got = tokio::time::timeout(Duration::from_secs(10), good.query_one("SELECT $1::int4", &[&n])).await;
    assert_eq!(got.expect("the good client answered within 10 s").unwrap().get::<_, i32>(0), n, "the good client never noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_trickled_byte_by_byte_is_closed_at_client_login_timeout() {
    let settings = Settings { client_login_timeout: Some(Dur(Duration::from_secs(1))), ..trusting() };
    let proxy = Proxy::start(settings).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let pkt = encode::startup(&[("user", "app"), ("database", "app"), ("application_name", "slowloris")]);
    let started = Instant::now();
    let mut closed = false;
    // One byte every 100 ms: the whole packet would take several seconds.
    for b in pkt.iter() {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => {
                assert_eq!(error_code(&probe[..n]).as_deref(), Some("08P01"), "a FATAL for the login timeout");
                closed = until_closed(&mut s, Duration::from_secs(5)).await.is_some();
                break;
            }
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    assert!(closed, "the trickling client was closed before it finished its packet");
    assert!(took < Duration::from_secs(5), "closed after {took:?}, not about client_login_timeout (1 s)");
    still_fine(&good, 1).await;
}

#[test]
fn client_login_timeout_defaults_to_ten_seconds_or_less() {
    let settings = Settings { upstream: Some("postgres://app:app@127.0.0.1:5/app".into()), ..Default::default() };
    let config = pgsurge::Config::build(settings).unwrap();
    assert!(config.client_login_timeout <= Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_shorter_than_its_message_is_refused_with_08p01() {
    let proxy = Proxy::start(trusting()).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    let mut s = logged_in(&proxy).await;
    // Query claims 2 bytes of text; the rest of "SELECT 1" then reads as a message of type 'L'.
    let mut out = BytesMut::new();
    out.put_u8(b'Q');
    out.put_u32(6);
    out.put_slice(b"SELECT 1\0");
    s.write_all(&out).await.unwrap();
    let reply = until_closed(&mut s, Duration::from_secs(5)).await.expect("closed within 5 s");
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    still_fine(&good, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_type_is_refused_on_its_header_before_its_body_arrives() {
    let proxy = Proxy::start(trusting()).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    let mut s = logged_in(&proxy).await;
    // Type 0xF6 claiming 1,000 bytes, 10 of them sent: Postgres answers at once, so must pgsurge.
    let mut out = BytesMut::new();
    out.put_u8(0xF6);
    out.put_u32(1000);
    out.put_slice(&[7; 10]);
    s.write_all(&out).await.unwrap();
    let reply = until_closed(&mut s, Duration::from_secs(3)).await.expect("closed within 3 s, without the rest of the body");
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    still_fine(&good, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_query_length_trickled_byte_by_byte_is_refused_on_its_header() {
    let proxy = Proxy::start(trusting()).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    let mut s = logged_in(&proxy).await;
    let header = [b'Q', 0x40, 0, 0, 4]; // 1 GiB + 4: over max_message_size (256 MiB)
    for b in header {
        s.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let reply = until_closed(&mut s, Duration::from_secs(3)).await.expect("closed on the header, before any body");
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    assert!(started.elapsed() < Duration::from_secs(3));
    still_fine(&good, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_under_the_limit_trickled_holds_only_what_arrived() {
    // 200 MiB claimed, under the default limit: the claim is legal and the connection waits for its body, as
    // Postgres does; the buffer grows with the bytes that arrive, not with the claim. The client then leaves.
    let proxy = Proxy::start(trusting()).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    let mut s = logged_in(&proxy).await;
    let mut out = BytesMut::new();
    out.put_u8(b'Q');
    out.put_u32(200 << 20);
    out.put_slice(b"SELECT '");
    s.write_all(&out).await.unwrap();
    for _ in 0..20 {
        s.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_fine(&good, 5).await;
    drop(s);
    let gone = crate::harness::eventually(Duration::from_secs(10), || async { proxy.app.client_count() == 1 }).await;
    assert!(gone, "the trickling client's session ended when it left");
    still_fine(&good, 6).await;
}

/// A Bind with `nparams` claimed and the bytes of `have` parameters.
fn bind_claiming(nparams: u16, have: usize) -> BytesMut {
    let mut out = BytesMut::new();
    encode::put_msg(&mut out, b'P', |b| {
        encode::put_cstr(b, "");
        encode::put_cstr(b, "SELECT $1::int4");
        b.put_i16(0);
    });
    encode::put_msg(&mut out, b'B', |b| {
        encode::put_cstr(b, "");
        encode::put_cstr(b, "");
        b.put_i16(0);
        b.put_u16(nparams);
        for _ in 0..have {
            b.put_i32(1);
            b.put_u8(b'7');
        }
        b.put_i16(0);
    });
    encode::put_msg(&mut out, b'E', |b| b.put_slice(&[0, 0, 0, 0, 0]));
    encode::put_msg(&mut out, b'S', |_| {});
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_parameter_counts_that_overflow_get_an_error() {
    let proxy = Proxy::start(trusting()).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    for (claimed, have) in [(0xFFFF, 1), (0x8000, 1), (32767, 1), (2, 1)] {
        let mut s = logged_in(&proxy).await;
        s.write_all(&bind_claiming(claimed, have)).await.unwrap();
        let reply = answer(&mut s).await;
        assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "Bind claiming {claimed} parameters with {have}");
        still_fine(&good, claimed as i32).await;
    }
    // A well-formed Bind still works on a fresh connection, and the pool is not wedged.
    let mut s = logged_in(&proxy).await;
    s.write_all(&bind_claiming(1, 1)).await.unwrap();
    let reply = answer(&mut s).await;
    assert_eq!(error_code(&reply), None, "one parameter, one value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_claiming_65535_parameter_types_gets_an_error() {
    let proxy = Proxy::start(trusting()).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    for (claimed, have) in [(65535u16, 0usize), (65535, 3), (32767, 0)] {
        let mut s = logged_in(&proxy).await;
        let mut out = BytesMut::new();
        encode::put_msg(&mut out, b'P', |b| {
            encode::put_cstr(b, "");
            encode::put_cstr(b, "SELECT 1");
            b.put_u16(claimed);
            for _ in 0..have {
                b.put_u32(23);
            }
        });
        encode::put_msg(&mut out, b'S', |_| {});
        s.write_all(&out).await.unwrap();
        let reply = answer(&mut s).await;
        assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "Parse claiming {claimed} types with {have}");
        still_fine(&good, have as i32).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_hostile_clients_at_once_leave_a_good_one_untouched() {
    let proxy = Proxy::start(trusting()).await;
    let good = connect(&proxy.url("app", "app", "app")).await;
    let mut tasks = vec![];
    for i in 0..40u32 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&encode::startup(&[("user", "app"), ("database", "app")])).await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            let junk: &[u8] = match i % 4 {
                0 => &[b'Q', 0x7f, 0xff, 0xff, 0xff],
                1 => &[0xF6, 0, 0, 3, 232, 1, 2, 3],
                2 => &[b'Q', 0, 0, 0, 6, b'S', b'E', b'L', b'E'],
                // A Bind claiming 65,535 parameters, then Sync: an error, and the connection lives on.
                _ => &[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0xff, 0xff, 0, 0, b'S', 0, 0, 0, 4],
            };
            let _ = s.write_all(junk).await;
            // Answered: an ErrorResponse, or closed.
            let reply = answer(&mut s).await;
            error_code(&reply).as_deref() == Some("08P01") || (i % 4 == 3 && error_code(&reply).is_some())
        }));
        if i % 10 == 0 {
            still_fine(&good, i as i32).await;
        }
    }
    for t in tasks {
        assert!(t.await.unwrap(), "every hostile client got its error within 10 s");
    }
    still_fine(&good, 99).await;
}
