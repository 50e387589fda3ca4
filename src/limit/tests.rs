//! Limiter unit tests on tokio's paused clock.

use std::net::IpAddr;
use std::time::Duration;

use super::*;
use crate::config::Settings;

fn limits(toml_text: &str, flags: Settings) -> LimitConfig {
    let file: Settings = toml::from_str(toml_text).unwrap();
    LimitConfig::build(&flags.layer(file)).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn over_its_rate_a_client_is_delayed_then_refused_and_another_user_is_not() {
    let flags = Settings {
        limit_qps_per_user: Some(10),
        limit_burst: Some(2),
        limit_max_delay: Some(crate::config::Dur(Duration::from_millis(150))),
        ..Default::default()
    };
    let l = Limiter::new(&limits("", flags));
    let max_delay = l.config().max_delay;
    let mut a = l.admit("a", "app", ip("127.0.0.1")).await.unwrap();
    assert!(a.is_active());
    let start = Instant::now();
    a.request(2, false, max_delay).await.unwrap(); // the burst
    assert_eq!(start.elapsed(), Duration::ZERO);
    a.request(1, false, max_delay).await.unwrap(); // waits for the next token (100 ms)
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    a.request(1, false, max_delay).await.unwrap();
    // three tokens in 150 ms are not to be had: refused, with when to retry
    let err = a.request(3, false, max_delay).await.unwrap_err();
    assert_eq!(err.sqlstate(), "53400");
    let Error::RateLimited { retry_after, message } = &err else { panic!("{err}") };
    assert!(*retry_after > Duration::ZERO && *retry_after <= Duration::from_millis(200), "{retry_after:?}");
    assert!(message.contains("user \"a\""), "{message}");

    let mut b = l.admit("b", "app", ip("127.0.0.1")).await.unwrap();
    let t = Instant::now();
    b.request(2, false, max_delay).await.unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO, "user b has its own bucket");

    let (cols, rows) = l.show_rows();
    let col = |n: &str| cols.iter().position(|c| *c == n).unwrap();
    let row = rows.iter().find(|r| r[0] == "user" && r[1] == "a").unwrap();
    assert!(row[col("delayed")].parse::<u64>().unwrap() >= 2, "{row:?}");
    assert_eq!(row[col("rejected")], "1");
    assert!(l.prometheus().contains("pgsurge_limit_requests_total{scope=\"user\",key=\"a\",outcome=\"rejected\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn a_long_wait_bound_waits_instead_of_refusing() {
    let l = Limiter::new(&limits("[limits.per_user]\nqps = 10\nburst = 1\n", Settings::default()));
    let mut a = l.admit("a", "app", ip("127.0.0.1")).await.unwrap();
    let t = Instant::now();
    a.request(5, false, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(400));
}

#[tokio::test(start_paused = true)]
async fn connection_caps_and_rates_refuse_with_53300_and_release_on_drop() {
    let cfg = limits(
        r#"
        [limits.per_user]
        max_connections = 2
        [limits.address_groups.office]
        cidrs = ["10.0.0.0/8"]
        connections_per_second = 1
        burst = 1
        "#,
        Settings::default(),
    );
    let l = Limiter::new(&cfg);
    let a1 = l.admit("a", "app", ip("127.0.0.1")).await.unwrap();
    let _a2 = l.admit("a", "app", ip("127.0.0.1")).await.unwrap();
    let e = l.admit("a", "app", ip("127.0.0.1")).await.err().unwrap();
    assert_eq!((e.sqlstate(), e.severity()), ("53300", crate::error::Severity::Fatal));
    drop(a1);
    let _a3 = l.admit("a", "app", ip("127.0.0.1")).await.unwrap();

    let _o = l.admit("b", "app", ip("10.1.2.3")).await.unwrap();
    let e = l.admit("c", "app", ip("10.9.9.9")).await.err().unwrap();
    assert!(e.to_string().contains("group:office"), "{e}");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(l.admit("c", "app", ip("10.9.9.9")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_client_addresses_do_not_grow_memory_without_bound() {
    let l = Limiter::new(&limits("[limits.per_address]\nqps = 100\nmax_connections = 5\n", Settings::default()));
    for i in 0..100_000u32 {
        let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let mut a = l.admit("app", "app", addr).await.unwrap();
        a.request(1, false, Duration::ZERO).await.unwrap();
    }
    assert_eq!(l.tracked_keys(), 100_000);
    assert_eq!(l.counted_keys(), 0, "connection counts go when the connections do");
    assert!(l.show_rows().1.len() <= MAX_ADDRESS_STATS + 2, "counters are capped");
    tokio::time::advance(Duration::from_secs(2)).await;
    l.maintain();
    assert_eq!(l.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_reload_applies_new_rates_to_connected_clients_and_keeps_unchanged_buckets() {
    let l = Limiter::new(&limits("[limits.per_user]\nqps = 1\nburst = 1\n", Settings::default()));
    let mut a = l.admit("a", "app", ip("127.0.0.1")).await.unwrap();
    a.request(1, false, Duration::ZERO).await.unwrap();
    assert!(a.request(1, false, Duration::ZERO).await.is_err());
    l.reload(&limits("[limits.per_user]\nqps = 1\nburst = 1\n[limits.global]\nmax_connections = 1\n", Settings::default()));
    assert!(a.is_active());
    assert!(a.request(1, false, Duration::ZERO).await.is_err(), "the unchanged user rate kept its bucket");
    l.reload(&limits("[limits.per_user]\nqps = 1000\n", Settings::default()));
    assert!(a.is_active());
    a.request(10, false, Duration::ZERO).await.unwrap();
    l.reload(&LimitConfig::default());
    assert!(!a.is_active());
}
