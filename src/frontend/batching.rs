//! The session's batch stop (after the cache, before the pool): a point lookup that would wait for a server
//! connection joins a pending batch (src/batch); the leader runs it, every member answers its own client.
//! Also feeds N+1 detection with every extended-protocol statement executed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::intercept::{Intercepted, OUTPUT_SETTINGS};
use super::request::{self, Request};
use super::session::{apply_setting, Session};
use crate::backend::ReleaseState;
use crate::batch::{self, run, wire, BatchKey, LeaderGuard, Learned, Outcome, Role, ShapeEntry};
use crate::config::PoolMode;
use crate::error::{Error, Result, Severity};
use crate::protocol::frame::complete_len;

/// Client encodings in which `\` or `"` bytes can occur inside a multibyte character: an array literal built
/// byte-wise would mean something else, so text-format keys in these are not merged.
const UNSAFE_ENCODINGS: &[&str] = &[
    "sjis",
    "shift_jis",
    "mskanji",
    "big5",
    "gbk",
    "uhc",
    "gb18030",
    "johab",
    "win932",
    "win936",
    "win949",
    "win950",
    "cp932",
    "cp936",
    "cp949",
    "cp950",
    "windows932",
    "windows936",
    "windows949",
    "windows950",
];

/// One lookup's request, owned (the client buffer may grow while it waits).
struct Lookup {
    len: usize,
    parse: Option<(Bytes, Bytes, Bytes)>,
    describe: bool,
}

impl Session {
    /// N+1 detection: notes the statement of the first request in `rbuf[..at]`.
    pub(crate) fn observe_lookup(&mut self, at: usize) {
        let Some((Request::Extended { parse, statement, .. }, _)) = request::first(&self.rbuf[..at]) else { return };
        let sql: &[u8] = match (parse, self.stmts.get(statement)) {
            (Some(p), _) => p.query,
            (None, Some(s)) => &s.query,
            (None, None) => return,
        };
        self.nplus.observe(&self.app.batch, sql, Instant::now());
    }

    /// Merges the first request in `rbuf[..at]` with concurrent lookups of the same shape, if it is one and
    /// it would otherwise wait for a server connection.
    pub(crate) async fn try_batch(&mut self, at: usize) -> Result<Intercepted> {
        let cfg = self.app.config.load().batch.clone();
        if !cfg.enabled || self.mode != PoolMode::Transaction {
            return Ok(Intercepted::Pass);
        }
        let batcher = self.app.batch.clone();
        let Some((Request::Extended { parse, statement, bind_rest, describe }, len)) = request::first(&self.rbuf[..at]) else {
            return Ok(Intercepted::Pass);
        };
        let (sql, types): (&[u8], &[u8]) = match (parse, self.stmts.get(statement)) {
            (Some(p), _) if p.name == statement => (p.query, p.param_types),
            (None, Some(s)) if !statement.is_empty() => (&s.query, &s.parse[5 + s.server_name.len() + 1 + s.query.len() + 1..]),
            _ => return Ok(Intercepted::Pass),
        };
        let Some(entry) = batcher.shape(sql) else { return Ok(Intercepted::Pass) };
        // The common uncontended case first: a free server and nothing to join means straight through.
        let must_wait = !cfg.max_wait.is_zero() || !self.pool.has_free_server();
        if !must_wait && !batcher.any_pending() {
            return Ok(Intercepted::Pass);
        }
        let Some(bind) = wire::lookup_bind(bind_rest) else { return Ok(Intercepted::Pass) };
        if matches!(entry.learned(types), Learned::Never) || (bind.param_format == 0 && !self.encoding_is_safe()) {
            return Ok(Intercepted::Pass);
        }
        let key = BatchKey {
            database: self.pool.key.database.clone(),
            user: self.pool.key.user.clone(),
            settings: self.output_settings(),
            sql: Bytes::copy_from_slice(sql),
            types: Bytes::copy_from_slice(types),
            param_format: bind.param_format,
            result_formats: Bytes::copy_from_slice(bind.result_formats),
            describe,
        };
        let lookup = Lookup {
            len,
            parse: parse
                .filter(|p| !p.name.is_empty())
                .map(|p| (Bytes::copy_from_slice(p.name), Bytes::copy_from_slice(p.query), Bytes::copy_from_slice(p.param_types))),
            describe,
        };
        let had_parse = parse.is_some();
        let param = bind.param.map(Bytes::copy_from_slice);
        match batcher.join(key, param, cfg.max_batch_size, must_wait) {
            Role::Pass => Ok(Intercepted::Pass),
            Role::Follower(rx) => self.follow(rx, at, lookup, had_parse).await,
            Role::Leader(guard, rx) => self.lead(guard, rx, entry, cfg.max_wait, at, lookup, had_parse).await,
        }
    }

    /// A member waits for its leader; a cancel or disconnect detaches only this member.
    async fn follow(&mut self, mut rx: oneshot::Receiver<Outcome>, at: usize, lookup: Lookup, had_parse: bool) -> Result<Intercepted> {
        let waiting = self.cancel.waiting(tokio::time::Instant::now());
        // One wait for the whole loop: a cancel that lands while the loop turns is not lost.
        let slot = self.cancel.clone();
        let mut cancelled = slot.wait_cancelled();
        let outcome = loop {
            tokio::select! {
                r = &mut rx => break r.unwrap_or(Outcome::Retry),
                _ = &mut cancelled => {
                    drop((rx, waiting));
                    self.fail_request(Error::Canceled("user request"), at).await?;
                    return Ok(Intercepted::Answered(0)); // fail_request consumed the request
                }
                r = self.client.read_buf(&mut self.rbuf) => match r {
                    Ok(0) => return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                },
            }
        };
        drop(waiting);
        match outcome {
            Outcome::Done(fetched, i) => self.deliver(fetched.reply(i, had_parse, lookup.describe), lookup).await,
            Outcome::Retry => Ok(Intercepted::Pass),
        }
    }

    /// The leader: checks out a server (with this client's settings), closes the batch and runs it. If the
    /// merged statement fails, every member runs alone (this one on the server it holds).
    #[allow(clippy::too_many_arguments)]
    async fn lead(
        &mut self,
        guard: LeaderGuard,
        rx: oneshot::Receiver<Outcome>,
        entry: Arc<ShapeEntry>,
        max_wait: std::time::Duration,
        at: usize,
        lookup: Lookup,
        had_parse: bool,
    ) -> Result<Intercepted> {
        if !max_wait.is_zero() {
            tokio::time::sleep(max_wait).await;
        }
        if let Err(e) = self.acquire().await {
            drop(guard);
            if e.severity() == Severity::Fatal {
                return Err(e);
            }
            self.fail_request(e, at).await?;
            return Ok(Intercepted::Answered(0));
        }
        match self.run_batch(&guard, rx, &entry).await {
            Ok(Some((fetched, i))) => {
                drop(guard);
                self.release(ReleaseState::Clean).await;
                self.deliver(fetched.reply(i, had_parse, lookup.describe), lookup).await
            }
            Ok(None) => Ok(Intercepted::Pass),
            Err(e) => {
                // The server connection failed under the batch: give it up; this lookup retries alone.
                tracing::warn!(error = %e, "batch failed on its server connection; lookups run alone");
                drop(guard);
                self.expect.clear();
                self.release(ReleaseState::Broken).await;
                self.pool.purge_dead_idle();
                Ok(Intercepted::Pass)
            }
        }
    }

    /// On the server this leader holds: finish applying settings, learn the shape if need be, run the merged
    /// statement and hand every member its share. `None`: run alone.
    async fn run_batch(
        &mut self,
        guard: &LeaderGuard,
        mut rx: oneshot::Receiver<Outcome>,
        entry: &ShapeEntry,
    ) -> Result<Option<(Arc<wire::Fetched>, usize)>> {
        let co = self.server.as_mut().expect("acquired");
        let conn = co.conn();
        let (mut unprepared, mut done) = (vec![], vec![]);
        while !self.expect.is_empty() {
            let f = run::frame(conn).await?;
            self.expect.on_server_frame(f[0], &mut unprepared, &mut done);
            for e in done.drain(..) {
                apply_setting(e, Arc::make_mut(&mut self.wanted), &self.startup, Arc::make_mut(&mut conn.applied));
            }
        }
        let key = &guard.key;
        let ready = match entry.learned(&key.types) {
            Learned::Ready(r) => r,
            Learned::Never => return Ok(None),
            Learned::Unknown => match run::learn(conn, &self.app.statements, &entry.shape, &key.sql, &key.types).await? {
                Learned::Ready(r) => {
                    entry.learn(&key.types, Learned::Ready(r.clone()));
                    r
                }
                Learned::Never => {
                    entry.learn(&key.types, Learned::Never);
                    return Ok(None);
                }
                Learned::Unknown => return Ok(None),
            },
        };
        let Some(formats) = wire::merged_result_formats(&key.result_formats, ready.ncols) else { return Ok(None) };
        let askers = guard.close();
        let (keys, at) = batch::distinct(&askers);
        let fetched = run::execute(conn, &ready, key.param_format, &keys, &formats).await?;
        let batcher = &self.app.batch;
        let Some(fetched) = fetched else {
            batcher.count(&key.sql, |s| s.fallbacks += 1);
            return Ok(None); // dropping the members' senders tells them to run alone
        };
        let rows: u64 = fetched.rows.iter().map(|r| r.1).sum();
        batcher.count(&key.sql, |s| {
            s.batches += 1;
            s.lookups += askers.len() as u64;
            s.distinct_keys += keys.len() as u64;
            s.rows += rows;
            s.largest = s.largest.max(askers.len() as u64);
        });
        self.pool.stats.queries.fetch_add(1, Ordering::Relaxed);
        let fetched = Arc::new(fetched);
        for (a, i) in askers.into_iter().zip(at) {
            let _ = a.tx.send(Outcome::Done(fetched.clone(), i));
        }
        match rx.try_recv() {
            Ok(Outcome::Done(f, i)) => Ok(Some((f, i))),
            _ => Ok(None),
        }
    }

    /// Answers this client with the reply built for it; a cache fill in progress takes it too.
    async fn deliver(&mut self, reply: BytesMut, lookup: Lookup) -> Result<Intercepted> {
        if let Some((name, query, types)) = lookup.parse {
            let stmt = self.app.statements.intern(&query, &types);
            self.stmts.insert(name, stmt);
        }
        if let Some(mut c) = self.capture.take() {
            let mut pos = 0;
            while let Ok(Some(n)) = complete_len(&reply[pos..], usize::MAX) {
                if c.frame(&reply[pos..pos + n]) {
                    c.finish();
                    break;
                }
                pos += n;
            }
        }
        self.client.write_all(&reply).await?;
        Ok(Intercepted::Answered(lookup.len))
    }

    fn output_settings(&self) -> String {
        self.wanted
            .iter()
            .filter(|(k, _)| OUTPUT_SETTINGS.contains(&k.as_str()) || k.contains('.'))
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    fn encoding_is_safe(&self) -> bool {
        match self.wanted.get("client_encoding") {
            None => true,
            Some(sql) => {
                let v = sql.to_ascii_lowercase().replace(['_', '-'], "");
                !UNSAFE_ENCODINGS.iter().any(|e| v.contains(&e.replace(['_', '-'], "")))
            }
        }
    }
}
