//! The one error type of pgsurge, and the single place where each error gets its SQLSTATE and severity.

use std::time::Duration;

use bytes::BytesMut;

use crate::protocol::encode::{put_error, ErrorFields};
use crate::protocol::view::ErrorView;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad bytes from a client: the connection cannot be trusted any more.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    #[error("{0}")]
    AuthRejected(String),
    #[error("database \"{0}\" does not exist")]
    NoSuchDatabase(String),
    #[error("{0}")]
    TooManyConnections(String),
    #[error("no server connection available within {}ms (query_wait_timeout)", .0.as_millis())]
    WaitTimeout(Duration),
    #[error(
        "no server connection for a slow statement within {}ms (query_wait_timeout): the slow lane's {cap} of the pool's {size} connections are busy",
        .wait.as_millis()
    )]
    SlowLaneTimeout { wait: Duration, cap: usize, size: usize },
    #[error("could not connect to upstream {addr}: {reason}")]
    UpstreamConnect { addr: String, reason: String },
    #[error("upstream connection lost: {0}")]
    UpstreamLost(String),
    /// An error Postgres sent while pgsurge itself was talking to it (login, reset): passed on with its code.
    #[error("{}", .0.message)]
    Server(ErrorView),
    #[error("the pgsurge server is shutting down")]
    Shutdown,
    #[error("{message}")]
    RateLimited { message: String, retry_after: Duration },
    #[error("canceling statement due to {0}")]
    Canceled(&'static str),
    #[error("terminating connection due to idle transaction timeout (idle_transaction_timeout)")]
    IdleInTransactionTimeout,
    #[error("permission denied: {0}")]
    InsufficientPrivilege(String),
    #[error("{0}")]
    NotSupported(String),
    /// A console command pgsurge does not know (42601 like a syntax error).
    #[error("{0}")]
    Syntax(String),
    /// A reload refused: the running configuration stays.
    #[error("{0}")]
    Config(String),
    /// `DISABLE db` on the console: new clients of that database are refused until `ENABLE db`.
    #[error("database \"{0}\" is disabled")]
    DatabaseDisabled(String),
    #[error("client connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether an error ends the client's session (FATAL) or only its current request (ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Error {
    /// The SQLSTATE a driver reads; see correctness.md "Limits and errors". Exhaustive on purpose.
    pub fn sqlstate(&self) -> &str {
        match self {
            Error::Protocol(_) => "08P01",
            Error::AuthFailed(_) => "28P01",
            Error::AuthRejected(_) => "28000",
            Error::NoSuchDatabase(_) => "3D000",
            Error::TooManyConnections(_) | Error::WaitTimeout(_) | Error::SlowLaneTimeout { .. } => "53300",
            Error::UpstreamConnect { .. } => "08001",
            Error::UpstreamLost(_) => "08006",
            Error::Server(e) => &e.code,
            Error::Shutdown => "57P01",
            Error::RateLimited { .. } => "53400",
            Error::Canceled(_) => "57014",
            Error::IdleInTransactionTimeout => "25P03",
            Error::InsufficientPrivilege(_) => "42501",
            Error::NotSupported(_) => "0A000",
            Error::Syntax(_) => "42601",
            Error::Config(_) => "F0000",
            Error::DatabaseDisabled(_) => "57P03",
            Error::Io(_) => "08006",
        }
    }

    pub fn severity(&self) -> Severity {
        match self {
            Error::WaitTimeout(_)
            | Error::SlowLaneTimeout { .. }
            | Error::RateLimited { .. }
            | Error::Canceled(_)
            | Error::InsufficientPrivilege(_)
            | Error::NotSupported(_)
            | Error::Syntax(_)
            | Error::Config(_)
            | Error::UpstreamConnect { .. } => Severity::Error,
            Error::Server(e) if e.severity == "ERROR" => Severity::Error,
            _ => Severity::Fatal,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::RateLimited { retry_after, .. } => Some(format!("retry after {} ms", retry_after.as_millis().max(1))),
            Error::Server(e) => e.detail.clone(),
            _ => None,
        }
    }

    /// Whether a client that receives this may simply retry: the request provably did not run.
    pub fn retry_safe(&self) -> bool {
        matches!(
            self,
            Error::WaitTimeout(_)
                | Error::SlowLaneTimeout { .. }
                | Error::RateLimited { .. }
                | Error::UpstreamConnect { .. }
                | Error::TooManyConnections(_)
        )
    }

    /// Appends the ErrorResponse a client should see.
    pub fn write_to(&self, out: &mut BytesMut) {
        self.write_with(out, self.severity());
    }

    /// Appends the ErrorResponse with a forced severity (anything before ReadyForQuery is FATAL).
    pub fn write_with(&self, out: &mut BytesMut, severity: Severity) {
        let sev = match severity {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        };
        let message = self.to_string();
        let detail = self.detail();
        put_error(out, &ErrorFields { severity: sev, code: self.sqlstate(), message: &message, detail: detail.as_deref(), hint: None });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_the_codes_drivers_read() {
        assert_eq!(Error::WaitTimeout(Duration::from_secs(1)).sqlstate(), "53300");
        assert_eq!(Error::WaitTimeout(Duration::from_secs(1)).severity(), Severity::Error);
        let lane = Error::SlowLaneTimeout { wait: Duration::from_millis(300), cap: 3, size: 10 };
        assert_eq!((lane.sqlstate(), lane.severity(), lane.retry_safe()), ("53300", Severity::Error, true));
        assert!(lane.to_string().contains("slow lane"), "{lane}");
        assert_eq!(Error::TooManyConnections("x".into()).severity(), Severity::Fatal);
        assert_eq!(Error::AuthFailed("app".into()).to_string(), "password authentication failed for user \"app\"");
        assert_eq!(Error::RateLimited { message: "m".into(), retry_after: Duration::from_millis(5) }.sqlstate(), "53400");
    }
}
