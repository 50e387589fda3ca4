//! What standing in for PgBouncer needs around the process: the log written to `logfile` as well as stderr,
//! binding the listen port shareably, and online restart (`--reboot`): ask the running instance to drain and stop
//! through its console on the Unix socket, then take its place.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `tracing` writer: every formatted event to stderr and, when set, appended to the log file in one write.
#[derive(Clone)]
pub struct LogWriter(Option<Arc<std::fs::File>>);

impl LogWriter {
    pub fn new(file: Option<Arc<std::fs::File>>) -> LogWriter {
        LogWriter(file)
    }
}

pub struct Tee(Option<Arc<std::fs::File>>);

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        if let Some(f) = &self.0 {
            // O_APPEND and one write per event: lines of concurrent events do not interleave.
            let _ = (&**f).write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Tee;
    fn make_writer(&'a self) -> Tee {
        Tee(self.0.clone())
    }
}

/// Binds the client port. With `shared` (a Unix socket is configured, so `--reboot` can reach a running instance),
/// SO_REUSEPORT lets the instance that takes over bind while the old one still drains.
pub async fn bind_tcp(addr: &str, shared: bool) -> std::io::Result<tokio::net::TcpListener> {
    if !shared {
        return tokio::net::TcpListener::bind(addr).await;
    }
    let a: std::net::SocketAddr =
        addr.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let s = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(a)?;
    s.listen(1024)
}

/// `--reboot`: logs in to the console of the instance on `socket` (as `pgbouncer`, let in by its OS user) and
/// sends SHUTDOWN, so it stops accepting and lets in-flight transactions finish. Nothing running there is fine.
pub async fn take_over(socket: &Path, within: Duration) {
    match tokio::time::timeout(within.max(Duration::from_secs(1)), shutdown_old(socket)).await {
        Ok(Ok(())) => tracing::info!(socket = %socket.display(), "--reboot: the running instance is draining; taking over"),
        Ok(Err(e)) => tracing::info!(socket = %socket.display(), error = %e, "--reboot: no running instance to take over from"),
        Err(_) => tracing::warn!(socket = %socket.display(), "--reboot: the running instance did not answer in time"),
    }
}

async fn shutdown_old(socket: &Path) -> std::io::Result<()> {
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    let mut startup = Vec::new();
    startup.extend_from_slice(&crate::protocol::codes::PROTOCOL_3_0.to_be_bytes());
    for kv in ["user", "pgbouncer", "database", "pgbouncer", ""] {
        startup.extend_from_slice(kv.as_bytes());
        startup.push(0);
    }
    let mut msg = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&startup);
    s.write_all(&msg).await?;
    read_until_ready(&mut s).await?;
    let q = b"SHUTDOWN\0";
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((q.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(q);
    s.write_all(&m).await?;
    read_until_ready(&mut s).await
}

/// Reads messages until ReadyForQuery; an ErrorResponse first is an error.
async fn read_until_ready(s: &mut tokio::net::UnixStream) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad message length"));
        }
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await?;
        match head[0] {
            b'Z' => return Ok(()),
            b'E' => return Err(std::io::Error::other(String::from_utf8_lossy(&body).replace('\0', " "))),
            _ => {}
        }
    }
}
