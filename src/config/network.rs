//! The upstream network keys: several hosts per database (`host = "h1,h2"`, `port = "5432,5433"`),
//! `target_session_attrs`, and the keepalive and TCP_USER_TIMEOUT of server connections.

use std::time::Duration;

use super::{bad, ConfigError, DatabaseSettings, Dur, Settings};

/// `target_session_attrs` (default any).
pub(super) fn upstream_attrs(s: Option<&str>) -> Result<crate::backend::hosts::TargetSessionAttrs, ConfigError> {
    let name = s.unwrap_or("any");
    crate::backend::hosts::TargetSessionAttrs::parse(name).ok_or_else(|| {
        bad(format!("target_session_attrs must be any, read-write, read-only, primary, standby or prefer-standby, not {name:?}"))
    })
}

/// The keepalive and TCP_USER_TIMEOUT keys of server connections.
pub(super) fn server_tcp(s: &Settings) -> Result<crate::backend::socket::TcpOpts, ConfigError> {
    let d = crate::backend::socket::TcpOpts::default();
    let whole = |key: &str, v: Option<Dur>, default: Duration| -> Result<Duration, ConfigError> {
        match v.map(|d| d.0) {
            None => Ok(default),
            Some(v) if v >= Duration::from_secs(1) && v.subsec_nanos() == 0 && v.as_secs() <= 32767 => Ok(v),
            Some(v) => Err(bad(format!("{key} must be whole seconds from 1s to 32767s, not {v:?}"))),
        }
    };
    let count = s.server_tcp_keepcnt.unwrap_or(d.count);
    if !(1..=127).contains(&count) {
        return Err(bad(format!("server_tcp_keepcnt must be from 1 to 127, not {count}")));
    }
    let user_timeout = s.tcp_user_timeout.map(|d| d.0).unwrap_or(d.user_timeout);
    if user_timeout > Duration::from_secs(24 * 3600) || (user_timeout.as_nanos() % 1_000_000) != 0 {
        return Err(bad(format!("tcp_user_timeout must be whole milliseconds up to 24h, not {user_timeout:?}")));
    }
    Ok(crate::backend::socket::TcpOpts {
        keepalive: s.server_tcp_keepalive.unwrap_or(d.keepalive),
        idle: whole("server_tcp_keepidle", s.server_tcp_keepidle, d.idle)?,
        interval: whole("server_tcp_keepintvl", s.server_tcp_keepintvl, d.interval)?,
        count,
        user_timeout,
    })
}

/// The first host and its port, then the others in order.
pub(super) type Hosts = (String, u16, Vec<(String, u16)>);

/// A `[databases.NAME]` section's hosts: `host = "h1,h2"` with `port = 5432` or `port = "5432,5433"`; the
/// upstream's first host (else 127.0.0.1:5432) where it names none.
pub(super) fn database_hosts(name: &str, d: &DatabaseSettings, default: Option<(String, u16)>) -> Result<Hosts, ConfigError> {
    let hosts: Vec<String> = match &d.host {
        Some(h) => h.split(',').map(|x| x.trim().to_string()).collect(),
        None => vec![default.as_ref().map(|h| h.0.clone()).unwrap_or_else(|| "127.0.0.1".into())],
    };
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(bad(format!("databases.{name}.host has an empty host in its list")));
    }
    let ports = match &d.port {
        Some(p) => p.0.clone(),
        None => vec![default.map(|h| h.1).unwrap_or(5432)],
    };
    let ports = match ports.len() {
        1 => vec![ports[0]; hosts.len()],
        n if n == hosts.len() => ports,
        n => return Err(bad(format!("databases.{name}: {n} ports for {} hosts (give one port, or one per host)", hosts.len()))),
    };
    let mut list = hosts.into_iter().zip(ports);
    let (host, port) = list.next().expect("at least one host");
    Ok((host, port, list.collect()))
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Settings};
    use crate::backend::hosts::TargetSessionAttrs;
    use std::time::Duration;

    fn build(file: &str) -> Result<Config, super::ConfigError> {
        let file: Settings = toml::from_str(file).map_err(|e| super::ConfigError(e.to_string()))?;
        Config::build(Settings { upstream: Some("postgres://app:pw@127.0.0.1:5433/app".into()), ..Default::default() }.layer(file))
    }

    #[test]
    fn a_database_lists_hosts_and_ports_as_libpq_does() {
        let c = build("target_session_attrs = \"primary\"\n[databases.two]\nhost = \"h1, h2\"\nport = \"5432,5433\"\ntarget_session_attrs = \"read-write\"\n[databases.one_port]\nhost = \"a,b\"\nport = 6000\n[databases.plain]\nhost = \"x\"").unwrap();
        let two = &c.databases["two"];
        assert_eq!((two.host.as_str(), two.port, two.more_hosts.clone()), ("h1", 5432, vec![("h2".to_string(), 5433)]));
        assert_eq!(two.target_session_attrs, TargetSessionAttrs::ReadWrite);
        let one = &c.databases["one_port"];
        assert_eq!((one.port, one.more_hosts.clone()), (6000, vec![("b".to_string(), 6000)]), "one port for every host");
        assert_eq!(one.target_session_attrs, TargetSessionAttrs::Primary, "the top-level key");
        assert_eq!(c.databases["app"].target_session_attrs, TargetSessionAttrs::Primary, "the upstream URL's too");
        assert!(c.databases["plain"].more_hosts.is_empty());
        for bad in [
            "[databases.x]\nhost = \"a,b,c\"\nport = \"1,2\"",
            "[databases.x]\nhost = \"a,,b\"",
            "[databases.x]\nhost = \"a\"\nport = \"x\"",
            "[databases.x]\ntarget_session_attrs = \"master\"",
            "target_session_attrs = \"anything\"",
        ] {
            assert!(build(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keepalive_keys_are_checked() {
        let c = build("").unwrap();
        assert!(c.server_tcp.keepalive);
        assert_eq!(
            (c.server_tcp.idle, c.server_tcp.count, c.server_tcp.user_timeout),
            (Duration::from_secs(30), 3, Duration::from_secs(60))
        );
        let c =
            build("server_tcp_keepalive = false\nserver_tcp_keepidle = \"5s\"\nserver_tcp_keepcnt = 9\ntcp_user_timeout = \"0\"").unwrap();
        assert_eq!((c.server_tcp.keepalive, c.server_tcp.idle, c.server_tcp.count), (false, Duration::from_secs(5), 9));
        assert!(c.server_tcp.user_timeout.is_zero());
        for bad in
            ["server_tcp_keepidle = \"500ms\"", "server_tcp_keepintvl = \"0\"", "server_tcp_keepcnt = 0", "tcp_user_timeout = \"2d\""]
        {
            let e = build(bad).unwrap_err().to_string();
            assert!(e.contains(bad.split(' ').next().unwrap()), "{bad}: {e}");
        }
    }
}
