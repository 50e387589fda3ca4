//! Open files (issue 15): the binary raises its soft limit to the hard limit, warns at start when max_client_conn
//! and the server connections cannot fit, and refuses clients past the room left with FATAL 53300 at once (none
//! hangs), while clients already in keep getting server connections.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{code, pg, try_connect};

/// pgsurge under `prlimit --nofile=SOFT:HARD`; returns the child, its port and its log lines so far (kept filling).
fn start_limited(soft: u64, hard: u64, extra: &[&str]) -> (Child, u16, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_pgsurge"))
        .args(["--upstream", &pg().app_url, "--listen", "127.0.0.1:0", "--admin-listen", "", "--own-session", "false"])
        .args(extra)
        .env_remove("PGSURGE_CONFIG")
        .env("PGSURGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgsurge under prlimit");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let port = lines.lock().unwrap().iter().find(|l| l.contains("accepting connections")).and_then(|l| {
            let at = l.find("127.0.0.1:")? + "127.0.0.1:".len();
            l[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
        });
        if let Some(port) = port {
            return (child, port, lines);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pgsurge exited: {status}: {:?}", lines.lock().unwrap());
        }
        assert!(Instant::now() < deadline, "pgsurge did not accept within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_soft_open_files_limit_is_raised_to_the_hard_limit() {
    let (child, _, lines) = start_limited(256, 4096, &["--max-client-conn", "100"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let log = lines.lock().unwrap().join("\n");
    stop(child);
    let row = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let nums: Vec<&str> = row.split_whitespace().filter(|w| w.chars().all(|c| c.is_ascii_digit())).collect();
    assert_eq!(nums, ["4096", "4096"], "soft raised to hard: {row}");
    assert!(log.contains("raised the open-files soft limit"), "{log}");
    assert!(!log.contains("do not fit"), "100 clients and their servers fit under 4096: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_past_the_open_files_limit_get_53300_and_those_in_keep_working() {
    // 150 descriptors: the budget is 150 - 2 (pool) - 64 (others) = 84 clients.
    let (child, port, lines) = start_limited(150, 150, &["--max-client-conn", "1000", "--pool-size", "2"]);
    let log = lines.lock().unwrap().join("\n");
    assert!(log.contains("do not fit under the open-files limit"), "warned at start: {log}");
    let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let first = try_connect(&url).await.expect("the first client logs in");
    let mut tries = vec![];
    for _ in 0..120 {
        let url = url.clone();
        tries.push(tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(20), try_connect(&url)).await }));
    }
    let (mut ok, mut refused, mut kept) = (0, 0, vec![]);
    for t in tries {
        match t.await.unwrap() {
            Err(_) => panic!("a client hung for 20 s instead of being refused"),
            Ok(Ok(c)) => {
                ok += 1;
                kept.push(c);
            }
            Ok(Err(e)) => {
                assert_eq!(code(&e), "53300", "refused as too many connections: {e}");
                refused += 1;
            }
        }
    }
    assert!(ok >= 60 && refused >= 30, "{ok} in, {refused} refused");
    // Those in still get server connections (the pool's descriptors were left free).
    for (i, c) in kept.iter().enumerate().step_by(10) {
        let n = tokio::time::timeout(Duration::from_secs(20), c.query_one("SELECT $1::int4", &[&(i as i32)])).await;
        assert_eq!(n.expect("answered within 20 s").unwrap().get::<_, i32>(0), i as i32);
    }
    assert_eq!(first.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let log = lines.lock().unwrap().join("\n");
    let warnings = log.lines().filter(|l| l.contains("clients refused with 53300")).count();
    assert!(warnings <= 2, "logged at most once per 10 s, not per refusal: {warnings}");
    drop(kept);
    stop(child);
}
