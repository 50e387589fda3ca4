//! The throwaway Postgres cluster of the demo: find the binaries, initdb in a temp dir, start on a free loopback
//! port, and always stop it (`pg_ctl -m immediate`) and remove the dir, whatever step was interrupted.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use parking_lot::Mutex;

/// Connections the direct workloads may open at once (1,000 clients) plus room for the monitor and pgsurge.
pub const MAX_CONNECTIONS: usize = 1100;

/// What a step that failed says, to the person running the demo.
pub type SetupError = String;

/// Where the cluster stands; the lock around it makes cleanup wait for a step still running in another thread.
#[derive(Debug, Default)]
struct State {
    started: bool,
    cleaned: bool,
}

pub struct Cluster {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    /// Whether the server library ships pg_stat_statements (else queries are counted by transactions).
    pub stat_statements: bool,
    /// Leave the cluster (stopped) and its directory behind.
    pub keep: bool,
    as_postgres: bool,
    state: Mutex<State>,
}

impl Cluster {
    /// Picks binaries, a port and a directory; starts nothing yet.
    pub fn prepare(keep: bool) -> Result<Cluster, SetupError> {
        let bin = find_bin()?;
        let as_postgres = is_root();
        if as_postgres && !user_exists("postgres") {
            return Err("running as root, Postgres must run as the `postgres` OS user, and there is none (install the Debian package `postgresql`, or run the demo as a regular user)".into());
        }
        let port = free_port().map_err(|e| format!("no free loopback port: {e}"))?;
        let dir = std::env::temp_dir().join(format!("pgsurge-demo-{}-{port}", std::process::id()));
        let stat_statements = has_stat_statements(&bin);
        Ok(Cluster { bin, dir, port, stat_statements, keep, as_postgres, state: Mutex::default() })
    }

    /// initdb (SCRAM on TCP, trust on the socket in `dir`), configure, `pg_ctl start`. Blocking.
    pub fn start(&self) -> Result<(), SetupError> {
        let mut st = self.state.lock();
        if st.cleaned {
            return Err("interrupted".into());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("create {}: {e}", self.dir.display()))?;
        if self.as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&self.dir);
            run_ok(chown, "chown")?;
        }
        let mut init = self.pg_cmd("initdb");
        init.arg("-D").arg(self.data()).args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        run_ok(init, "initdb")?;
        let mut conf = format!(
            "\n# pgsurge demo\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nmax_connections = {MAX_CONNECTIONS}\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nlog_min_messages = warning\n",
            self.port,
            self.dir.display()
        );
        if self.stat_statements {
            conf.push_str("shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n");
        }
        let path = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        text.push_str(&conf);
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
        st.started = true; // from here on, cleanup runs pg_ctl stop whether or not start succeeded
        let mut start = self.pg_cmd("pg_ctl");
        start.arg("-D").arg(self.data()).arg("-l").arg(self.log()).args(["-w", "-t", "60", "start"]);
        run_ok(start, "pg_ctl start").map_err(|e| format!("{e}\n{}", self.log_tail()))
    }

    /// The postmaster's PID while it runs (first line of postmaster.pid).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Stops the server at once and removes the directory (unless `keep`). Blocking; idempotent; waits for a
    /// `start` still running in another thread so nothing it launches is left behind.
    pub fn cleanup(&self) {
        let mut st = self.state.lock();
        if st.cleaned {
            return;
        }
        st.cleaned = true;
        if st.started {
            let pid = self.postmaster_pid();
            let mut stop = self.pg_cmd("pg_ctl");
            stop.arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "-t", "30", "stop"]);
            if let Err(e) = run_ok(stop, "pg_ctl stop") {
                if pid.is_some_and(alive) {
                    eprintln!("pgsurge demo: {e}");
                }
            }
            // pg_ctl returns once postmaster.pid is gone; make sure the process itself is, too (bounded).
            if let Some(pid) = pid {
                for _ in 0..100 {
                    if !alive(pid) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// tokio-postgres config of the superuser over the cluster's Unix socket (trust).
    pub fn super_config(&self, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.dir).port(self.port).user("postgres").dbname(db).application_name("pgsurge-demo-monitor");
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// A Postgres program, as the postgres OS user when we are root (Postgres refuses root), in its own process
    /// group so the terminal's Ctrl-C reaches only the demo, which then stops the cluster itself.
    fn pg_cmd(&self, prog: &str) -> Command {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(prog));
            c
        } else {
            Command::new(self.bin.join(prog))
        };
        c.process_group(0);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The newest `/usr/lib/postgresql/*/bin`, else the directory of `initdb` on PATH.
fn find_bin() -> Result<PathBuf, SetupError> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().split('.').next()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    if let Some((_, dir)) = dirs.pop() {
        return Ok(dir);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
            let initdb = std::fs::canonicalize(dir.join("initdb")).unwrap_or(dir.join("initdb"));
            return Ok(initdb.parent().map(Path::to_path_buf).unwrap_or(dir));
        }
    }
    Err("no Postgres server binaries found (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH; \
         install them, e.g. `apt-get install postgresql` on Debian/Ubuntu"
        .into())
}

/// pg_stat_statements needs both its library and its extension files.
fn has_stat_statements(bin: &Path) -> bool {
    let ask = |flag: &str| -> Option<PathBuf> {
        let out = Command::new(bin.join("pg_config")).arg(flag).stdin(Stdio::null()).output().ok()?;
        out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let lib = ask("--pkglibdir").unwrap_or_else(|| bin.with_file_name("lib"));
    let share = ask("--sharedir")
        .unwrap_or_else(|| PathBuf::from("/usr/share/postgresql").join(bin.parent().and_then(Path::file_name).unwrap_or_default()));
    lib.join("pg_stat_statements.so").exists() && share.join("extension/pg_stat_statements.control").exists()
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    // /proc/self/status' Uid line: real, effective, saved, fs.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0")))
        .unwrap_or(false)
}

fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd").map(|p| p.lines().any(|l| l.split(':').next() == Some(name))).unwrap_or(false)
}

/// Whether a process runs (a zombie counts as gone: it is only waiting to be reaped by its parent).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z"),
        Err(_) => false,
    }
}

fn run_ok(mut c: Command, what: &str) -> Result<(), SetupError> {
    let out = c.stdin(Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed: {}{}", String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim()))
    }
}
