//! Running one workload against one target: bounded in time and count, timed per request, with a progress line
//! and Postgres' own counts (queries executed, peak connections) around it.

use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use super::schema::Monitor;

/// Where the clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Direct,
    Pgsurge,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Pgsurge => "pgsurge",
        }
    }
}

/// What every measurement shares.
pub struct Env {
    pub monitor: Arc<Monitor>,
    pub pg_port: u16,
    pub proxy_port: u16,
    /// How long each side of each workload runs.
    pub side_time: Duration,
    /// Client connections this process may open (from its file-descriptor limit).
    pub max_clients: usize,
    pub tty: bool,
}

/// One side's run: where to connect, until when, and how many requests are left.
#[derive(Clone)]
pub struct Run {
    pub port: u16,
    pub deadline: Instant,
    /// The measured window; the deadline may allow a setup phase before it.
    pub side_time: Duration,
    done: Arc<AtomicU64>,
    budget: Arc<AtomicI64>,
}

impl Run {
    /// Claims one request: false once the deadline has passed or the count is spent.
    pub fn next(&self) -> bool {
        Instant::now() < self.deadline && self.budget.fetch_sub(1, Ordering::Relaxed) > 0
    }

    pub fn config(&self, user: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(user)
            .dbname(super::schema::APP)
            .application_name("pgsurge-demo")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// The same run with a new deadline (after a setup phase), sharing its counters.
    pub fn until(&self, deadline: Instant) -> Run {
        Run { deadline, ..self.clone() }
    }

    /// Time left until the deadline, plus `grace` for a request already under way.
    pub fn left(&self, grace: Duration) -> Duration {
        self.deadline.saturating_duration_since(Instant::now()) + grace
    }
}

/// A client whose connection task runs until the client is dropped.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// What a set of clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub lat_us: Vec<u32>,
    pub ok: u64,
    pub errors: u64,
    /// Refused by a rate limit (SQLSTATE 53400): expected of the flooder, not a failure.
    pub limited: u64,
    pub first_error: Option<String>,
}

impl Tally {
    /// Records one request that started at `t0`; returns its value when it succeeded.
    pub fn record<T>(
        &mut self,
        run: &Run,
        t0: Instant,
        r: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        run.done.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(Ok(v)) => {
                self.ok += 1;
                self.lat_us.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                Some(v)
            }
            Ok(Err(e)) if e.code().is_some_and(|c| c.code() == "53400") => {
                self.limited += 1;
                None
            }
            Ok(Err(e)) => {
                self.fail(describe(&e));
                None
            }
            Err(_) => {
                self.fail("timed out".into());
                None
            }
        }
    }

    pub fn fail(&mut self, msg: String) {
        self.errors += 1;
        self.first_error.get_or_insert(msg);
    }

    pub fn merge(&mut self, o: Tally) {
        self.lat_us.extend(o.lat_us);
        self.ok += o.ok;
        self.errors += o.errors;
        self.limited += o.limited;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

/// A tokio-postgres error with Postgres' SQLSTATE and message when there is one.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// What a workload body hands back.
#[derive(Debug, Default)]
pub struct Measured {
    pub tally: Tally,
    /// The window throughput is computed over (the query phase, when connecting is a phase of its own).
    pub window: Duration,
    pub clients: usize,
    pub clients_connected: Option<usize>,
    pub connect_seconds: Option<f64>,
    /// Workload 5: the flooder's side of things (the tally is the other client's).
    pub flooder: Option<Tally>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FlooderFigures {
    pub served: u64,
    pub limited: u64,
    pub errors: u64,
}

/// One side of one workload, as reported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Side {
    pub target: Target,
    pub clients: usize,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub limited: u64,
    pub seconds: f64,
    pub throughput_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Queries (or transactions, see `counting`) Postgres executed for this run.
    pub upstream_queries: Option<i64>,
    /// Most client connections Postgres held at once during the run (sampled every 250 ms).
    pub peak_pg_connections: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients_connected: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flooder: Option<FlooderFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Runs `body` against `target` with `budget` requests at most, and reports it. Bounded: the body gets the side
/// time plus `setup` (connecting many clients) plus a grace period, then it is dropped (its tasks aborted).
pub async fn measure<F, Fut>(env: &Env, label: &str, target: Target, budget: i64, setup: Duration, body: F) -> Side
where
    F: FnOnce(Run) -> Fut,
    Fut: Future<Output = Measured>,
{
    let port = match target {
        Target::Direct => env.pg_port,
        Target::Pgsurge => env.proxy_port,
    };
    let run = Run {
        port,
        deadline: Instant::now() + setup + env.side_time,
        side_time: env.side_time,
        done: Arc::new(AtomicU64::new(0)),
        budget: Arc::new(AtomicI64::new(budget)),
    };
    // Backends of the previous side (1,000 direct clients) take a moment to exit: let them go first, so each
    // side's peak counts only its own connections. Bounded: 10 s, then measure anyway.
    let settled = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settled {
        match env.monitor.backends().await {
            Ok(n) if n > super::proxy::POOL_SIZE as i64 => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => break,
        }
    }
    let before = env.monitor.executed().await.ok();
    let peak = Arc::new(AtomicI64::new(0));
    let ticker = tokio::spawn(tick(env.monitor.clone(), peak.clone(), run.done.clone(), format!("{label} · {}", target.label()), env.tty));
    let started = Instant::now();
    let bound = setup + env.side_time + Duration::from_secs(15);
    let m = match tokio::time::timeout(bound, body(run.clone())).await {
        Ok(m) => m,
        Err(_) => {
            let mut m = Measured { window: started.elapsed(), ..Default::default() };
            m.tally.fail(format!("did not finish within {bound:?}"));
            m
        }
    };
    ticker.abort();
    let _ = ticker.await;
    if let Ok(n) = env.monitor.backends().await {
        peak.fetch_max(n, Ordering::Relaxed);
    }
    let after = env.monitor.executed().await.ok();
    let side = summarize(target, m, before.zip(after).map(|(b, a)| a - b), peak.load(Ordering::Relaxed));
    progress_done(env.tty, label, &side);
    side
}

fn summarize(target: Target, mut m: Measured, upstream: Option<i64>, peak: i64) -> Side {
    m.tally.lat_us.sort_unstable();
    let pct = |p: f64| {
        let v = &m.tally.lat_us;
        (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0)
    };
    let seconds = m.window.as_secs_f64().max(1e-3);
    let t = &m.tally;
    Side {
        target,
        clients: m.clients,
        requests: t.ok + t.errors + t.limited,
        ok: t.ok,
        errors: t.errors,
        limited: t.limited,
        seconds: round(seconds, 3),
        throughput_per_s: round(t.ok as f64 / seconds, 1),
        p50_ms: pct(0.50).map(|x| round(x, 3)),
        p99_ms: pct(0.99).map(|x| round(x, 3)),
        upstream_queries: upstream,
        peak_pg_connections: peak,
        clients_connected: m.clients_connected,
        connect_seconds: m.connect_seconds.map(|s| round(s, 2)),
        flooder: m.flooder.map(|f| FlooderFigures { served: f.ok, limited: f.limited, errors: f.errors }),
        first_error: t.first_error.clone(),
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Samples Postgres' connection count, and redraws the progress line on a terminal.
async fn tick(monitor: Arc<Monitor>, peak: Arc<AtomicI64>, done: Arc<AtomicU64>, label: String, tty: bool) {
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        if let Ok(n) = monitor.backends().await {
            peak.fetch_max(n, Ordering::Relaxed);
        }
        if tty {
            let line = format!(
                "  {label:<40} {:>5.1}s  {:>9} requests  {:>5} Postgres connections",
                started.elapsed().as_secs_f64(),
                done.load(Ordering::Relaxed),
                peak.load(Ordering::Relaxed)
            );
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        }
    }
}

fn progress_done(tty: bool, label: &str, s: &Side) {
    let line = format!(
        "  {:<40} {:>5.1}s  {:>9} requests  {:>5} errors",
        format!("{label} · {}", s.target.label()),
        s.seconds,
        s.requests,
        s.errors
    );
    let mut err = std::io::stderr().lock();
    let _ = if tty { writeln!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
}
