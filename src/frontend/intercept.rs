//! The session's stops before the pool: the read cache answers a request it holds, fills it on a miss (the
//! replies are captured as they are forwarded), and every statement that writes voids what it touched.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::request::{self, Request};
use super::session::Session;
use crate::cache::{policy, Cache, Entry, FillGuard, Key, Lookup};
use crate::error::Result;
use crate::protocol::codes::TxStatus;
use crate::protocol::codes::*;
use crate::sql::StatementClass;

/// Settings that change what a SELECT returns (correctness.md): part of every cache key.
pub(crate) const OUTPUT_SETTINGS: &[&str] = &[
    "search_path",
    "timezone",
    "datestyle",
    "intervalstyle",
    "client_encoding",
    "extra_float_digits",
    "bytea_output",
    "standard_conforming_strings",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "role",
    "session_authorization",
    "row_security",
];

/// A cache fill in progress: the bytes the client receives for one request, until its ReadyForQuery.
pub struct Capture {
    cache: Arc<Cache>,
    fill: FillGuard,
    tables: Vec<(Arc<str>, u64)>,
    epoch: u64,
    started: Instant,
    ttl: std::time::Duration,
    buf: BytesMut,
    ok: bool,
}

impl Drop for Capture {
    fn drop(&mut self) {
        // However the request ends (stored, failed, client gone), identical requests waiting on it move on.
        self.cache.finish(&self.fill);
    }
}

impl Capture {
    /// Adds one frame the client received; returns true when the request is complete.
    pub fn frame(&mut self, frame: &[u8]) -> bool {
        match frame[0] {
            // Errors and warnings are never cached.
            ERROR_RESPONSE | NOTICE_RESPONSE | NOTIFICATION | PARAMETER_STATUS | COPY_IN_RESPONSE | COPY_OUT_RESPONSE => self.ok = false,
            _ => {}
        }
        if self.ok {
            if self.buf.len() + frame.len() > self.cache.config.max_entry_bytes {
                self.ok = false;
                self.cache.stats.too_big.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.buf = BytesMut::new();
            } else {
                self.buf.extend_from_slice(frame);
            }
        }
        frame[0] == READY_FOR_QUERY
    }

    /// Synthetic replies pgsurge wrote into this response.
    pub fn synthetic(&mut self, bytes: &[u8]) {
        if self.ok {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Stores what was captured, if it is whole and clean.
    pub fn finish(mut self) {
        if self.ok {
            let entry = Entry {
                bytes: std::mem::take(&mut self.buf).freeze(),
                tables: std::mem::take(&mut self.tables),
                epoch: self.epoch,
                filled_at: self.started,
                ttl: self.ttl,
                upstream_us: self.started.elapsed().as_micros() as u64,
            };
            self.cache.store(self.fill.key.clone(), entry);
        }
    }
}

pub enum Intercepted {
    /// The first `n` bytes of the buffer were answered here.
    Answered(usize),
    /// Forward as usual (possibly with a capture started).
    Pass,
}

impl Session {
    /// Requests that need no server, with nothing outstanding and no server held, answered here so they cost no
    /// checkout and no round trip: `[Close statement]... Sync` (CloseComplete for each, then ReadyForQuery), a
    /// lone Sync (ReadyForQuery), and Flushes (nothing is pending, so nothing to send: psycopg sends one after
    /// every pipeline, and forwarding it would hold a server connection through the client's think time).
    pub(crate) async fn try_local(&mut self, at: usize) -> Result<Intercepted> {
        let mut pos = 0;
        let mut names = vec![];
        let synced = loop {
            let Ok(Some(n)) = crate::protocol::frame::complete_len(&self.rbuf[pos..at], usize::MAX) else { break false };
            let (tag, body) = (self.rbuf[pos], &self.rbuf[pos + 5..pos + n]);
            match (tag, super::statements::target_view(body)) {
                (CLOSE, Some((b'S', name))) if self.stmts.contains_key(name) => names.push(Bytes::copy_from_slice(name)),
                (FLUSH, _) => {}
                (SYNC, _) => {
                    pos += n;
                    break true;
                }
                _ => break false,
            }
            pos += n;
        };
        if !synced {
            // Only Flushes before something that needs the server (or the end of what has arrived).
            return Ok(if names.is_empty() && pos > 0 { Intercepted::Answered(pos) } else { Intercepted::Pass });
        }
        let mut out = BytesMut::new();
        for name in names {
            self.stmts.remove(&name);
            out.extend_from_slice(&super::statements::empty_msg(CLOSE_COMPLETE));
        }
        crate::protocol::encode::put_ready_for_query(&mut out, TxStatus::Idle);
        self.client.write_all(&out).await?;
        Ok(Intercepted::Answered(pos))
    }

    /// Tries to answer the first request in `rbuf[..at]` from the cache; on a cacheable miss, starts a capture.
    pub(crate) async fn try_cache(&mut self, at: usize) -> Result<Intercepted> {
        let Some(cache) = self.app.cache.clone() else { return Ok(Intercepted::Pass) };
        let Some((req, len)) = request::first(&self.rbuf[..at]) else { return Ok(Intercepted::Pass) };
        let (sql, shape, parse) = match req {
            Request::Simple { sql } => (Bytes::copy_from_slice(sql), Bytes::new(), None),
            Request::Extended { parse, statement, bind_rest, describe } => {
                let sql = match parse {
                    Some(p) if p.name == statement => Bytes::copy_from_slice(p.query),
                    Some(_) => return Ok(Intercepted::Pass),
                    None if statement.is_empty() => return Ok(Intercepted::Pass), // an unnamed statement of an earlier request
                    None => match self.stmts.get(statement) {
                        Some(s) => s.query.clone(),
                        None => return Ok(Intercepted::Pass),
                    },
                };
                let types: &[u8] = match (parse, self.stmts.get(statement)) {
                    (Some(p), _) => p.param_types,
                    (None, Some(s)) => &s.parse[5 + s.server_name.len() + 1 + s.query.len() + 1..],
                    (None, None) => &[],
                };
                let mut shape = BytesMut::with_capacity(2 + types.len() + bind_rest.len());
                shape.put_u8(parse.is_some() as u8);
                shape.put_u8(describe as u8);
                shape.put_slice(types);
                shape.put_slice(bind_rest);
                (
                    sql,
                    shape.freeze(),
                    parse.map(|p| (Bytes::copy_from_slice(p.name), Bytes::copy_from_slice(p.query), Bytes::copy_from_slice(p.param_types))),
                )
            }
        };
        let analysis = cache.analyses.get(&sql);
        let Some(decision) = policy::decide(&cache.config, &String::from_utf8_lossy(&sql), &analysis) else {
            return Ok(Intercepted::Pass);
        };
        // Row-level security and temporary tables are looked up once in the catalog (then every 30 s).
        let flagged = match cache.flagged(&decision.tables) {
            Some(f) => f,
            None => {
                let mut co = self.pool.checkout(self.wait_timeout).await?;
                match co.conn().simple_rows(&crate::cache::flags_sql(&decision.tables)).await {
                    Ok(rows) => {
                        co.state = crate::backend::ReleaseState::Clean;
                        cache.record_flags(rows);
                    }
                    Err(e) => tracing::warn!(error = %e, "row-level security lookup failed; not caching"),
                }
                drop(co);
                cache.flagged(&decision.tables).unwrap_or(true)
            }
        };
        if flagged && !decision.opted_in {
            return Ok(Intercepted::Pass);
        }
        let settings: String = self
            .wanted
            .iter()
            .filter(|(k, _)| OUTPUT_SETTINGS.contains(&k.as_str()) || k.contains('.'))
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        let key = Arc::new(Key { database: self.pool.key.database.clone(), user: self.pool.key.user.clone(), settings, sql, shape });
        loop {
            match cache.lookup(&key, &self.writes.wrote) {
                Lookup::Hit(bytes) => {
                    if let Some((name, query, types)) = parse.as_ref().filter(|p| !p.0.is_empty()) {
                        let stmt = self.app.statements.intern(query, types);
                        self.stmts.insert(name.clone(), stmt);
                    }
                    self.client.write_all(&bytes).await?;
                    return Ok(Intercepted::Answered(len));
                }
                Lookup::Fill(fill) => {
                    let (tables, epoch) = cache.snapshot(&decision.tables);
                    self.capture = Some(Capture {
                        cache: cache.clone(),
                        fill,
                        tables,
                        epoch,
                        started: Instant::now(),
                        ttl: decision.ttl,
                        buf: BytesMut::new(),
                        ok: true,
                    });
                    return Ok(Intercepted::Pass);
                }
                Lookup::Wait(notify) => {
                    // Single flight: wait for the identical request in flight, then look again.
                    let woken = notify.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    if cache.filling(&key) && tokio::time::timeout(self.wait_timeout, woken).await.is_err() {
                        return Ok(Intercepted::Pass);
                    }
                }
            }
        }
    }
}

/// Writes seen on one session, for cache invalidation and read-your-writes.
#[derive(Default)]
pub struct Writes {
    /// Tables this session wrote, and when: it never reads a cache entry filled before its own write.
    pub wrote: std::collections::HashMap<String, Instant>,
    /// Tables written (or a flush owed) by the current transaction: bumped again when it ends.
    tx_tables: Vec<String>,
    tx_flush: bool,
}

impl Writes {
    /// Before a statement goes upstream: a write voids the cache entries of the tables it touches (now, and
    /// again when its transaction ends); DDL, privileges and anything opaque flush the cache.
    pub fn note(&mut self, cache: &Cache, sql: &Bytes) {
        let a = cache.analyses.get(sql);
        let classes = if a.class == StatementClass::Multiple { a.statements.clone() } else { vec![a.class] };
        let mut flush = false;
        let mut write = false;
        for c in classes {
            match c {
                StatementClass::Write => write = true,
                StatementClass::Ddl
                | StatementClass::Privilege
                | StatementClass::RoleChange
                | StatementClass::Other
                | StatementClass::ParseError => flush = true,
                _ => {}
            }
        }
        if write && !a.tables_written.is_empty() {
            cache.bump(&a.tables_written);
            let now = Instant::now();
            for t in &a.tables_written {
                self.wrote.insert(t.clone(), now);
            }
            self.tx_tables.extend(a.tables_written.iter().cloned());
        }
        if flush || (write && a.tables_written.is_empty()) {
            cache.flush();
            self.tx_flush = true;
        }
    }

    /// When a transaction (or an autocommit statement) ends: its writes are visible now; void again.
    pub fn visible(&mut self, cache: &Cache) {
        if !self.tx_tables.is_empty() {
            let tables = std::mem::take(&mut self.tx_tables);
            cache.bump(&tables);
            let now = Instant::now();
            for t in tables {
                self.wrote.insert(t, now);
            }
        }
        if std::mem::take(&mut self.tx_flush) {
            cache.flush();
        }
    }
}
