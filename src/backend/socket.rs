//! Socket options of server connections, so a peer that vanishes without a FIN or RST (a cable pulled, a node
//! gone) is noticed: TCP keepalive while idle, and on Linux TCP_USER_TIMEOUT while sent data goes unacknowledged.

use std::time::Duration;

use tokio::net::TcpStream;

/// `server_tcp_keepalive`, `server_tcp_keepidle`, `server_tcp_keepintvl`, `server_tcp_keepcnt`, `tcp_user_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOpts {
    pub keepalive: bool,
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
    /// How long sent data may stay unacknowledged before the connection is dropped (zero: the OS default).
    pub user_timeout: Duration,
}

impl Default for TcpOpts {
    fn default() -> Self {
        TcpOpts {
            keepalive: true,
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 3,
            user_timeout: Duration::from_secs(60),
        }
    }
}

impl TcpOpts {
    /// Applies the options to a freshly connected server socket.
    pub fn apply(&self, tcp: &TcpStream) -> std::io::Result<()> {
        use rustix::net::sockopt;
        sockopt::set_socket_keepalive(tcp, self.keepalive)?;
        if self.keepalive {
            // The kernel counts in whole seconds; below one would be refused.
            sockopt::set_tcp_keepidle(tcp, self.idle.max(Duration::from_secs(1)))?;
            sockopt::set_tcp_keepintvl(tcp, self.interval.max(Duration::from_secs(1)))?;
            sockopt::set_tcp_keepcnt(tcp, self.count.max(1))?;
        }
        #[cfg(target_os = "linux")]
        if !self.user_timeout.is_zero() {
            let ms = u32::try_from(self.user_timeout.as_millis()).unwrap_or(u32::MAX);
            sockopt::set_tcp_user_timeout(tcp, ms)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_options_reach_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let opts = TcpOpts {
            keepalive: true,
            idle: Duration::from_secs(7),
            interval: Duration::from_secs(2),
            count: 4,
            user_timeout: Duration::from_millis(1500),
        };
        opts.apply(&tcp).unwrap();
        use rustix::net::sockopt;
        assert!(sockopt::socket_keepalive(&tcp).unwrap());
        assert_eq!(sockopt::tcp_keepidle(&tcp).unwrap(), Duration::from_secs(7));
        assert_eq!(sockopt::tcp_keepintvl(&tcp).unwrap(), Duration::from_secs(2));
        assert_eq!(sockopt::tcp_keepcnt(&tcp).unwrap(), 4);
        #[cfg(target_os = "linux")]
        assert_eq!(sockopt::tcp_user_timeout(&tcp).unwrap(), 1500);
        TcpOpts { keepalive: false, ..opts }.apply(&tcp).unwrap();
        assert!(!sockopt::socket_keepalive(&tcp).unwrap());
    }
}
