//! A cache fill in progress: the bytes the client receives for one request, copied as they are forwarded, until
//! its ReadyForQuery; stored only if nothing in them may not be cached.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;

use super::deps::Deps;
use super::shared::SharedFill;
use super::{Cache, Entry, FillGuard};
use crate::protocol::codes::*;

pub struct Capture {
    cache: Arc<Cache>,
    fill: FillGuard,
    deps: Option<Deps>,
    started: Instant,
    ttl: Duration,
    buf: BytesMut,
    ok: bool,
    /// Also written to the shared tier in Redis when complete.
    shared: Option<SharedFill>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        // However the request ends (stored, failed, client gone), identical requests waiting on it move on.
        self.cache.finish(&self.fill);
    }
}

impl Capture {
    /// Starts recording a fill of `fill`'s key that depends on `deps` and lives `ttl`.
    pub fn new(cache: Arc<Cache>, fill: FillGuard, deps: Deps, ttl: Duration) -> Capture {
        Capture { cache, fill, deps: Some(deps), started: Instant::now(), ttl, buf: BytesMut::new(), ok: true, shared: None }
    }

    /// The fill goes to the shared tier too.
    pub fn shared(mut self, fill: Option<SharedFill>) -> Capture {
        self.shared = fill;
        self
    }

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
                self.cache.stats.too_big.fetch_add(1, Ordering::Relaxed);
                self.buf = BytesMut::new();
            } else {
                self.buf.extend_from_slice(frame);
            }
        }
        frame[0] == READY_FOR_QUERY
    }

    /// Every frame of `reply` (a whole answer pgsurge built itself, e.g. a batch member's); stores it if complete.
    pub fn reply(mut self, reply: &[u8]) {
        let mut frames = crate::protocol::frame::Frames::server(reply, usize::MAX);
        for f in frames.by_ref() {
            let Ok(f) = f else { return };
            if self.frame(f.raw(reply)) {
                return self.finish();
            }
        }
    }

    /// Synthetic replies pgsurge wrote into this response.
    pub fn synthetic(&mut self, bytes: &[u8]) {
        if self.ok {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Stores what was captured, if it is whole and clean.
    pub fn finish(mut self) {
        if !self.ok {
            return;
        }
        let Some(deps) = self.deps.take() else { return };
        let now = Instant::now();
        let bytes = std::mem::take(&mut self.buf).freeze();
        if let Some(s) = self.shared.take() {
            s.store(bytes.clone(), self.ttl.saturating_sub(now.duration_since(self.started)));
        }
        let entry = Entry {
            bytes,
            deps,
            filled_at: self.started,
            // Counted from when the read began: an entry is never older than its TTL.
            expires: self.started + self.ttl,
            stats: self.fill.stats.clone(),
            upstream_us: now.duration_since(self.started).as_micros() as u64,
        };
        self.cache.store(self.fill.key.clone(), entry);
    }
}
