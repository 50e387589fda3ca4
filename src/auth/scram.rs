//! SCRAM-SHA-256 (RFC 5802/7677) as Postgres speaks it: the server side that checks clients, and the client
//! side that logs in upstream with a password or, for passthrough, with the ClientKey a client just proved.
//!
//! Written here rather than taken from a crate: postgres-protocol only has the client side with a password, and
//! passthrough needs the keys themselves. Channel binding (-PLUS) is not offered.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::secret::ScramSecret;

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("SCRAM proof does not match")]
    Proof,
    #[error("upstream SCRAM server signature does not match")]
    ServerSignature,
    #[error("upstream asks for SCRAM with a salt or iteration count that differs from the stored secret")]
    PassthroughMismatch,
}

/// The keys derived from a password; `client_key` is only known from a password or a client's proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
    pub client_key: Option<[u8; 32]>,
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ScramKeys {
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramKeys { stored_key: Sha256::digest(client_key).into(), server_key: hmac(&salted, b"Server Key"), client_key: Some(client_key) }
    }
}

fn nonce() -> String {
    let raw: [u8; 18] = rand::random();
    B64.encode(raw)
}

fn attr(msg: &str, key: char) -> Option<&str> {
    msg.split(',').find_map(|p| p.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Checks one client against a stored verifier.
pub struct ScramServer {
    secret: ScramSecret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

impl ScramServer {
    /// Takes the client-first-message; returns the state and the server-first-message to send.
    pub fn start(secret: &ScramSecret, client_first: &[u8]) -> Result<(ScramServer, String), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (cb, rest) = msg.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        match cb {
            "n" | "y" => {}
            _ if cb.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let (_authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("no authzid field"))?;
        let client_nonce = attr(bare, 'r').ok_or(ScramError::Malformed("no client nonce"))?;
        if client_nonce.is_empty() || client_nonce.contains(|c: char| !c.is_ascii_graphic()) {
            return Err(ScramError::Malformed("bad client nonce"));
        }
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&secret.salt), secret.iterations);
        let gs2_header = format!("{cb},{}", &rest[..rest.len() - bare.len()]);
        Ok((
            ScramServer {
                secret: secret.clone(),
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
                gs2_header,
            },
            server_first,
        ))
    }

    /// Takes the client-final-message; on success returns the server-final-message and the client's ClientKey.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let cb = attr(without_proof, 'c').ok_or(ScramError::Malformed("no channel binding"))?;
        if B64.decode(cb).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
        }
        if attr(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64.decode(proof).ok().and_then(|p| p.try_into().ok()).ok_or(ScramError::Malformed("bad proof"))?;
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.secret.keys.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !ct_eq(&stored, &self.secret.keys.stored_key) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.secret.keys.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// What pgsurge logs in upstream with.
#[derive(Clone)]
pub enum ClientCredential {
    Password(String),
    /// Passthrough: the keys a client proved, valid for the verifier with this salt and iteration count.
    Keys {
        client_key: [u8; 32],
        server_key: [u8; 32],
        salt: Vec<u8>,
        iterations: u32,
    },
}

/// Logs in to an upstream server.
pub struct ScramClient {
    credential: ClientCredential,
    client_first_bare: String,
    nonce: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    /// Returns the state and the client-first-message.
    pub fn new(credential: ClientCredential) -> (ScramClient, String) {
        let nonce = nonce();
        let bare = format!("n=,r={nonce}");
        let first = format!("n,,{bare}");
        (ScramClient { credential, client_first_bare: bare, nonce, expected_server_signature: None }, first)
    }

    /// Takes the server-first-message; returns the client-final-message.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = attr(msg, 'r').ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = B64.decode(attr(msg, 's').ok_or(ScramError::Malformed("no salt"))?).map_err(|_| ScramError::Malformed("bad salt"))?;
        let iterations: u32 = attr(msg, 'i').and_then(|i| i.parse().ok()).ok_or(ScramError::Malformed("bad iteration count"))?;
        let (client_key, server_key) = match &self.credential {
            ClientCredential::Password(pw) => {
                let k = ScramKeys::from_password(pw, &salt, iterations);
                (k.client_key.expect("derived from a password"), k.server_key)
            }
            ClientCredential::Keys { client_key, server_key, salt: s, iterations: i } => {
                if *s != salt || *i != iterations {
                    return Err(ScramError::PassthroughMismatch);
                }
                (*client_key, *server_key)
            }
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{},{}", self.client_first_bare, msg, without_proof);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let proof = xor(&client_key, &hmac(&stored, auth_message.as_bytes()));
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let v = attr(msg, 'v').ok_or(ScramError::Malformed("no server signature"))?;
        let v = B64.decode(v).map_err(|_| ScramError::Malformed("bad server signature"))?;
        match &self.expected_server_signature {
            Some(e) if ct_eq(e, &v) => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(secret: &ScramSecret, cred: ClientCredential) -> Result<[u8; 32], ScramError> {
        let (mut client, first) = ScramClient::new(cred);
        let (server, server_first) = ScramServer::start(secret, first.as_bytes())?;
        let client_final = client.server_first(server_first.as_bytes())?;
        let (server_final, key) = server.finish(client_final.as_bytes())?;
        client.server_final(server_final.as_bytes())?;
        Ok(key)
    }

    #[test]
    fn a_client_with_the_password_gets_in_and_we_learn_its_key() {
        let secret = ScramSecret::from_password("pencil", 4096);
        let key = exchange(&secret, ClientCredential::Password("pencil".into())).unwrap();
        assert_eq!(<[u8; 32]>::from(Sha256::digest(key)), secret.keys.stored_key);
    }

    #[test]
    fn a_wrong_password_is_refused() {
        let secret = ScramSecret::from_password("pencil", 4096);
        assert_eq!(exchange(&secret, ClientCredential::Password("pen".into())), Err(ScramError::Proof));
    }

    #[test]
    fn passthrough_keys_log_in_without_the_password() {
        let secret = ScramSecret::from_password("pencil", 4096);
        let client_key = exchange(&secret, ClientCredential::Password("pencil".into())).unwrap();
        let cred = ClientCredential::Keys { client_key, server_key: secret.keys.server_key, salt: secret.salt.clone(), iterations: 4096 };
        assert!(exchange(&secret, cred).is_ok());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let secret = ScramSecret::from_password("x", 16);
        for junk in [&b""[..], b",", b"p=tls-server-end-point,,n=,r=x", b"n,,n=,r=", b"\xff\xfe"] {
            assert!(ScramServer::start(&secret, junk).is_err());
        }
        let (s, _) = ScramServer::start(&secret, b"n,,n=,r=abc").unwrap();
        assert!(s.finish(b"c=biws,r=abc,p=!!!").is_err());
    }
}
