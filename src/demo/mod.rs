//! `pgsurge demo`: a throwaway Postgres, pgsurge in front of it, five short workloads run both directly and
//! through pgsurge, one table of results; then pgsurge stays up for the user until Ctrl-C, and everything is
//! cleaned up on the way out, Ctrl-C included.

mod cluster;
mod measure;
mod proxy;
mod report;
mod schema;
mod workloads;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use cluster::Cluster;
use measure::{Env, Target};
use pgsurge::config::DemoArgs;
use proxy::Proxy;
use report::{ClusterInfo, Report, WorkloadResult};

/// The port pgsurge takes when it is free (the usual one), so the printed URL is the familiar one.
const PREFERRED_PORT: u16 = 6432;

/// Runs the demo on its own runtime; the exit code says whether it completed.
pub fn run(args: DemoArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSURGE_LOG").unwrap_or_else(|_| "warn".into());
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgsurge demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(main(args));
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

/// Why the demo ended early.
enum Stop {
    Failed(String),
    Signalled(&'static str),
}

async fn main(args: DemoArgs) -> ExitCode {
    // Handlers first: from here on a Ctrl-C reaches us (not the default "exit now") and we clean up.
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgsurge demo: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cluster = match Cluster::prepare(args.keep) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("pgsurge demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut proxy = None;
    let outcome = tokio::select! {
        r = demo(&cluster, &args, &mut proxy) => r.map_err(Stop::Failed),
        s = signals.recv() => Err(Stop::Signalled(s)),
    };
    let code = match outcome {
        Ok(report) if args.json => {
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            let _ = writeln!(std::io::stdout().lock(), "{text}");
            ExitCode::SUCCESS
        }
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", report::render(&report));
            if let Some(p) = &proxy {
                let _ = write!(out, "{}", ready_lines(p, &report));
            }
            let _ = out.flush();
            drop(out);
            let s = signals.recv().await;
            eprintln!("\n{s}: stopping pgsurge and the demo cluster");
            ExitCode::SUCCESS
        }
        Err(Stop::Failed(e)) => {
            eprintln!("pgsurge demo: {e}");
            ExitCode::FAILURE
        }
        Err(Stop::Signalled(s)) => {
            eprintln!("\n{s}: stopping the workloads, pgsurge and the demo cluster");
            ExitCode::from(130)
        }
    };
    if let Some(p) = proxy.take() {
        p.stop().await;
    }
    let c = cluster.clone();
    let _ = tokio::task::spawn_blocking(move || c.cleanup()).await;
    if args.keep {
        eprintln!("cluster kept (stopped) in {}", cluster.dir.display());
    }
    code
}

/// Setup, the five workloads on both sides, and the console's findings. `proxy` is filled as soon as pgsurge
/// runs, so that it is stopped however this future ends.
async fn demo(cluster: &Arc<Cluster>, args: &DemoArgs, proxy: &mut Option<Proxy>) -> Result<Report, String> {
    let tty = std::io::stderr().is_terminal();
    eprintln!("pgsurge demo: Postgres from {} in {} on 127.0.0.1:{}", cluster.bin.display(), cluster.dir.display(), cluster.port);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start()).await.map_err(|e| e.to_string())??;
    eprintln!("pgsurge demo: loading the sample schema (authors, books, orders: ~100k rows)");
    schema::load(cluster).await?;
    let monitor = Arc::new(schema::Monitor::new(cluster).await?);
    let p = Proxy::start(cluster.port, if args.json { 0 } else { PREFERRED_PORT }, &cluster.dir).await?;
    let (proxy_port, features, command) = (p.port, p.features.clone(), p.command.clone());
    *proxy = Some(p);

    let side_time = (args.duration.0 / 2).max(Duration::from_millis(200));
    let env = Env { monitor: monitor.clone(), pg_port: cluster.port, proxy_port, side_time, max_clients: client_budget(), tty };
    if env.max_clients < 1000 {
        eprintln!("pgsurge demo: the open-files limit allows {} clients for workload 2 (raise `ulimit -n` for 1,000)", env.max_clients);
    }
    eprintln!(
        "pgsurge demo: running 5 workloads, {:.1}s against Postgres directly, then {:.1}s through pgsurge",
        side_time.as_secs_f64(),
        side_time.as_secs_f64()
    );
    let mut results = vec![];
    for w in &workloads::WORKLOADS {
        let direct = workloads::run(&env, w, Target::Direct).await;
        let pgsurge = workloads::run(&env, w, Target::Pgsurge).await;
        results.push(WorkloadResult { key: w.key, title: w.title, what: w.what, direct, pgsurge });
    }
    let nplusone = proxy::show_nplusone(proxy.as_ref().ok_or("pgsurge is not running")?).await;
    Ok(Report {
        pgsurge_version: env!("CARGO_PKG_VERSION"),
        postgres_version: monitor.server_version().await,
        seconds_per_side: side_time.as_secs_f64(),
        cache_enabled: features.cache,
        batch_enabled: features.batch,
        features,
        command,
        pool_size: proxy::POOL_SIZE,
        flood_qps_limit: proxy::FLOOD_QPS,
        counting: monitor.counting,
        cluster: ClusterInfo {
            dir: cluster.dir.display().to_string(),
            port: cluster.port,
            postmaster_pid: cluster.postmaster_pid(),
            kept: args.keep,
        },
        pgsurge_port: proxy_port,
        workloads: results,
        nplusone,
    })
}

/// What to paste to try pgsurge by hand.
fn ready_lines(p: &Proxy, r: &Report) -> String {
    format!(
        "\npgsurge is running on 127.0.0.1:{port} in front of the demo database; Ctrl-C stops both and removes the cluster{keep}.\n\
         \n    psql \"{url}\"\n    export DATABASE_URL={url}\n\
         \n    admin console:  psql \"{console}\" -c 'SHOW POOLS'\n    Postgres itself: psql \"postgres://demo:demo@127.0.0.1:{pg}/demo\"\n\n",
        port = p.port,
        url = p.url("demo"),
        console = p.url("pgsurge"),
        pg = r.cluster.port,
        keep = if r.cluster.kept { " (its directory is kept)" } else { "" },
    )
}

/// Clients workload 2 may open: each needs a descriptor here, and two when pgsurge runs in this process.
fn client_budget() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("Max open files")).and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok()))
        .unwrap_or(1024);
    (soft.saturating_sub(200) / 2).clamp(10, 1000)
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP, all meaning "stop and clean up".
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())?, hup: signal(SignalKind::hangup())? })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "interrupted",
            _ = self.term.recv() => "terminated",
            _ = self.hup.recv() => "hung up",
        }
    }
}
