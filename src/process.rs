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
