//! The test harness: owns a throwaway Postgres (initdb + pg_ctl on a free port, SCRAM on TCP) unless
//! PGSURGE_TEST_DATABASE_URL names one, and starts pgsurge in-process on port 0 for each test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgsurge::config::{Config, Settings};
use pgsurge::App;
use tokio_postgres::{Client, NoTls};

/// A Postgres cluster the tests may use. The shared one lives for the whole test process.
pub struct Pg {
    pub port: u16,
    /// Directory of the cluster when the harness owns it (None for PGSURGE_TEST_DATABASE_URL).
    pub dir: Option<PathBuf>,
    pub bin: Option<PathBuf>,
    /// URL of the role `app` (password `app`), owner of database `app`.
    pub app_url: String,
    /// URL of a superuser (for counters and setup), over the socket or as given.
    pub super_url: String,
}

static SHARED: OnceLock<Pg> = OnceLock::new();

/// The cluster shared by tests that do not stop or restart it.
pub fn pg() -> &'static Pg {
    SHARED.get_or_init(|| match std::env::var("PGSURGE_TEST_DATABASE_URL") {
        Ok(url) => Pg::external(&url),
        Err(_) => Pg::start(),
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres binaries under /usr/lib/postgresql (apt-get install postgresql)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Runs a Postgres binary, as the postgres OS user when we are root (Postgres refuses to run as root).
fn pg_cmd(bin: &Path, prog: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
        c
    } else {
        Command::new(bin.join(prog))
    }
}

fn run_ok(mut c: Command, what: &str) {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

impl Pg {
    fn external(url: &str) -> Pg {
        let u = url::Url::parse(url).expect("PGSURGE_TEST_DATABASE_URL is a postgres:// URL");
        Pg { port: u.port().unwrap_or(5432), dir: None, bin: None, app_url: url.to_string(), super_url: url.to_string() }
    }

    /// initdb, configure and start a new cluster; a watchdog stops it when this test process exits.
    pub fn start() -> Pg {
        let bin = pg_bin();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pgsurge-test-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&dir);
            run_ok(chown, "chown");
        }
        let mut init = pg_cmd(&bin, "initdb");
        init.args(["-D"]).arg(dir.join("data")).args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        run_ok(init, "initdb");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\nlog_min_messages = warning\n",
            dir.display()
        );
        // Role app logs in with SCRAM over the Unix socket too (the superuser keeps trust there, for setup).
        let hba_path = dir.join("data/pg_hba.conf");
        let hba = std::fs::read_to_string(&hba_path).unwrap();
        std::fs::write(&hba_path, format!("local all app scram-sha-256\n{hba}")).unwrap();
        let conf_path = dir.join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        let pg = Pg {
            port,
            dir: Some(dir.clone()),
            bin: Some(bin.clone()),
            app_url: format!("postgres://app:app@127.0.0.1:{port}/app"),
            super_url: format!("host={} port={port} user=postgres dbname=postgres", dir.display()),
        };
        pg.pg_ctl_start();
        watchdog(&bin, &dir);
        pg.psql_super("postgres", "CREATE ROLE app LOGIN PASSWORD 'app' CREATEROLE");
        pg.psql_super("postgres", "CREATE DATABASE app OWNER app");
        pg.psql_super("app", "CREATE EXTENSION pg_stat_statements;");
        pg
    }

    pub fn pg_ctl_start(&self) {
        let (bin, dir) = (self.bin.as_ref().unwrap(), self.dir.as_ref().unwrap());
        let mut c = pg_cmd(bin, "pg_ctl");
        c.args(["-D"]).arg(dir.join("data")).args(["-l"]).arg(dir.join("log")).args(["-w", "-t", "30", "start"]);
        run_ok(c, "pg_ctl start");
    }

    pub fn pg_ctl_stop(&self) {
        let (bin, dir) = (self.bin.as_ref().unwrap(), self.dir.as_ref().unwrap());
        let mut c = pg_cmd(bin, "pg_ctl");
        c.args(["-D"]).arg(dir.join("data")).args(["-m", "fast", "-w", "stop"]);
        run_ok(c, "pg_ctl stop");
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), started on a port of its own; stopped and removed
    /// with the test process like the primary.
    pub fn start_standby(&self) -> Pg {
        let (bin, dir) = (self.bin.as_ref().unwrap(), self.dir.as_ref().unwrap());
        let port = free_port();
        let sdir = std::env::temp_dir().join(format!("pgsurge-test-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sdir);
        std::fs::create_dir_all(&sdir).unwrap();
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&sdir);
            run_ok(chown, "chown");
        }
        let mut backup = pg_cmd(bin, "pg_basebackup");
        backup.arg("-h").arg(dir).args(["-p", &self.port.to_string(), "-U", "postgres", "-D"]).arg(sdir.join("data"));
        backup.args(["-R", "-X", "stream", "--no-sync", "-c", "fast"]);
        run_ok(backup, "pg_basebackup");
        let conf_path = sdir.join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&format!("\nport = {port}\nunix_socket_directories = '{}'\n", sdir.display()));
        std::fs::write(&conf_path, text).unwrap();
        let standby = Pg {
            port,
            dir: Some(sdir.clone()),
            bin: Some(bin.clone()),
            app_url: format!("postgres://app:app@127.0.0.1:{port}/app"),
            super_url: format!("host={} port={port} user=postgres dbname=postgres", sdir.display()),
        };
        standby.pg_ctl_start();
        watchdog(bin, &sdir);
        standby
    }

    /// Runs `pg_ctl -D <data> <args>` (e.g. `-m immediate stop`, `-w promote`).
    pub fn pg_ctl(&self, args: &[&str]) {
        let (bin, dir) = (self.bin.as_ref().unwrap(), self.dir.as_ref().unwrap());
        let mut c = pg_cmd(bin, "pg_ctl");
        c.args(["-D"]).arg(dir.join("data")).args(args);
        run_ok(c, &format!("pg_ctl {}", args.join(" ")));
    }

    /// Runs SQL as the superuser through psql (setup only).
    pub fn psql_super(&self, db: &str, sql: &str) -> String {
        let conn = match &self.dir {
            Some(dir) => format!("host={} port={} user=postgres dbname={db}", dir.display(), self.port),
            None => self.super_url.clone(),
        };
        let out = Command::new("psql").args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", &conn, "-c", sql]).output().expect("psql");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A superuser client (for counters: pg_stat_statements, pg_stat_activity).
    pub async fn super_client(&self, db: &str) -> Client {
        let conn = match &self.dir {
            Some(dir) => format!("host={} port={} user=postgres dbname={db}", dir.display(), self.port),
            None => self.super_url.clone(),
        };
        connect(&conn).await
    }

    pub fn log_tail(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join("log")).ok())
            .map(|l| l.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// Stops the cluster and removes its directory once the test process is gone, however it ends.
#[allow(clippy::zombie_processes)] // the watchdog must outlive this process; it is never waited for
fn watchdog(bin: &Path, dir: &Path) {
    let stop = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {runas} {bin}/pg_ctl -D {dir}/data -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        runas = if is_root() { "runuser -u postgres --" } else { "" },
        bin = bin.display(),
        dir = dir.display()
    );
    Command::new("setsid")
        .args(["sh", "-c", &stop])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog");
}

pub async fn connect(conn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await.unwrap_or_else(|e| panic!("connect {conn}: {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A client whose socket the test can cut: aborting the handle drops the connection, as a killed process would.
pub async fn connect_killable(conn: &str) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await.unwrap_or_else(|e| panic!("connect {conn}: {e:?}"));
    let handle = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, handle)
}

pub async fn try_connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// pgsurge running in this test's runtime.
pub struct Proxy {
    pub app: Arc<App>,
    pub addr: SocketAddr,
}

impl Proxy {
    /// Starts pgsurge in front of the shared cluster with flags given as `Settings`.
    pub async fn start(settings: Settings) -> Proxy {
        Self::start_for(pg(), settings).await
    }

    pub async fn start_for(pg: &Pg, mut settings: Settings) -> Proxy {
        // pgsurge's logs go to the test's captured output: shown when a test fails (PGSURGE_LOG sets the level).
        let filter = tracing_subscriber::EnvFilter::try_from_env("PGSURGE_LOG").unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        if settings.upstream.is_none() && settings.databases.is_empty() {
            settings.upstream = Some(pg.app_url.clone());
        }
        settings.listen = Some("127.0.0.1:0".into());
        settings.admin_listen.get_or_insert_with(String::new);
        let config = Config::build(settings).expect("valid test config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = App::new(config);
        tokio::spawn(pgsurge::run(app.clone(), listener));
        Proxy { app, addr }
    }

    /// A connection string for `user`/`password` to `db` through the proxy.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} password={password} dbname={db}", self.addr.port())
    }

    pub fn app_url(&self) -> String {
        self.url("app", "app", "app")
    }

    pub fn pg_url(&self) -> String {
        format!("postgres://app:app@127.0.0.1:{}/app", self.addr.port())
    }

    pub async fn client(&self) -> Client {
        connect(&self.app_url()).await
    }
}

/// Polls `f` until it returns true or `timeout` passes; the deadline is the only wait, never a bare sleep.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A table name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// The SQLSTATE of a tokio-postgres error.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no code: {e}"))
}
