//! Postgres' md5 password scheme: md5(md5(password || user) || salt), hex, with an `md5` prefix.

use md5::{Digest, Md5};

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `md5` + hex(md5(password || user)): what Postgres stores.
pub fn stored(password: &str, user: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// What the client sends for a stored hash and the server's salt.
pub fn response(stored_hash: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&stored_hash.as_bytes()[3..]);
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_known_values() {
        // Postgres: SELECT 'md5' || md5('secret' || 'app')
        assert_eq!(stored("secret", "app"), "md56a422f785c9e20873908ce25d1736ae2");
        let s = stored("secret", "app");
        assert_ne!(response(&s, [1, 2, 3, 4]), response(&s, [1, 2, 3, 5]));
    }
}
