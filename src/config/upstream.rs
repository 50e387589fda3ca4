//! Parsing `postgres://USER:PASS@HOST:PORT/DB` upstream URLs; as in libpq, the authority may list several hosts
//! (`@h1:5432,h2:5433`), `?host=` and `?port=` (comma-separated lists too) override it, a host that is an absolute
//! path (`?host=/var/run/postgresql`, or `%2Fvar%2Frun%2Fpostgresql`) is the directory of Postgres' Unix-domain
//! socket, `?target_session_attrs=` says which host will do, and `?sslmode=` stands in for `server_tls_mode`.

use crate::backend::hosts::TargetSessionAttrs;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub user: String,
    pub password: String,
    /// The first host and its port.
    pub host: String,
    pub port: u16,
    /// The hosts after the first, in order.
    pub more_hosts: Vec<(String, u16)>,
    pub dbname: String,
    /// `?sslmode=`, if given (checked where server_tls_mode is).
    pub sslmode: Option<String>,
    /// `?target_session_attrs=`, if given.
    pub target_session_attrs: Option<TargetSessionAttrs>,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        // The url crate takes one host: a list, or none (libpq takes `postgres://u:p@/db?host=/dir`), is replaced
        // by a placeholder and read here.
        let (filled, listed) = fill_host(s)?;
        let u = url::Url::parse(&filled).map_err(|e| format!("upstream URL {s:?}: {e}"))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(format!("upstream URL must start with postgres://, not {}://", u.scheme()));
        }
        let dec = |x: &str| percent_decode(x);
        let user = dec(u.username());
        if user.is_empty() {
            return Err("upstream URL has no user (postgres://USER:PASS@HOST:PORT/DB)".into());
        }
        let (mut hosts, mut ports): (Vec<String>, Vec<Option<u16>>) = match listed {
            Listed::Many(list) => list.into_iter().unzip(),
            Listed::None => (vec![], vec![u.port()]),
            Listed::One => {
                (u.host_str().map(|h| dec(h.trim_start_matches('[').trim_end_matches(']'))).into_iter().collect(), vec![u.port()])
            }
        };
        let mut sslmode = None;
        let mut target_session_attrs = None;
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "host" => hosts = v.split(',').map(|h| h.trim().to_string()).collect(),
                "port" => ports = parse_ports(&v).map_err(|e| format!("upstream URL: {e}"))?.into_iter().map(Some).collect(),
                "sslmode" => sslmode = Some(v.into_owned()),
                "target_session_attrs" => {
                    target_session_attrs = Some(TargetSessionAttrs::parse(&v).ok_or_else(|| {
                        format!("upstream URL: target_session_attrs must be any, read-write, read-only, primary, standby or prefer-standby, not {v:?}")
                    })?)
                }
                _ => {
                    return Err(format!(
                        "upstream URL: unsupported parameter {k:?} (host, port, sslmode and target_session_attrs are)"
                    ))
                }
            }
        }
        if hosts.is_empty() || hosts.iter().any(|h| h.is_empty()) {
            return Err("upstream URL has no host (or an empty one in its list)".into());
        }
        let ports = match ports.len() {
            1 => vec![ports[0]; hosts.len()],
            n if n == hosts.len() => ports,
            n => return Err(format!("upstream URL: {n} ports for {} hosts (give one port, or one per host)", hosts.len())),
        };
        let mut list = hosts.drain(..).zip(ports.into_iter().map(|p| p.unwrap_or(5432)));
        let (host, port) = list.next().expect("at least one host");
        let dbname = dec(u.path().trim_start_matches('/'));
        Ok(UpstreamUrl {
            password: dec(u.password().unwrap_or("")),
            dbname: if dbname.is_empty() { user.clone() } else { dbname },
            user,
            host,
            port,
            more_hosts: list.collect(),
            sslmode,
            target_session_attrs,
        })
    }
}

/// Comma-separated port numbers (`5432` or `5432,5433`).
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',').map(|p| p.trim().parse::<u16>().map_err(|_| format!("port {p:?} is not a port number"))).collect()
}

const NO_HOST: &str = "no-host.invalid";

/// What the URL's authority names.
enum Listed {
    One,
    /// No host (`user@/db`, `user@:5433/db`): `?host=` must give one.
    None,
    /// Several, with their ports if written.
    Many(Vec<(String, Option<u16>)>),
}

/// `s` with a placeholder host where its authority has none or a list, and what the authority named.
fn fill_host(s: &str) -> Result<(std::borrow::Cow<'_, str>, Listed), String> {
    let Some(start) = s.find("://").map(|i| i + 3) else { return Ok((s.into(), Listed::One)) };
    let end = s[start..].find(['/', '?', '#']).map_or(s.len(), |i| start + i);
    let host_at = s[start..end].rfind('@').map_or(start, |i| start + i + 1);
    let section = &s[host_at..end];
    if section.contains(',') {
        let list = section.split(',').map(host_port).collect::<Result<Vec<_>, _>>()?;
        return Ok((format!("{}{NO_HOST}{}", &s[..host_at], &s[end..]).into(), Listed::Many(list)));
    }
    if section.is_empty() || section.starts_with(':') {
        return Ok((format!("{}{NO_HOST}{}", &s[..host_at], &s[host_at..]).into(), Listed::None));
    }
    Ok((s.into(), Listed::One))
}

/// One `host[:port]` of an authority's list (`[v6]:port` for IPv6).
fn host_port(item: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = match item.strip_prefix('[') {
        Some(rest) => {
            let (h, after) = rest.split_once(']').ok_or_else(|| format!("upstream URL: bad host {item:?}"))?;
            (h, after.strip_prefix(':'))
        }
        None => match item.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (item, None),
        },
    };
    let port = port.map(|p| p.parse::<u16>().map_err(|_| format!("upstream URL: port {p:?} is not a port number"))).transpose()?;
    Ok((percent_decode(host), port))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_part_and_decodes_escapes() {
        let u = UpstreamUrl::parse("postgres://app:p%40ss@db.local:5433/app%20db").unwrap();
        assert_eq!(
            u,
            UpstreamUrl {
                user: "app".into(),
                password: "p@ss".into(),
                host: "db.local".into(),
                port: 5433,
                more_hosts: vec![],
                dbname: "app db".into(),
                sslmode: None,
                target_session_attrs: None,
            }
        );
        assert_eq!(UpstreamUrl::parse("postgresql://u@h").unwrap().dbname, "u");
        assert!(UpstreamUrl::parse("mysql://u@h/d").is_err());
        assert!(UpstreamUrl::parse("postgres://h/d").is_err());
    }

    #[test]
    fn a_host_that_is_a_path_names_the_unix_socket_directory() {
        let u = UpstreamUrl::parse("postgres://app:pw@/app?host=/var/run/postgresql&port=5433").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.dbname.as_str()), ("/var/run/postgresql", 5433, "app"));
        let u = UpstreamUrl::parse("postgres://app:pw@%2Ftmp%2Fpg/app").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("/tmp/pg", 5432));
        assert!(UpstreamUrl::parse("postgres://app:pw@/app").is_err(), "no host at all");
        assert!(UpstreamUrl::parse("postgres://app:pw@h/app?connect_timeout=3").is_err(), "an ignored parameter is an error");
        assert_eq!(UpstreamUrl::parse("postgres://app:pw@h/app?sslmode=require").unwrap().sslmode.as_deref(), Some("require"));
        assert!(UpstreamUrl::parse("postgres://app:pw@h/app?port=x").is_err());
    }

    #[test]
    fn several_hosts_as_libpq_lists_them() {
        let u = UpstreamUrl::parse("postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("h1", 5432));
        assert_eq!(u.more_hosts, vec![("h2".to_string(), 5433)]);
        assert_eq!((u.dbname.as_str(), u.target_session_attrs), ("db", Some(TargetSessionAttrs::ReadWrite)));
        let u = UpstreamUrl::parse("postgres://u:p@h1,[::1]:6000,h3/db").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("h1", 5432), "a host without a port gets 5432");
        assert_eq!(u.more_hosts, vec![("::1".to_string(), 6000), ("h3".to_string(), 5432)]);
        let u = UpstreamUrl::parse("postgres://u:p@/db?host=a,b&port=7000,7001&target_session_attrs=prefer-standby").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.more_hosts.clone()), ("a", 7000, vec![("b".to_string(), 7001)]));
        let u = UpstreamUrl::parse("postgres://u:p@/db?host=a,b&port=7000").unwrap();
        assert_eq!(u.more_hosts, vec![("b".to_string(), 7000)], "one port serves every host");
        assert!(UpstreamUrl::parse("postgres://u:p@/db?host=a,b,c&port=1,2").is_err(), "ports must match the hosts");
        assert!(UpstreamUrl::parse("postgres://u:p@h1,,h2/db").is_err(), "an empty host");
        assert!(UpstreamUrl::parse("postgres://u:p@h1,h2/db?target_session_attrs=master").is_err());
        assert!(UpstreamUrl::parse("postgres://u:p@h1:x,h2/db").is_err());
        assert_eq!(parse_ports("5432, 5433").unwrap(), vec![5432, 5433]);
    }
}
