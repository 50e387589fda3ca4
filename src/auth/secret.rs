//! What pgsurge knows of a user's password: plaintext, an md5 hash or a SCRAM verifier.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::scram::ScramKeys;

#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// No password (trust only).
    None,
    Plain(String),
    /// `md5` + hex(md5(password || user)).
    Md5(String),
    /// A SCRAM-SHA-256 verifier as Postgres stores it.
    Scram(ScramSecret),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::None => "Secret::None",
            Secret::Plain(_) => "Secret::Plain(..)",
            Secret::Md5(_) => "Secret::Md5(..)",
            Secret::Scram(_) => "Secret::Scram(..)",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub keys: ScramKeys,
}

impl Secret {
    /// Reads a password field as PgBouncer does: `SCRAM-SHA-256$…` and `md5…` are secrets, anything else plain.
    pub fn from_config(s: &str) -> Secret {
        if let Some(sc) = ScramSecret::parse(s) {
            return Secret::Scram(sc);
        }
        if s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|c| c.is_ascii_hexdigit()) {
            return Secret::Md5(s.to_string());
        }
        if s.is_empty() {
            return Secret::None;
        }
        Secret::Plain(s.to_string())
    }
}

impl ScramSecret {
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<ScramSecret> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let stored: [u8; 32] = B64.decode(stored).ok()?.try_into().ok()?;
        let server: [u8; 32] = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramSecret {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            keys: ScramKeys { stored_key: stored, server_key: server, client_key: None },
        })
    }

    /// A fresh verifier for a plaintext password (random salt), as Postgres would store it.
    pub fn from_password(password: &str, iterations: u32) -> ScramSecret {
        let salt: [u8; 16] = rand::random();
        let keys = ScramKeys::from_password(password, &salt, iterations);
        ScramSecret { iterations, salt: salt.to_vec(), keys }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_each_kind_of_secret() {
        // The verifier Postgres 15 stored for password 'app' in one run.
        let v = "SCRAM-SHA-256$4096:FRWoUKYa0cdqv4SbBD+7Gw==$0Ml3M/sGm0Hm0G3SHRVZl3c27S9+GB6XNp0EUL4UF8o=:CdgW3kY+7X7o9Hq6Xb/0tNsIO7/Shr8Xv9l5EQ5Id5s=";
        assert!(matches!(Secret::from_config(v), Secret::Scram(s) if s.iterations == 4096));
        assert!(matches!(Secret::from_config("md5f8d5d17f0d8a3b7b7b2d1c6f5e4d3c2b"), Secret::Md5(_)));
        assert_eq!(Secret::from_config("hunter2"), Secret::Plain("hunter2".into()));
        assert_eq!(Secret::from_config(""), Secret::None);
    }
}
