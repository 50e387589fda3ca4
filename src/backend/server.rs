//! One server connection: connect (to the first listed host that will do), log in (SCRAM, md5, cleartext or
//! passthrough), and the raw stream.

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

use super::hosts::TargetSessionAttrs;
use super::socket::TcpOpts;

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
    /// The hosts after `host:port`, tried in order when it fails or is not what `attrs` asks for (libpq's list).
    pub more_hosts: Arc<[(String, u16)]>,
    pub attrs: TargetSessionAttrs,
    /// Keepalive and TCP_USER_TIMEOUT of the TCP connections (backend/socket.rs).
    pub tcp: TcpOpts,
}

impl ServerTarget {
    /// Every host, `h1:5432,h2:5433`.
    pub fn addr(&self) -> String {
        super::hosts::list_addr(self.hosts())
    }

    /// The hosts in libpq's order: `host:port`, then `more_hosts`.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, u16)> {
        std::iter::once((self.host.as_str(), self.port)).chain(self.more_hosts.iter().map(|(h, p)| (h.as_str(), *p)))
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
    /// Opens and logs in a server connection: to the first host, in the listed order, that accepts the login and
    /// is what `target_session_attrs` asks for. Each host gets `timeout` (login and check included); a refused
    /// connect moves on at once. As in libpq, a failed authentication ends the search.
    pub async fn connect(id: u64, target: &ServerTarget, timeout: Duration) -> Result<ServerConn> {
        if target.more_hosts.is_empty() && target.attrs == TargetSessionAttrs::Any {
            return Self::connect_host(id, target, &target.host, target.port, timeout).await;
        }
        let mut tried = vec![];
        // prefer-standby: the first server that logged in but is no standby, used if no host is one.
        let mut fallback: Option<ServerConn> = None;
        for (host, port) in target.hosts() {
            let addr = crate::net::display_addr(host, port);
            let checked = tokio::time::timeout(timeout, async {
                let mut c = Self::connect_inner(id, target, host, port).await?;
                let fact = match target.attrs.needs() {
                    Some(f) => Some((f, c.fact(f).await?)),
                    None => None,
                };
                Ok::<_, Error>((c, fact))
            });
            match checked.await {
                Ok(Ok((c, None))) => return Ok(c),
                Ok(Ok((c, Some((_, v))))) if target.attrs.accepts(v) => return Ok(c),
                Ok(Ok((mut c, Some((fact, v))))) => {
                    tried.push(format!("{addr} {} (target_session_attrs={})", fact.describe(v), target.attrs));
                    if target.attrs == TargetSessionAttrs::PreferStandby && fallback.is_none() {
                        fallback = Some(c);
                    } else {
                        let _ = c.send(&encode::terminate()).await;
                    }
                }
                Ok(Err(e)) if is_auth_failure(&e) => return Err(e),
                Ok(Err(Error::UpstreamConnect { reason, .. })) => tried.push(format!("{addr}: {reason}")),
                Ok(Err(e)) => tried.push(format!("{addr}: {e}")),
                Err(_) => tried.push(format!("{addr}: timed out after {}ms", timeout.as_millis())),
            }
        }
        if let Some(c) = fallback {
            return Ok(c);
        }
        Err(Error::UpstreamConnect { addr: target.addr(), reason: tried.join("; ") })
    }

    /// Opens and logs in a server connection to one host within `timeout`.
    async fn connect_host(id: u64, target: &ServerTarget, host: &str, port: u16, timeout: Duration) -> Result<ServerConn> {
        match tokio::time::timeout(timeout, Self::connect_inner(id, target, host, port)).await {
            Ok(r) => r,
            Err(_) => Err(Error::UpstreamConnect {
                addr: crate::net::display_addr(host, port),
                reason: format!("timed out after {}ms", timeout.as_millis()),
            }),
        }
    }

    async fn connect_inner(id: u64, target: &ServerTarget, host: &str, port: u16) -> Result<ServerConn> {
        let io_err = |e: std::io::Error| Error::UpstreamConnect { addr: crate::net::display_addr(host, port), reason: e.to_string() };
        let stream = crate::net::dial(host, port).await.map_err(io_err)?;
        if let Stream::Plain(tcp) = &stream {
            target.tcp.apply(tcp).map_err(io_err)?;
        }
        let mut stream = match stream {
            Stream::Plain(tcp) => crate::tls::connect_upstream(tcp, host, &target.tls).await.map_err(io_err)?,
            // A Unix-domain socket is local: no TLS over it, whatever server_tls_mode says (libpq's rule).
            local => local,
        };
        stream.write_all(&encode::startup(&[("user", &target.user), ("database", &target.dbname)])).await.map_err(io_err)?;
        let mut conn = ServerConn {
            id,
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            cancel_target: Arc::new(CancelTarget { host: host.to_string(), port, pid: 0, secret: vec![] }),
            reported: vec![],
            applied: Default::default(),
            prepared: lru::LruCache::new(target.max_prepared),
            unclosed: vec![],
            created: Instant::now(),
            last_used: Instant::now(),
        };
        conn.login(target, host, port).await?;
        Ok(conn)
    }

    /// What `target_session_attrs` needs to know of this server: from the login's ParameterStatus (Postgres 14
    /// and later), else asked. Asked of each new connection, so a standby promoted since is seen as a primary.
    async fn fact(&mut self, fact: super::hosts::Fact) -> Result<bool> {
        if let Some(v) = fact.from_params(&self.reported) {
            return Ok(v);
        }
        let rows = self.simple_rows(fact.query()).await?;
        let v = rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref()).and_then(super::hosts::Fact::parse_answer);
        v.ok_or_else(|| Error::UpstreamLost(format!("unexpected answer to {}", fact.query())))
    }

    /// The host and port this connection is to (one of the target's hosts).
    pub fn addr(&self) -> String {
        crate::net::display_addr(&self.cancel_target.host, self.cancel_target.port)
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

    async fn login(&mut self, target: &ServerTarget, host: &str, port: u16) -> Result<()> {
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
                    self.cancel_target = Arc::new(CancelTarget { host: host.to_string(), port, pid, secret: body[4..].to_vec() });
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

/// Authentication refused (28xxx): libpq tries no further host.
fn is_auth_failure(e: &Error) -> bool {
    matches!(e, Error::Server(v) if v.code.starts_with("28"))
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
