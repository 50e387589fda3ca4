//! pgsurge itself, started in this process in front of the demo cluster, as the tests' harness does.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_postgres::SimpleQueryMessage;

use super::schema::{APP, FLOOD};
use crate::config::{Config, Dur, Settings, UserSettings};
use crate::limit::RuleSettings;
use crate::App;

/// Server connections per (database, user) pool.
pub const POOL_SIZE: usize = 10;
/// Workload 5's limit on the flooding user.
pub const FLOOD_QPS: u32 = 100;

/// Which of pgsurge's fixes this demo's proxy runs with (shown in the report and the JSON).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Features {
    pub pooling: bool,
    pub cache: bool,
    pub batch: bool,
    pub rate_limits: bool,
}

pub struct Proxy {
    pub app: Arc<App>,
    pub port: u16,
    pub features: Features,
    task: JoinHandle<std::io::Result<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:`port` (0: any free port; a taken port falls back to any).
    pub async fn start(pg_port: u16, port: u16) -> Result<Proxy, String> {
        let mut s = Settings {
            upstream: Some(format!("postgres://{APP}:{APP}@127.0.0.1:{pg_port}/{APP}")),
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some(String::new()),
            pool_size: Some(POOL_SIZE),
            admin_users: Some(APP.into()),
            limit_max_delay: Some(Dur(Duration::from_millis(50))),
            ..Default::default()
        };
        s.users.insert(FLOOD.into(), UserSettings { password: Some(FLOOD.into()), ..Default::default() });
        s.limits.users.insert(FLOOD.into(), RuleSettings { qps: Some(FLOOD_QPS), burst: Some(10), ..Default::default() });
        s.cache_flag = Some(true);
        s.batch_flag = Some(true);
        let config = Config::build(s).map_err(|e| e.to_string())?;
        let features = Features { pooling: true, cache: config.cache.enabled, batch: config.batch.enabled, rate_limits: true };
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(_) => TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("bind pgsurge: {e}"))?,
        };
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let app = App::new(config);
        let task = tokio::spawn(crate::run(app.clone(), listener));
        Ok(Proxy { app, port, features, task })
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
