//! Parsing `postgres://USER:PASS@HOST:PORT/DB` upstream URLs; as in libpq, `?host=` and `?port=` override the
//! authority, and a host that is an absolute path (`?host=/var/run/postgresql`, or `%2Fvar%2Frun%2Fpostgresql`)
//! is the directory of Postgres' Unix-domain socket; `?sslmode=` stands in for `server_tls_mode`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    /// `?sslmode=`, if given (checked where server_tls_mode is).
    pub sslmode: Option<String>,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        // libpq takes `postgres://u:p@/db?host=/dir`; the url crate wants a host, so a placeholder stands in.
        let (filled, no_host) = fill_empty_host(s);
        let u = url::Url::parse(&filled).map_err(|e| format!("upstream URL {s:?}: {e}"))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(format!("upstream URL must start with postgres://, not {}://", u.scheme()));
        }
        let dec = |x: &str| percent_decode(x);
        let user = dec(u.username());
        if user.is_empty() {
            return Err("upstream URL has no user (postgres://USER:PASS@HOST:PORT/DB)".into());
        }
        let host = if no_host { None } else { u.host_str().map(|h| dec(h.trim_start_matches('[').trim_end_matches(']'))) };
        let (mut host, mut port) = (host, u.port());
        let mut sslmode = None;
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "host" => host = Some(v.into_owned()),
                "port" => port = Some(v.parse().map_err(|_| format!("upstream URL: port {v:?} is not a port number"))?),
                "sslmode" => sslmode = Some(v.into_owned()),
                _ => return Err(format!("upstream URL: unsupported parameter {k:?} (host, port and sslmode are)")),
            }
        }
        let host = host.filter(|h| !h.is_empty()).ok_or("upstream URL has no host")?;
        let dbname = dec(u.path().trim_start_matches('/'));
        Ok(UpstreamUrl {
            password: dec(u.password().unwrap_or("")),
            dbname: if dbname.is_empty() { user.clone() } else { dbname },
            user,
            host,
            port: port.unwrap_or(5432),
            sslmode,
        })
    }
}

const NO_HOST: &str = "no-host.invalid";

/// `s` with a placeholder host where its authority has none (`user@/db`, `user@:5433/db`), and whether it did.
fn fill_empty_host(s: &str) -> (std::borrow::Cow<'_, str>, bool) {
    let Some(start) = s.find("://").map(|i| i + 3) else { return (s.into(), false) };
    let end = s[start..].find(['/', '?', '#']).map_or(s.len(), |i| start + i);
    let host_at = s[start..end].rfind('@').map_or(start, |i| start + i + 1);
    if host_at == end || s[host_at..].starts_with(':') {
        (format!("{}{NO_HOST}{}", &s[..host_at], &s[host_at..]).into(), true)
    } else {
        (s.into(), false)
    }
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
                dbname: "app db".into(),
                sslmode: None
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
}
