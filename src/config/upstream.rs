//! Parsing `postgres://USER:PASS@HOST:PORT/DB` upstream URLs.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let u = url::Url::parse(s).map_err(|e| format!("upstream URL {s:?}: {e}"))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(format!("upstream URL must start with postgres://, not {}://", u.scheme()));
        }
        let dec = |x: &str| percent_decode(x);
        let user = dec(u.username());
        if user.is_empty() {
            return Err("upstream URL has no user (postgres://USER:PASS@HOST:PORT/DB)".into());
        }
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or("upstream URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let dbname = dec(u.path().trim_start_matches('/'));
        Ok(UpstreamUrl {
            password: dec(u.password().unwrap_or("")),
            dbname: if dbname.is_empty() { user.clone() } else { dbname },
            user,
            host,
            port: u.port().unwrap_or(5432),
        })
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
            UpstreamUrl { user: "app".into(), password: "p@ss".into(), host: "db.local".into(), port: 5433, dbname: "app db".into() }
        );
        assert_eq!(UpstreamUrl::parse("postgresql://u@h").unwrap().dbname, "u");
        assert!(UpstreamUrl::parse("mysql://u@h/d").is_err());
        assert!(UpstreamUrl::parse("postgres://h/d").is_err());
    }
}
