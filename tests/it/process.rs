//! The pgsurge binary's place among the machine's sessions (`own_session`, src/process.rs): started without a
//! terminal in front, it leads a session of its own; `--own-session false` keeps it in its parent's.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The session id of a process (field 6 of /proc/PID/stat).
fn session_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let (_, rest) = stat.rsplit_once(')').expect("stat has a comm");
    rest.split_whitespace().nth(3).and_then(|s| s.parse().ok()).expect("session field")
}

/// Starts the binary with an upstream nobody listens on (it is not contacted before a client logs in) and waits,
/// up to 30 s, for its "accepting connections" line: by then it has placed itself.
fn start(extra: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsurge"))
        .args(["--upstream", "postgres://nobody:x@127.0.0.1:9/none", "--listen", "127.0.0.1:0", "--admin-listen", ""])
        .args(extra)
        .env_remove("PGSURGE_CONFIG")
        .env_remove("PGSURGE_OWN_SESSION")
        .env("PGSURGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgsurge");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("accepting connections") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.recv_timeout(Duration::from_millis(100)).is_err() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("pgsurge exited before accepting connections: {status}");
        }
        assert!(Instant::now() < deadline, "pgsurge did not accept connections within 30 s");
    }
    child
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn started_without_a_terminal_in_front_pgsurge_leads_a_session_of_its_own() {
    let child = start(&[]);
    let (pid, sid) = (child.id(), session_of(child.id()));
    let ours = session_of(std::process::id());
    stop(child);
    // Run as a terminal's foreground job, the test's child is one too: then it must stay, so Ctrl-C reaches it.
    if pgsurge::process::foreground_of_terminal() {
        assert_eq!(sid, ours, "a terminal's foreground job stays in the terminal's session");
    } else {
        assert_eq!(sid, pid, "pgsurge should have started its own session (setsid)");
    }
}

#[test]
fn own_session_false_keeps_pgsurge_in_its_parents_session() {
    let child = start(&["--own-session", "false"]);
    let sid = session_of(child.id());
    stop(child);
    assert_eq!(sid, session_of(std::process::id()));
}
