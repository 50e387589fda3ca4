//! A connection that is plain TCP, TLS or (upstream only) a Unix-domain socket, so the session, handshake and
//! server code read and write one type whichever it is; and `dial`, which opens an upstream one.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub enum Stream {
    Plain(TcpStream),
    /// A client that asked for TLS (pgsurge is the TLS server).
    ClientTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A server connection upgraded to TLS (pgsurge is the TLS client).
    ServerTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A server connection over a Unix-domain socket (the upstream host is a directory, as in libpq).
    Unix(UnixStream),
    /// Only while the TCP stream is handed to the TLS handshake; any I/O on it fails.
    Detached,
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Plain(s)
    }
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream detached for a TLS handshake that failed")
}

impl Stream {
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::ClientTls(s) => Some(s.get_ref().0),
            Stream::ServerTls(s) => Some(s.get_ref().0),
            Stream::Unix(_) | Stream::Detached => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ClientTls(_) | Stream::ServerTls(_))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().ok_or_else(detached)?.local_addr()
    }

    /// TCP_NODELAY; a Unix-domain socket has no Nagle delay to turn off.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(_) => Ok(()),
            _ => self.tcp().ok_or_else(detached)?.set_nodelay(on),
        }
    }

    /// Takes the plain TCP stream out for a TLS handshake (leaves `Detached`).
    pub fn take_plain(&mut self) -> io::Result<TcpStream> {
        match std::mem::replace(self, Stream::Detached) {
            Stream::Plain(s) => Ok(s),
            other => {
                *self = other;
                Err(io::Error::new(io::ErrorKind::InvalidInput, "TLS requested twice on one connection"))
            }
        }
    }

    /// Waits until a plain TCP stream has data (or its peer closed); other kinds return at once. Lets a reader
    /// find a buffer only when there is something to put in it. Cancel-safe.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.readable().await,
            Stream::Unix(u) => u.readable().await,
            _ => Ok(()),
        }
    }

    /// `readable` as a poll: ready at once for TLS (its buffered plaintext is not visible on the socket).
    pub fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self {
            Stream::Plain(tcp) => tcp.poll_read_ready(cx),
            Stream::Unix(u) => u.poll_read_ready(cx),
            _ => std::task::Poll::Ready(Ok(())),
        }
    }

    /// True if nothing is waiting to be read and the peer has not closed: one non-blocking peek, which
    /// consumes nothing (so it is safe under TLS too).
    pub fn looks_alive(&self) -> bool {
        if let Stream::Unix(u) = self {
            // The socket is non-blocking: "would block" means nothing waiting and the peer still there.
            let mut probe = [0u8; 1];
            return matches!(rustix::net::recv(u, &mut probe[..], rustix::net::RecvFlags::PEEK), Err(e) if e == rustix::io::Errno::AGAIN);
        }
        let Some(tcp) = self.tcp() else { return false };
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Pending)
    }
}

struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Detached => false,
        }
    }
}

/// The socket file libpq would use for `host` and `port`: a host that is an absolute path names the directory of
/// Postgres' Unix-domain socket, `.s.PGSQL.<port>` in it.
pub fn unix_socket_path(host: &str, port: u16) -> Option<std::path::PathBuf> {
    host.starts_with('/').then(|| std::path::Path::new(host).join(format!(".s.PGSQL.{port}")))
}

/// How an upstream is named in messages: the socket file's path, `[v6]:port` or `host:port`.
pub fn display_addr(host: &str, port: u16) -> String {
    match unix_socket_path(host, port) {
        Some(path) => path.display().to_string(),
        None if host.contains(':') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    }
}

/// Opens a plain connection to an upstream: TCP (TCP_NODELAY on), or the Unix-domain socket when `host` is a
/// directory. TLS, if wanted, is layered on afterwards (TCP only, as libpq does).
pub async fn dial(host: &str, port: u16) -> io::Result<Stream> {
    if let Some(path) = unix_socket_path(host, port) {
        return Ok(Stream::Unix(UnixStream::connect(path).await?));
    }
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    Ok(Stream::Plain(tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn an_idle_unix_connection_looks_alive_until_the_peer_talks_or_leaves() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let ours = Stream::Unix(ours);
        assert!(ours.looks_alive(), "quiet and open");
        theirs.write_all(b"E").await.unwrap();
        assert!(!ours.looks_alive(), "an unread byte means it is not idle");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let ours = Stream::Unix(ours);
        drop(theirs);
        assert!(!ours.looks_alive(), "the peer closed");
        assert_eq!(unix_socket_path("/run/pg", 5433).unwrap(), std::path::Path::new("/run/pg/.s.PGSQL.5433"));
        assert!(unix_socket_path("db.local", 5432).is_none());
        assert_eq!(display_addr("/run/pg", 5433), "/run/pg/.s.PGSQL.5433");
        assert_eq!(display_addr("::1", 5432), "[::1]:5432");
    }
}
