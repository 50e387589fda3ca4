//! The pgsurge binary: parse flags, load config, start logging, its own session and the runtime, wire signals,
//! call `run`.

#[cfg(feature = "demo")]
mod demo;

use std::process::ExitCode;
use std::time::Duration;

// The allocator (a build choice, see Cargo.toml's features): one that returns freed memory to the system, so RSS
// falls back after a crowd of clients leaves.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use pgsurge::config::{Command, Config, LogFormat, Settings};
use pgsurge::{App, Shutdown};

fn main() -> ExitCode {
    let cli = Settings::parse();
    // The demo brings its own Postgres and pgsurge: no --upstream, no config file.
    match cli.command {
        Some(Command::Demo(args)) => return run_demo(args),
        Some(Command::InstallTriggers(args)) => return install_triggers(args),
        None => {}
    }
    let config = match Config::load(cli.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgsurge: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSURGE_LOG").unwrap_or_else(|_| "info".into());
    // Logs go to stderr, and to `logfile` too when one is set; colours only when a person is watching stderr.
    let logfile = match config.logfile.as_ref().map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)) {
        None => None,
        Some(Ok(f)) => Some(std::sync::Arc::new(f)),
        Some(Err(e)) => {
            eprintln!("pgsurge: logfile {}: {e}", config.logfile.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
            return ExitCode::from(2);
        }
    };
    let ansi = logfile.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = pgsurge::standin::LogWriter::new(logfile);
    match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(writer).init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer).init(),
    }
    for note in &config.ignored {
        tracing::warn!("pgbouncer.ini key ignored: {note}");
    }
    if let Some(p) = &config.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            eprintln!("pgsurge: pidfile {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    pgsurge::process::check_open_files(&config);
    if config.own_session {
        match pgsurge::process::start_own_session() {
            pgsurge::process::Placement::Failed(e) => tracing::warn!(error = %e, "could not start a session of its own (own_session)"),
            p => tracing::debug!(placement = ?p, "own_session"),
        }
    }
    // One worker: the current-thread scheduler (no work-stealing queues, no cross-thread wakeups to pay for).
    let workers = worker_threads(config.workers);
    let mut rt = if workers == 1 { tokio::runtime::Builder::new_current_thread() } else { tokio::runtime::Builder::new_multi_thread() };
    if workers > 1 {
        rt.worker_threads(workers);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgsurge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pidfile = config.pidfile.clone();
    let result = rt.block_on(serve(cli, config));
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsurge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pgsurge install-triggers`: one connection, the triggers, a line saying what was done.
fn install_triggers(args: pgsurge::cache::triggers::TriggerArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgsurge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(pgsurge::cache::triggers::run(&args)) {
        Ok(r) if args.drop => {
            println!(
                "pgsurge: removed the invalidation triggers of {} tables{}",
                r.tables,
                if r.event_trigger { " and the event trigger" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!("pgsurge: invalidation triggers on {} tables, channel {}", r.tables, args.channel);
            for (table, why) in &r.skipped {
                println!("pgsurge: skipped {table}: {why}");
            }
            if r.event_trigger {
                println!("pgsurge: tables created later get their trigger from the event trigger pgsurge_new_tables");
            } else {
                println!("pgsurge: not a superuser, so no event trigger: run install-triggers again after creating tables");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgsurge: install-triggers: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "demo")]
fn run_demo(args: pgsurge::config::DemoArgs) -> ExitCode {
    demo::run(args)
}

#[cfg(not(feature = "demo"))]
fn run_demo(_: pgsurge::config::DemoArgs) -> ExitCode {
    eprintln!("pgsurge: this build has no demo (it was built without the `demo` feature)");
    ExitCode::from(2)
}

/// `workers = 0` (the default): one worker on up to 2 cores, else half the cores. A sidecar shares its cores with
/// the app (and on small hosts with Postgres and the load): measured on 2 cores, one worker spends ~17 µs of CPU
/// per forwarded transaction against ~21 µs for two (cross-thread wakeups), at the same throughput.
fn worker_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cores <= 2 {
        1
    } else {
        cores / 2
    }
}

async fn serve(cli: Settings, config: Config) -> std::io::Result<()> {
    let unix_path = config.unix_socket_path();
    if cli.reboot == Some(true) {
        if let Some(p) = &unix_path {
            pgsurge::standin::take_over(p, config.shutdown_timeout).await;
        }
    }
    let listener = pgsurge::standin::bind_tcp(&config.listen, unix_path.is_some()).await?;
    let unix = match unix_path {
        Some(p) => {
            let wait = if cli.reboot == Some(true) { config.shutdown_timeout } else { Duration::ZERO };
            Some((pgsurge::frontend::unix::bind_retrying(&p, wait).await?, p))
        }
        None => None,
    };
    let admin = match &config.admin_listen {
        Some(a) => {
            Some(tokio::net::TcpListener::bind(a).await.map_err(|e| std::io::Error::new(e.kind(), format!("admin_listen {a}: {e}")))?)
        }
        None => None,
    };
    let app = App::new(config);
    app.set_settings(cli);
    tokio::spawn(signals(app.clone()));
    pgsurge::serve_with_unix(app, listener, admin, unix).await
}

/// SIGTERM drains, SIGINT stops now, SIGHUP reloads the config.
async fn signals(app: std::sync::Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining; in-flight transactions may finish");
                app.shutdown.send_replace(Shutdown::Draining);
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: fast shutdown");
                app.shutdown_now();
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                if let Err(e) = app.reload_from_settings() {
                    tracing::error!(error = %e, "reload refused; the running configuration stays");
                }
            }
        }
    }
}
