//! A new client connection up to ReadyForQuery: SSL/GSS refusal, cancel requests, protocol negotiation,
//! authentication, and the ParameterStatus/BackendKeyData a driver expects.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::net::Stream;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::App;
use crate::auth::md5;
use crate::auth::scram::{ClientCredential, ScramServer, MECHANISM};
use crate::auth::secret::{ScramSecret, Secret};
use crate::backend::{Pool, UpstreamCredential};
use crate::config::{AuthMethod, Database, User};
use crate::error::{Error, Result};
use crate::protocol::codes::*;
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{encode, view, FrameSplitter};

/// A client that has logged in: what the session loop needs.
pub struct LoggedIn {
    pub user: String,
    pub database: String,
    pub params: BTreeMap<String, String>,
    pub target: Target,
    /// The client's place in the connection caps (released on drop) and its query/transaction rates.
    pub admission: Option<crate::limit::Admission>,
    /// AuthenticationOk and ParameterStatus, not yet written: the session appends BackendKeyData and
    /// ReadyForQuery and sends all in one write.
    pub greeting: BytesMut,
    /// Let into the console by its Unix-socket credentials (PgBouncer's rule for the user `pgbouncer`).
    pub peer_admin: bool,
}

pub enum Target {
    /// Boxed: a client's task holds it for its whole life (see listener.rs's task-size test).
    Pool(Arc<Pool>, Box<Database>),
    Admin,
}

/// Names of the admin console's virtual database.
pub const ADMIN_DATABASES: &[&str] = &["pgsurge", "pgbouncer"];

pub struct Handshake<'a> {
    pub app: &'a Arc<App>,
    pub stream: &'a mut Stream,
    pub rbuf: &'a mut BytesMut,
    pub addr: SocketAddr,
    /// Keys a client proved against a stored SCRAM secret, for logging in upstream as it.
    pub passthrough: Option<ClientCredential>,
    /// (user, database) once the startup packet named them, for the log line of a refused connection.
    pub who: &'a mut Option<(String, String)>,
    /// A Unix-socket peer running as pgsurge's own OS user: as `pgbouncer` it gets the console without a password.
    pub peer_admin: bool,
}

impl Handshake<'_> {
    async fn read_more(&mut self) -> Result<()> {
        if self.stream.read_buf(self.rbuf).await? == 0 {
            return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    async fn read_startup(&mut self) -> Result<StartupPacket> {
        loop {
            match startup::complete_len(self.rbuf) {
                Ok(Some(n)) => {
                    let pkt = self.rbuf.split_to(n);
                    return startup::parse(&pkt).map_err(|e| Error::Protocol(e.to_string()));
                }
                Ok(None) => self.read_more().await?,
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
        }
    }

    /// Reads one message of an expected type during authentication.
    async fn read_msg(&mut self, want: u8) -> Result<BytesMut> {
        let splitter = FrameSplitter::new(MAX_STARTUP_LEN);
        loop {
            match splitter.split(self.rbuf) {
                Ok(Some(f)) if f.tag == want => return Ok(BytesMut::from(f.body())),
                Ok(Some(f)) => return Err(Error::Protocol(format!("expected message type {:?}, got {:?}", want as char, f.tag as char))),
                Ok(None) => self.read_more().await?,
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
        }
    }

    /// Runs the handshake. `Ok(None)` means the connection was a cancel request and is done.
    pub async fn run(mut self) -> Result<Option<LoggedIn>> {
        let (version, params) = loop {
            match self.read_startup().await? {
                StartupPacket::SslRequest => self.ssl_request().await?,
                StartupPacket::GssEncRequest => self.stream.write_all(b"N").await?,
                StartupPacket::Cancel { pid, secret } => {
                    self.app.cancels.cancel(pid, &secret).await;
                    return Ok(None);
                }
                StartupPacket::Startup { version, params } => break (version, params),
            }
        };
        if self.app.config.load().client_tls_mode == crate::tls::ClientTlsMode::Require && !self.stream.is_tls() {
            return Err(Error::AuthRejected("pgsurge requires TLS from clients (client_tls_mode = require)".into()));
        }
        let unrecognized: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with("_pq_.")).collect();
        if version != PROTOCOL_3_0 || !unrecognized.is_empty() {
            self.stream.write_all(&encode::negotiate_protocol_version(0, &unrecognized)).await?;
        }
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let user = get("user")
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::AuthRejected("no PostgreSQL user name specified in startup packet".into()))?;
        let database = get("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
        *self.who = Some((user.clone(), database.clone()));
        if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
            return Err(Error::NotSupported("replication connections are not supported through pgsurge".into()));
        }
        let cfg = self.app.config.load_full();
        if self.app.client_count() > cfg.max_client_conn {
            return Err(Error::TooManyConnections(format!("no more connections allowed (max_client_conn = {})", cfg.max_client_conn)));
        }
        let is_admin_db = ADMIN_DATABASES.contains(&database.as_str());
        let db = if is_admin_db { None } else { Some(self.app.database(&database)?) };
        if self.app.ops.is_disabled(&database) {
            return Err(Error::DatabaseDisabled(database));
        }
        let peer_admin = self.peer_admin && is_admin_db && user == "pgbouncer";
        let mut known = cfg.users.get(&user).cloned();
        if let (None, Some(db)) = (&known, &db) {
            known = self.app.auth_query_user(db, &user).await?;
        }
        let user_cfg = if peer_admin {
            User { name: user.clone(), secret: Secret::None, auth: AuthMethod::Trust, pool_size: None }
        } else {
            self.authenticate(&user, known.as_ref()).await?;
            known.ok_or_else(|| Error::AuthFailed(user.clone()))?
        };
        let client_settings = crate::state::settings::from_startup(&params);
        // Connection caps and rates: refused here (FATAL 53300) before any server work for this client.
        // The console counts against client caps too, except for its admins (so they can always get in).
        let console_admin = peer_admin || cfg.admin_users.contains(&user);
        let admission = match &db {
            Some(d) => Some(self.app.limits.admit(&user, &d.name, self.addr.ip()).await?),
            None if !console_admin => Some(self.app.limits.admit(&user, &database, self.addr.ip()).await?),
            None => None,
        };

        let mut out = BytesMut::with_capacity(512);
        out.extend_from_slice(&encode::auth_ok());
        let target = match db {
            None => {
                for (k, v) in [
                    ("server_version", "15.0 (pgsurge)"),
                    ("server_encoding", "UTF8"),
                    ("client_encoding", "UTF8"),
                    ("DateStyle", "ISO, MDY"),
                    ("integer_datetimes", "on"),
                    ("standard_conforming_strings", "on"),
                ] {
                    encode::put_parameter_status(&mut out, k, v);
                }
                Target::Admin
            }
            Some(db) => {
                let pool = self.app.pool(&db, &user_cfg)?;
                if let Some(cred) = self.passthrough.take().filter(|_| db.user.is_none()) {
                    pool.set_credential(UpstreamCredential::Scram(cred));
                }
                let reported = match pool.login_params() {
                    Some(p) => p,
                    None => {
                        // First client of this pool: one server login tells us what to report.
                        let mut c = pool.checkout(cfg.query_wait_timeout).await?;
                        c.state = crate::backend::ReleaseState::Clean;
                        // A login probe, not a client's assignment (SHOW STATS counts those).
                        pool.stats.checkouts.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        c.conn_ref().reported.clone()
                    }
                };
                for (k, v) in &reported {
                    // What the client asked for at startup is what its session will have (re-applied on checkout).
                    let v = params.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v).unwrap_or(v);
                    encode::put_parameter_status(&mut out, k, v);
                }
                Target::Pool(pool, Box::new(db))
            }
        };
        Ok(Some(LoggedIn { user, database, params: client_settings, target, admission, greeting: out, peer_admin }))
    }
}

impl Handshake<'_> {
    /// SSLRequest: 'S' and the TLS handshake when client TLS is on, else 'N'.
    async fn ssl_request(&mut self) -> Result<()> {
        let cfg = self.app.config.load_full();
        let config = match (&cfg.client_tls, cfg.client_tls_mode) {
            (Some(c), crate::tls::ClientTlsMode::Allow | crate::tls::ClientTlsMode::Require) if !self.stream.is_tls() => c,
            _ => return Ok(self.stream.write_all(b"N").await?),
        };
        // Bytes sent after SSLRequest before the handshake would be read as if they came encrypted: refuse.
        if !self.rbuf.is_empty() {
            return Err(Error::Protocol("data received after SSLRequest before the TLS handshake".into()));
        }
        self.stream.write_all(b"S").await?;
        crate::tls::accept(self.stream, config).await?;
        Ok(())
    }

    /// Checks the client's password with the method configured for its user. Unknown users go through the
    /// same exchange against a throwaway verifier, so they cannot be told apart from a wrong password.
    async fn authenticate(&mut self, user: &str, known: Option<&User>) -> Result<()> {
        let method = known.map(|u| u.auth).unwrap_or(self.app.config.load().auth_type);
        let method = match (method, known.map(|u| &u.secret)) {
            (AuthMethod::ScramSha256, Some(Secret::Md5(_))) => AuthMethod::Md5,
            (AuthMethod::Md5, Some(Secret::Scram(_))) => AuthMethod::ScramSha256,
            (m, _) => m,
        };
        let ok = match method {
            AuthMethod::Trust => known.is_some(),
            AuthMethod::Md5 => self.md5(user, known).await?,
            AuthMethod::ScramSha256 => self.scram(known).await?,
        };
        if !ok {
            self.app.counters.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(client = %self.addr, user, "password authentication failed");
            return Err(Error::AuthFailed(user.to_string()));
        }
        Ok(())
    }

    async fn md5(&mut self, user: &str, known: Option<&User>) -> Result<bool> {
        let salt: [u8; 4] = rand::random();
        self.stream.write_all(&encode::auth_md5(salt)).await?;
        let body = self.read_msg(PASSWORD).await?;
        let got = view::password(&body).ok_or_else(|| Error::Protocol("malformed password message".into()))?;
        let stored = match known.map(|u| &u.secret) {
            Some(Secret::Plain(pw)) => md5::stored(pw, user),
            Some(Secret::Md5(h)) => h.clone(),
            _ => return Ok(false),
        };
        Ok(ct_eq(got, md5::response(&stored, salt).as_bytes()))
    }

    async fn scram(&mut self, known: Option<&User>) -> Result<bool> {
        let verifier = known.and_then(|u| self.app.scram_verifier(u));
        let mock = verifier.is_none();
        let verifier = verifier.unwrap_or_else(|| Arc::new(ScramSecret::from_password(&format!("{:x}", rand::random::<u128>()), 4096)));
        self.stream.write_all(&encode::auth_sasl(&[MECHANISM])).await?;
        let body = self.read_msg(PASSWORD).await?;
        let (mech, first) = view::sasl_initial(&body).ok_or_else(|| Error::Protocol("malformed SASLInitialResponse".into()))?;
        if mech != MECHANISM.as_bytes() {
            return Err(Error::AuthRejected("client selected an invalid SASL authentication mechanism".into()));
        }
        let (server, server_first) = ScramServer::start(&verifier, first).map_err(|e| Error::Protocol(e.to_string()))?;
        self.stream.write_all(&encode::auth_sasl_continue(server_first.as_bytes())).await?;
        let body = self.read_msg(PASSWORD).await?;
        let (server_final, client_key) = match server.finish(&body) {
            Ok(x) if !mock => x,
            _ => return Ok(false),
        };
        self.stream.write_all(&encode::auth_sasl_final(server_final.as_bytes())).await?;
        if let Some(Secret::Scram(s)) = known.map(|u| &u.secret) {
            self.passthrough =
                Some(ClientCredential::Keys { client_key, server_key: s.keys.server_key, salt: s.salt.clone(), iterations: s.iterations });
        }
        Ok(true)
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
