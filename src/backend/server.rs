//! One server connection: connect, log in (SCRAM, md5, cleartext or passthrough), and the raw stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth::md5;
use crate::auth::scram::{ClientCredential, ScramClient, MECHANISM};
use crate::cancel::CancelTarget;
use crate::error::{Error, Result};
use crate::net::Stream;
use crate::protocol::codes::*;
use crate::protocol::view::{self, ErrorView};
use crate::protocol::{encode, FrameSplitter};

/// How pgsurge proves itself to Postgres for one pool.
#[derive(Clone)]
pub enum UpstreamCredential {
    Password(String),
    /// An `md5…` hash: enough for md5 auth, not for SCRAM.
    Md5(String),
    /// SCRAM passthrough with keys learned from a client's login.
    Scram(ClientCredential),
    /// Nothing known yet (a SCRAM secret whose client key no client has proved).
    None,
}

/// Where and as whom a pool's server connections log in.
#[derive(Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub credential: UpstreamCredential,
    /// Named statements kept prepared per server connection.
    pub max_prepared: std::num::NonZeroUsize,
    pub tls: crate::tls::ServerTls,
}

impl ServerTarget {
    pub fn addr(&self) -> String {
        crate::net::display_addr(&self.host, self.port)
    }
}

/// A logged-in server connection, owned by the pool while idle and by one client session while checked out.
pub struct ServerConn {
    pub id: u64,
    pub stream: Stream,
    /// Bytes read from the server and not yet forwarded; survives `select!` cancellation.
    pub rbuf: BytesMut,
    /// The server's own BackendKeyData and address, for forwarding a client's cancel.
    pub cancel_target: Arc<CancelTarget>,
    /// ParameterStatus values the server reported at login.
    pub reported: Vec<(String, String)>,
    /// Session settings pgsurge applied on behalf of clients (name -> value); empty means server defaults.
    pub applied: Arc<crate::state::Settings>,
    /// Statements prepared here under pgsurge's names (registry id -> server name), least recently used first out.
    pub prepared: lru::LruCache<u64, String>,
    /// Statements pgsurge closed but the server did not (the Close was skipped after an error): still prepared
    /// there under these names, so they are closed before being prepared again.
    pub unclosed: Vec<String>,
    pub created: Instant,
    pub last_used: Instant,
}

/// Largest message accepted from a server: Postgres caps a row at 1 GiB.
pub const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1024;

impl ServerConn {
    /// Opens and logs in a server connection within `timeout`.
    pub async fn connect(id: u64, target: &ServerTarget, timeout: Duration) -> Result<ServerConn> {
        match tokio::time::timeout(timeout, Self::connect_inner(id, target)).await {
            Ok(r) => r,
            Err(_) => Err(Error::UpstreamConnect { addr: target.addr(), reason: format!("timed out after {}ms", timeout.as_millis()) }),
        }
    }

    async fn connect_inner(id: u64, target: &ServerTarget) -> Result<ServerConn> {
        let io_err = |e: std::io::Error| Error::UpstreamConnect { addr: target.addr(), reason: e.to_string() };
        let mut stream = match crate::net::dial(&target.host, target.port).await.map_err(io_err)? {
            Stream::Plain(tcp) => crate::tls::connect_upstream(tcp, &target.host, &target.tls).await.map_err(io_err)?,
            // A Unix-domain socket is local: no TLS over it, whatever server_tls_mode says (libpq's rule).
            local => local,
        };
        stream.write_all(&encode::startup(&[("user", &target.user), ("database", &target.dbname)])).await.map_err(io_err)?;
        let mut conn = ServerConn {
            id,
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            cancel_target: Arc::new(CancelTarget { host: target.host.clone(), port: target.port, pid: 0, secret: vec![] }),
            reported: vec![],
            applied: Default::default(),
            prepared: lru::LruCache::new(target.max_prepared),
            unclosed: vec![],
            created: Instant::now(),
            last_used: Instant::now(),
        };
        conn.login(target).await?;
        Ok(conn)
    }

    /// Reads one whole message during login or reset.
    pub async fn read_msg(&mut self) -> Result<(u8, BytesMut)> {
        let splitter = FrameSplitter::new(MAX_SERVER_MESSAGE);
        loop {
            match splitter.split(&mut self.rbuf) {
                Ok(Some(f)) => return Ok((f.tag, BytesMut::from(f.body()))),
                Ok(None) => {}
                Err(e) => return Err(Error::UpstreamLost(e.to_string())),
            }
            let n = self.stream.read_buf(&mut self.rbuf).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
            if n == 0 {
                return Err(Error::UpstreamLost("server closed the connection".into()));
            }
        }
    }

    pub async fn send(&mut self, b: &[u8]) -> Result<()> {
        self.stream.write_all(b).await.map_err(|e| Error::UpstreamLost(e.to_string()))
    }

    async fn login(&mut self, target: &ServerTarget) -> Result<()> {
        let mut scram: Option<ScramClient> = None;
        loop {
            let (tag, body) = self.read_msg().await?;
            match tag {
                AUTHENTICATION => {
                    let (code, data) = view::auth_request(&body).ok_or_else(|| Error::UpstreamLost("bad authentication message".into()))?;
                    match code {
                        AUTH_OK => {}
                        AUTH_CLEARTEXT => match &target.credential {
                            UpstreamCredential::Password(pw) => self.send(&encode::password(pw.as_bytes())).await?,
                            _ => return Err(no_credential(target, "a cleartext password")),
                        },
                        AUTH_MD5 => {
                            let salt: [u8; 4] =
                                data.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| Error::UpstreamLost("bad md5 salt".into()))?;
                            let stored = match &target.credential {
                                UpstreamCredential::Password(pw) => md5::stored(pw, &target.user),
                                UpstreamCredential::Md5(h) => h.clone(),
                                _ => return Err(no_credential(target, "md5")),
                            };
                            self.send(&encode::password(md5::response(&stored, salt).as_bytes())).await?;
                        }
                        AUTH_SASL => {
                            let offers_scram = data.split(|&b| b == 0).any(|m| m == MECHANISM.as_bytes());
                            if !offers_scram {
                                return Err(no_credential(target, "an unsupported SASL mechanism"));
                            }
                            let cred = match &target.credential {
                                UpstreamCredential::Password(pw) => ClientCredential::Password(pw.clone()),
                                UpstreamCredential::Scram(c) => c.clone(),
                                _ => return Err(no_credential(target, "SCRAM")),
                            };
                            let (client, first) = ScramClient::new(cred);
                            scram = Some(client);
                            self.send(&encode::sasl_initial_response(MECHANISM, first.as_bytes())).await?;
                        }
                        AUTH_SASL_CONTINUE => {
                            let client = scram.as_mut().ok_or_else(|| Error::UpstreamLost("SASL continue before start".into()))?;
                            let fin = client.server_first(data).map_err(|e| scram_err(target, e))?;
                            self.send(&encode::sasl_response(fin.as_bytes())).await?;
                        }
                        AUTH_SASL_FINAL => {
                            let client = scram.as_ref().ok_or_else(|| Error::UpstreamLost("SASL final before start".into()))?;
                            client.server_final(data).map_err(|e| scram_err(target, e))?;
                        }
                        other => return Err(no_credential(target, &format!("authentication method {other}"))),
                    }
                }
                ERROR_RESPONSE => {
                    let e = ErrorView::parse(&body).unwrap_or_default();
                    return Err(Error::Server(e));
                }
                PARAMETER_STATUS => {
                    if let Some(kv) = view::parameter_status(&body) {
                        self.reported.push(kv);
                    }
                }
                BACKEND_KEY_DATA if body.len() >= 8 => {
                    let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    self.cancel_target =
                        Arc::new(CancelTarget { host: target.host.clone(), port: target.port, pid, secret: body[4..].to_vec() });
                }
                READY_FOR_QUERY => return Ok(()),
                _ => {} // notices, NegotiateProtocolVersion
            }
        }
    }

    /// Runs pgsurge's own simple query (reset, parameter sync) and waits for ReadyForQuery; errors are returned.
    pub async fn run_own_query(&mut self, sql: &str) -> Result<TxStatus> {
        self.send(&encode::query(sql)).await?;
        let mut err = None;
        loop {
            let (tag, body) = self.read_msg().await?;
            match tag {
                ERROR_RESPONSE => err = Some(ErrorView::parse(&body).unwrap_or_default()),
                READY_FOR_QUERY => {
                    let st = body.first().copied().and_then(TxStatus::from_byte).unwrap_or(TxStatus::Failed);
                    return match err {
                        Some(e) => Err(Error::Server(e)),
                        None => Ok(st),
                    };
                }
                _ => {}
            }
        }
    }

    /// Runs pgsurge's own simple query and returns its rows as text (for catalog lookups); errors are returned.
    pub async fn simple_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.send(&encode::query(sql)).await?;
        let mut rows = vec![];
        let mut err = None;
        loop {
            let (tag, body) = self.read_msg().await?;
            match tag {
                DATA_ROW => rows.push(view::data_row_text(&body).ok_or_else(|| Error::UpstreamLost("malformed DataRow".into()))?),
                ERROR_RESPONSE => err = Some(ErrorView::parse(&body).unwrap_or_default()),
                READY_FOR_QUERY => {
                    return match err {
                        Some(e) => Err(Error::Server(e)),
                        None if body.first() == Some(&b'I') => Ok(rows),
                        None => Err(Error::UpstreamLost("not idle after pgsurge's own query".into())),
                    };
                }
                _ => {}
            }
        }
    }

    /// True if the idle connection looks alive: nothing to read and not closed. One non-blocking syscall.
    pub fn looks_alive(&mut self) -> bool {
        // Not alive on EOF, an error, or unexpected bytes (e.g. a FATAL after an admin shutdown).
        self.stream.looks_alive() && self.rbuf.is_empty()
    }
}

/// A login pgsurge cannot complete is a configuration problem, not a transient one: 28000 at once.
fn no_credential(target: &ServerTarget, what: &str) -> Error {
    upstream_auth(target, format!("upstream asks user \"{}\" for {what}, and pgsurge has no matching credential", target.user))
}

fn scram_err(target: &ServerTarget, e: crate::auth::scram::ScramError) -> Error {
    upstream_auth(target, format!("upstream login of user \"{}\": {e}", target.user))
}

fn upstream_auth(target: &ServerTarget, message: String) -> Error {
    Error::Server(ErrorView {
        severity: "FATAL".into(),
        code: "28000".into(),
        message: format!("{message} ({})", target.addr()),
        detail: None,
    })
}
