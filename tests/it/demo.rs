//! `pgsurge demo --json` end to end, as a newcomer would run it: every workload reported on both sides, nothing
//! broken through pgsurge, and no cluster, process or directory left behind.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const WORKLOADS: [&str; 5] = ["connection_burst", "many_clients", "hot_read", "n_plus_one", "noisy_neighbour"];

/// Whether a process runs; a zombie (exited, waiting to be reaped by whoever adopted it) does not.
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z"),
        Err(_) => false,
    }
}

/// Runs the demo binary, killing it (by its PID) if it outlives `limit`; returns (status, stdout, stderr).
fn run_demo(limit: Duration) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsurge"))
        .args(["demo", "--duration", "2s", "--json"])
        .env_remove("PGSURGE_UPSTREAM")
        .env_remove("PGSURGE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgsurge demo");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pgsurge demo --duration 2s still running after {limit:?}; stderr:\n{}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

#[test]
fn demo_json_reports_every_workload_and_leaves_nothing_behind() {
    let (status, stdout, stderr) = run_demo(Duration::from_secs(240));
    assert!(status.success(), "pgsurge demo failed ({status}); stderr:\n{stderr}");
    let r: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is one JSON document ({e}):\n{stdout}"));

    let workloads = r["workloads"].as_array().expect("workloads");
    let find = |key: &str| workloads.iter().find(|w| w["key"] == key).unwrap_or_else(|| panic!("workload {key} missing: {r}"));
    for key in WORKLOADS {
        let w = find(key);
        for side in ["direct", "pgsurge"] {
            let s = &w[side];
            assert!(s["ok"].as_u64().unwrap() > 0, "{key} {side}: no request succeeded: {s}");
            assert!(s["throughput_per_s"].as_f64().unwrap() > 0.0, "{key} {side}: {s}");
            assert!(s["p50_ms"].as_f64().is_some() && s["p99_ms"].as_f64().is_some(), "{key} {side}: {s}");
            assert!(s["upstream_queries"].as_i64().is_some_and(|n| n > 0), "{key} {side}: Postgres' count is missing: {s}");
        }
        assert_eq!(w["pgsurge"]["errors"], 0, "{key}: errors through pgsurge: {}", w["pgsurge"]);
    }
    // Workload 2: 1,000 clients on a pool of 10 never hold more than the pool's connections upstream.
    let many = &find("many_clients")["pgsurge"];
    assert!(many["peak_pg_connections"].as_i64().unwrap() <= r["pool_size"].as_i64().unwrap(), "{many}");
    // Workload 5: the flooder met its rate limit through pgsurge.
    let flood = &find("noisy_neighbour")["pgsurge"]["flooder"];
    assert!(flood["limited"].as_u64().unwrap() > 0, "the flooder was never limited: {flood}");

    // With the cache and the batcher on, Postgres runs fewer queries than the clients sent.
    let fewer = |key: &str| {
        let s = &find(key)["pgsurge"];
        let (upstream, requests) = (s["upstream_queries"].as_i64().unwrap(), s["requests"].as_i64().unwrap());
        assert!(upstream < requests, "{key}: {upstream} upstream queries for {requests} requests: {s}");
    };
    if r["cache_enabled"] == true {
        fewer("hot_read");
    }
    if r["batch_enabled"] == true {
        fewer("n_plus_one");
    }

    // Nothing left: the cluster's postmaster, its port, pgsurge's port, the temp directory.
    let cluster = &r["cluster"];
    let pid = cluster["postmaster_pid"].as_u64().expect("the postmaster's pid is reported");
    assert!(!alive(pid), "postmaster {pid} still running");
    for port in [cluster["port"].as_u64().unwrap(), r["pgsurge_port"].as_u64().unwrap()] {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port as u16));
        assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(), "something still listens on {port}");
    }
    let dir = cluster["dir"].as_str().unwrap();
    assert!(!std::path::Path::new(dir).exists(), "{dir} was not removed");
}
