//! pgsurge itself, started in this process in front of the demo cluster, as the tests' harness does.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pgsurge::config::{Config, Settings};
use pgsurge::App;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_postgres::SimpleQueryMessage;

use super::schema::{APP, FLOOD};

/// Server connections per (database, user) pool.
pub const POOL_SIZE: usize = 10;
/// Workload 5's limit on the flooding user.
pub const FLOOD_QPS: u32 = 100;

/// Which of pgsurge's fixes this demo's proxy runs with, read back from the configuration its flags produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Features {
    pub cache: bool,
    pub batch: bool,
    /// Users with a query rate limit.
    pub rate_limited_users: Vec<String>,
}

pub struct Proxy {
    pub app: Arc<App>,
    pub port: u16,
    pub features: Features,
    /// The command line it runs with (as a user would type it).
    pub command: String,
    task: JoinHandle<std::io::Result<()>>,
}

impl Proxy {
    /// Starts pgsurge in this process with its real command-line flags and a config file written to `dir`
    /// (the flooding user and its rate limit); listens on 127.0.0.1:`port` (0: any free port; a taken port falls
    /// back to any).
    pub async fn start(pg_port: u16, port: u16, dir: &Path) -> Result<Proxy, String> {
        let file = dir.join("pgsurge-demo.toml");
        let toml = format!("[users.{FLOOD}]\npassword = \"{FLOOD}\"\n\n[limits.users.{FLOOD}]\nqps = {FLOOD_QPS}\nburst = 10\n");
        std::fs::write(&file, toml).map_err(|e| format!("write {}: {e}", file.display()))?;
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(_) => TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("bind pgsurge: {e}"))?,
        };
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let upstream = format!("postgres://{APP}:{APP}@127.0.0.1:{pg_port}/{APP}");
        let listen = format!("127.0.0.1:{port}");
        let pool = POOL_SIZE.to_string();
        let config_path = file.display().to_string();
        let args = [
            "pgsurge",
            "--upstream",
            &upstream,
            "--listen",
            &listen,
            "--admin-listen",
            "",
            "--pool-size",
            &pool,
            "--cache",
            "--batch",
            "--admin-users",
            APP,
            "--limit-max-delay",
            "50ms",
            "--config",
            &config_path,
        ];
        let settings = Settings::try_parse_from(args).map_err(|e| e.to_string())?;
        let config = Config::load(settings).map_err(|e| e.to_string())?;
        let rate_limited_users = config.limits.users.iter().filter(|(_, r)| r.qps.is_some()).map(|(u, _)| u.clone()).collect();
        let features = Features { cache: config.cache.enabled, batch: config.batch.enabled, rate_limited_users };
        let quote = |a: &&str| if a.is_empty() || a.contains(' ') { format!("'{a}'") } else { a.to_string() };
        let command = args.iter().map(quote).collect::<Vec<_>>().join(" ");
        let app = App::new(config);
        let task = tokio::spawn(pgsurge::run(app.clone(), listener));
        Ok(Proxy { app, port, features, command, task })
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://{APP}:{APP}@127.0.0.1:{}/{db}", self.port)
    }

    /// Closes every client and server connection and waits (bounded) for pgsurge to finish.
    pub async fn stop(self) {
        self.app.shutdown_now();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// What the admin console says to `SHOW NPLUSONE`: its rows, or the error it answered with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsoleAnswer {
    pub command: &'static str,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub async fn show_nplusone(proxy: &Proxy) -> ConsoleAnswer {
    let command = "SHOW NPLUSONE";
    let mut answer = ConsoleAnswer { command, columns: vec![], rows: vec![], error: None };
    let config = format!("host=127.0.0.1 port={} user={APP} password={APP} dbname=pgsurge connect_timeout=10", proxy.port);
    let result = async {
        let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client.simple_query(command).await
    };
    match tokio::time::timeout(Duration::from_secs(10), result).await {
        Ok(Ok(messages)) => {
            for m in messages {
                if let SimpleQueryMessage::Row(r) = m {
                    if answer.columns.is_empty() {
                        answer.columns = r.columns().iter().map(|c| c.name().to_string()).collect();
                    }
                    answer.rows.push((0..r.len()).map(|i| r.get(i).unwrap_or("").to_string()).collect());
                }
            }
        }
        Ok(Err(e)) => answer.error = Some(super::measure::describe(&e)),
        Err(_) => answer.error = Some("the console did not answer within 10s".into()),
    }
    answer
}
