//! Accepting when file descriptors run short: clients past what the open-files limit leaves room for, and clients
//! waiting while `accept` fails with EMFILE/ENFILE, get FATAL 53300 at once instead of hanging; the failure is
//! logged once per interval, not on every retry.
//!
//! Why a spare descriptor: once the process is out of descriptors, `accept` cannot take a waiting connection off
//! the queue, so it can be neither served nor refused, and the listener stays readable (a busy loop). Closing the
//! spare frees exactly one descriptor: each waiting connection is accepted into it, answered and closed in turn,
//! then the spare is opened again (the technique of libev's and nginx's users, and of Go's `net/http` advice).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Error, Severity};

/// How long accepting pauses after a failure (the listener stays readable, so retrying at once would spin).
const BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line about failing accepts per this interval (with a count of what happened meanwhile).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Connections refused per failure, at most, before accepting pauses (bounds the time the loop keeps the thread).
const REFUSE_AT_ONCE: usize = 256;

struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// The accept loop's helper for running out of descriptors.
pub struct Acceptor {
    spare: Option<std::fs::File>,
    /// Clients the open-files limit leaves room for (after server connections and `OTHER_FDS`).
    fd_budget: usize,
    last_log: Option<Instant>,
    failures: u64,
    refused: u64,
}

impl Acceptor {
    pub fn new(app: &App) -> Acceptor {
        let servers = app.config.load().server_conn_estimate();
        let fd_budget = match crate::process::open_files_limit() {
            Some(limit) => (limit as usize).saturating_sub(servers + crate::process::OTHER_FDS),
            None => usize::MAX,
        };
        Acceptor { spare: open_spare(), fd_budget, last_log: None, failures: 0, refused: 0 }
    }

    /// Whether a new client would take a descriptor server connections need: then it is refused (53300).
    pub fn over_budget(&self, clients: usize) -> bool {
        clients >= self.fd_budget
    }

    /// Answers a connection FATAL 53300 and closes it, without waiting: the message fits an empty socket buffer.
    pub fn refuse(&mut self, stream: TcpStream, addr: SocketAddr, why: &str) {
        self.refused += 1;
        tracing::debug!(client = %addr, why, "connection refused");
        write_and_close(stream, why);
        self.maybe_log();
    }

    /// After `accept` failed: when out of descriptors, refuses the connections waiting (through the spare); then
    /// pauses for `BACKOFF`.
    pub async fn failed(&mut self, listener: &TcpListener, e: std::io::Error) {
        self.failures += 1;
        let exhausted = matches!(rustix::io::Errno::from_io_error(&e), Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE));
        if exhausted {
            self.refuse_waiting(listener);
        }
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                error = %e,
                failures = self.failures,
                refused = self.refused,
                "accept failed; waiting connections are refused with 53300 until descriptors free up (logged at most every 10 s)"
            );
            self.mark_logged();
        }
        tokio::time::sleep(BACKOFF).await;
    }

    fn refuse_waiting(&mut self, listener: &TcpListener) {
        drop(self.spare.take());
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        for _ in 0..REFUSE_AT_ONCE {
            match listener.poll_accept(&mut cx) {
                Poll::Ready(Ok((stream, _))) => {
                    self.refused += 1;
                    write_and_close(stream, "no more connections allowed: pgsurge is out of file descriptors");
                }
                Poll::Ready(Err(_)) | Poll::Pending => break,
            }
        }
        self.spare = open_spare();
    }

    fn maybe_log(&mut self) {
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                refused = self.refused,
                budget = self.fd_budget,
                "clients refused with 53300: the open-files limit leaves no room for more (logged at most every 10 s)"
            );
            self.mark_logged();
        }
    }

    fn mark_logged(&mut self) {
        self.last_log = Some(Instant::now());
        self.failures = 0;
        self.refused = 0;
    }
}

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

fn write_and_close(stream: TcpStream, why: &str) {
    let mut out = BytesMut::new();
    Error::TooManyConnections(why.to_string()).write_with(&mut out, Severity::Fatal);
    if let Ok(mut s) = stream.into_std() {
        // Non-blocking: a new connection's send buffer is empty, so ~100 bytes go in one call or not at all.
        let _ = s.write(&out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// What happens on EMFILE, minus running out: the spare is closed, every waiting connection is accepted,
    /// answered FATAL 53300 and closed, and the spare is opened again.
    #[tokio::test]
    async fn waiting_connections_are_answered_53300_and_the_spare_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = vec![];
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut acceptor = Acceptor { spare: open_spare(), fd_budget: usize::MAX, last_log: None, failures: 0, refused: 0 };
        // The connections are queued by the kernel; the loop retries until the listener has seen them all.
        let mut waited = 0;
        while acceptor.refused < 3 && waited < 100 {
            acceptor.refuse_waiting(&listener);
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        assert_eq!(acceptor.refused, 3);
        assert!(acceptor.spare.is_some(), "the spare descriptor is open again");
        for mut c in clients {
            let mut got = vec![];
            c.read_to_end(&mut got).await.unwrap();
            assert_eq!(got[0], b'E');
            let e = crate::protocol::view::ErrorView::parse(&got[5..]).unwrap();
            assert_eq!(e.code, "53300");
        }
    }
}
