//! Invalidations shared through Postgres (`[cache] notify`): every instance keeps one connection per upstream
//! database that LISTENs on `notify_channel`; a write pgsurge forwards is followed, on the same server connection,
//! by a NOTIFY naming what it voided (delivered when its transaction commits, dropped if it rolls back), and the
//! triggers of `pgsurge install-triggers` do the same for writes that bypass pgsurge. On receipt every instance
//! voids what the payload names. While a listener is down the cache answers nothing (it could not know what it
//! missed); once it listens again everything is voided and answering resumes.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

use super::invalidation::{decode, encode, Invalidation};
use super::Cache;
use crate::backend::{Pool, ServerConn};
use crate::error::Error;
use crate::protocol::codes::*;
use crate::protocol::frame::get_cstr;

/// Retry delays of a listener that lost its connection.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

pub struct Notifier {
    pub channel: String,
    /// This process, in every payload it sends, so it can skip its own (it voided those already).
    pub instance: String,
    /// How its own payloads begin: recognised without parsing them.
    own: String,
    /// Listeners registered and not listening now: while above 0 the cache is bypassed.
    down: AtomicI64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Notifier {
    pub fn new(channel: String) -> Notifier {
        let instance = format!("{:016x}", rand::random::<u64>());
        Notifier {
            channel,
            own: format!(r#"{{"from":"{instance}""#),
            instance,
            down: AtomicI64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Whether a listener is down (or not up yet): nothing may be answered from the cache.
    pub fn blind(&self) -> bool {
        self.down.load(Ordering::Acquire) > 0
    }

    /// `listening`, `down` (with the last error) or `starting`, for SHOW CACHE and /metrics.
    pub fn state(&self) -> String {
        if !self.blind() {
            return "listening".into();
        }
        match self.last_error.lock().as_ref() {
            Some(e) => format!("down: {e}"),
            None => "starting".into(),
        }
    }

    /// The simple Query announcing `items` (its reply is swallowed). Dollar-quoted, so no setting of the session
    /// changes how it reads; a payload that could close the quote says "everything" instead.
    pub fn statement(&self, items: &[Invalidation]) -> Bytes {
        const QUOTE: &str = "$pgsurge_notify$";
        let mut payload = encode(&self.instance, items);
        if payload.contains(QUOTE) {
            payload = encode(&self.instance, &[Invalidation::Flush]);
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        let len = 4 + "NOTIFY ".len() + self.channel.len() + 2 + 2 * QUOTE.len() + payload.len() + 1;
        let mut b = BytesMut::with_capacity(1 + len);
        b.put_u8(QUERY);
        b.put_u32(len as u32);
        for part in ["NOTIFY ", &self.channel, ", ", QUOTE, &payload, QUOTE, "\0"] {
            b.put_slice(part.as_bytes());
        }
        b.freeze()
    }

    /// A listener is about to start: the cache is blind until it listens.
    pub fn register(&self) {
        self.down.fetch_add(1, Ordering::AcqRel);
    }

    fn up(&self) {
        *self.last_error.lock() = None;
        self.down.fetch_sub(1, Ordering::AcqRel);
    }

    fn lost(&self) {
        self.down.fetch_add(1, Ordering::AcqRel);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs one listener for the database of `pool` (its upstream and credentials) for as long as the process.
/// `Notifier::register` must have counted it.
pub async fn listen(cache: Arc<Cache>, pool: Arc<Pool>) {
    let Some(n) = cache.notifier.as_ref() else { return };
    let mut delay = BACKOFF_START;
    loop {
        let (was_up, e) = serve(&cache, n, &pool).await;
        if was_up {
            delay = BACKOFF_START;
        }
        *n.last_error.lock() = Some(e.to_string());
        tracing::warn!(database = %pool.key.database, error = %e, "cache invalidation listener down; the cache answers nothing until it is back");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_CAP);
    }
}

/// One listening connection: LISTEN, void everything (what was missed), then apply what arrives until it fails.
/// Says whether it got as far as listening, and why it ended.
async fn serve(cache: &Cache, n: &Notifier, pool: &Pool) -> (bool, Error) {
    let target = pool.target();
    let mut conn = match ServerConn::connect(0, &target, pool.settings().connect_timeout).await {
        Ok(c) => c,
        Err(e) => return (false, e),
    };
    if let Err(e) = conn.run_own_query(&format!("LISTEN {}", n.channel)).await {
        return (false, e);
    }
    cache.flush();
    n.up();
    tracing::info!(database = %pool.key.database, channel = %n.channel, "cache invalidation listener up");
    let e = receive(cache, n, &mut conn).await;
    n.lost();
    (true, e)
}

async fn receive(cache: &Cache, n: &Notifier, conn: &mut ServerConn) -> Error {
    loop {
        let (tag, body) = match conn.read_msg().await {
            Ok(m) => m,
            Err(e) => return e,
        };
        match tag {
            NOTIFICATION => {
                if let Some(payload) = notification_payload(&body) {
                    n.received.fetch_add(1, Ordering::Relaxed);
                    if payload.starts_with(n.own.as_bytes()) {
                        continue;
                    }
                    let (from, items) = decode(&String::from_utf8_lossy(payload));
                    if from.as_deref() != Some(n.instance.as_str()) {
                        for i in &items {
                            cache.apply(i);
                        }
                    }
                }
            }
            ERROR_RESPONSE => return Error::Server(crate::protocol::view::ErrorView::parse(&body).unwrap_or_default()),
            _ => {} // ParameterStatus, notices
        }
    }
}

/// The payload of a NotificationResponse body (sender pid, channel, payload).
fn notification_payload(body: &[u8]) -> Option<&[u8]> {
    let mut b = body.get(4..)?;
    get_cstr(&mut b)?;
    get_cstr(&mut b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notify_statement_quotes_its_payload_whatever_it_holds() {
        let n = Notifier::new("pgsurge_invalidate".into());
        let q = n.statement(&[Invalidation::Tables(vec!["odd$pgsurge_notify$name".into()])]);
        assert_eq!(u32::from_be_bytes([q[1], q[2], q[3], q[4]]) as usize, q.len() - 1, "its length");
        let text = String::from_utf8_lossy(&q[5..q.len() - 1]).into_owned();
        assert!(text.starts_with("NOTIFY pgsurge_invalidate, $pgsurge_notify${"), "{text}");
        assert_eq!(text.matches("$pgsurge_notify$").count(), 2, "{text}");
        assert!(text.contains(r#""void":["*"]"#), "a payload that could close the quote voids everything: {text}");
    }

    #[test]
    fn its_own_payloads_are_recognised_by_their_start() {
        let n = Notifier::new("c".into());
        assert!(encode(&n.instance, &[Invalidation::Flush]).starts_with(&n.own));
        assert!(!encode("another", &[Invalidation::Flush]).starts_with(&n.own));
    }

    #[test]
    fn a_notification_body_gives_its_payload() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 42][..]);
        b.extend_from_slice(b"pgsurge_invalidate\0{\"void\":[\"*\"]}\0");
        assert_eq!(notification_payload(&b), Some(&br#"{"void":["*"]}"#[..]));
        assert_eq!(notification_payload(&BytesMut::from(&b"\0\0"[..])), None);
    }
}
