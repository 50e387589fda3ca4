//! Where the pgsurge process sits among the machine's sessions: it starts one of its own, as a daemon does.
//!
//! With the kernel's autogroup scheduling (`/proc/sys/kernel/sched_autogroup_enabled`, on by default in most
//! distributions) every session shares one CPU share among all its processes. A proxy started from a shell script
//! next to its load (an app, a load generator) would split one share with them, while each Postgres backend (which
//! calls `setsid`) and a daemonized PgBouncer each get a share of their own. The proxy is the one process every
//! query passes through, so it then waits behind the backends for a CPU: measured on 2 cores under
//! `pgbench -S`, 64 clients, it was preempted 0.28 times per transaction in the script's session and 0.19 in its
//! own, for 5–12% more throughput. Containers and systemd services already run in a session and cgroup of their
//! own; there this changes nothing.
//!
//! A terminal's foreground job stays where it is, so Ctrl-C and the shell's job control keep working (`cargo run`
//! runs pgsurge in cargo's process group).

use std::io::IsTerminal;

/// What `start_own_session` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// pgsurge now leads a session of its own.
    OwnSession,
    /// A terminal runs pgsurge in its foreground (or feeds its stdin): left in the terminal's session.
    Foreground,
    /// pgsurge already leads its process group (started by `setsid`, by a shell with job control, or by a container
    /// runtime): a process group leader cannot start a session, and it has its own scheduling group or a
    /// terminal's job control already.
    GroupLeader,
    /// The call failed for another reason (carried for the log).
    Failed(String),
}

/// Starts a new session (`setsid`) unless a terminal runs pgsurge in its foreground; see the module comment.
pub fn start_own_session() -> Placement {
    if std::io::stdin().is_terminal() || foreground_of_terminal() {
        return Placement::Foreground;
    }
    match rustix::process::setsid() {
        Ok(_) => Placement::OwnSession,
        Err(rustix::io::Errno::PERM) => Placement::GroupLeader,
        Err(e) => Placement::Failed(e.to_string()),
    }
}

/// Whether this process' group is the foreground group of its controlling terminal (false without one).
pub fn foreground_of_terminal() -> bool {
    let Ok(tty) = std::fs::File::open("/dev/tty") else { return false };
    rustix::termios::tcgetpgrp(&tty).is_ok_and(|fg| fg == rustix::process::getpgrp())
}

/// Descriptors pgsurge needs besides clients and server connections: listeners, the runtime's epoll and
/// eventfd, stdio, the accept loop's spare, the admin endpoint's connections, cancel requests in flight.
pub const OTHER_FDS: usize = 64;

/// The open-files limit before and after `raise_open_files_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: u64,
    pub now: u64,
}

/// The soft RLIMIT_NOFILE now (None: unlimited).
pub fn open_files_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Raises the soft open-files limit to the hard limit: every client and server connection is a descriptor, and
/// shells and service managers often start processes at a soft limit of 1,024 under a much higher hard limit.
/// An unlimited hard limit is capped at the kernel's `fs.nr_open`, the most a process may have.
pub fn raise_open_files_limit() -> std::io::Result<OpenFiles> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current.unwrap_or(u64::MAX);
    let hard = match lim.maximum {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20),
    };
    if before >= hard {
        return Ok(OpenFiles { before, now: before });
    }
    setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: lim.maximum })?;
    Ok(OpenFiles { before, now: hard })
}

/// At start: raises the open-files limit and warns when `max_client_conn` clients plus the server connections the
/// pools may open cannot fit under it (clients past the room left are then refused with 53300 at accept).
pub fn check_open_files(config: &crate::Config) {
    let limit = match raise_open_files_limit() {
        Ok(f) => {
            if f.now != f.before {
                tracing::info!(before = f.before, now = f.now, "raised the open-files soft limit to the hard limit");
            }
            f.now
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-files soft limit");
            open_files_limit().unwrap_or(u64::MAX)
        }
    };
    let servers = config.server_conn_estimate();
    let need = (config.max_client_conn + servers + OTHER_FDS) as u64;
    if need > limit {
        tracing::warn!(
            open_files_limit = limit,
            max_client_conn = config.max_client_conn,
            server_connections = servers,
            "max_client_conn plus the server connections do not fit under the open-files limit: at most {} clients \
             will be served, the rest refused with 53300; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower max_client_conn",
            limit.saturating_sub((servers + OTHER_FDS) as u64)
        );
    }
}
