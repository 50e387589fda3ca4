//! The Unix-domain socket listener (`unix_socket_dir/.s.PGSQL.<port>`, as Postgres and PgBouncer name it): the
//! same client handling as TCP, and a peer running as pgsurge's own OS user may use the console as `pgbouncer`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;

use crate::app::{App, Shutdown};
use crate::net::Stream;

/// Binds the socket file, replacing a stale one left by a process that is gone (a live one is an error).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("{} is in use", path.display())));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| std::io::Error::new(e.kind(), format!("unix socket {}: {e}", path.display())))
}

/// `bind`, retried for up to `wait` while another instance still holds the socket (an online restart).
pub async fn bind_retrying(path: &Path, wait: std::time::Duration) -> std::io::Result<UnixListener> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match bind(path) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            r => return r,
        }
    }
}

/// Unix clients have no address; they are shown (and rate-limited) as this one.
pub const UNIX_PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// Accepts until shutdown begins, then removes the socket file.
pub async fn accept_loop(app: Arc<App>, listener: UnixListener, path: std::path::PathBuf) {
    use std::os::unix::fs::MetadataExt;
    let own_uid = rustix::process::geteuid().as_raw();
    // At exit the file is removed only if it is still ours (an instance that took over may have bound a new one).
    let inode = std::fs::metadata(&path).map(|m| m.ino()).ok();
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let peer_admin = stream.peer_cred().is_ok_and(|c| c.uid() == own_uid);
                    let count = crate::frontend::listener::ClientCount::new(app.clone());
                    tokio::spawn(crate::frontend::listener::serve_client(count, Box::new((Stream::Unix(stream), UNIX_PEER)), peer_admin));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the unix socket");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() != Shutdown::Running {
                    break;
                }
            }
        }
    }
    if std::fs::metadata(&path).map(|m| m.ino()).ok() == inode {
        let _ = std::fs::remove_file(&path);
    }
}
