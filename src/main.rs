//! The pgsurge binary: parse flags, load config, start logging and the runtime, wire signals, call `run`.

use std::process::ExitCode;

use clap::Parser;
use pgsurge::config::{Config, LogFormat, Settings};
use pgsurge::{App, Shutdown};

fn main() -> ExitCode {
    let cli = Settings::parse();
    let config = match Config::load(cli.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgsurge: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSURGE_LOG").unwrap_or_else(|_| "info".into());
    match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.workers > 0 {
        rt.worker_threads(config.workers);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgsurge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsurge: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Settings, config: Config) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    let app = App::new(config);
    tokio::spawn(signals(app.clone(), cli));
    pgsurge::run(app, listener).await
}

/// SIGTERM drains, SIGINT stops now, SIGHUP reloads the config.
async fn signals(app: std::sync::Arc<App>, cli: Settings) {
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
                app.shutdown.send_replace(Shutdown::Immediate);
            }
            _ = hup.recv() => match Config::load(cli.clone()) {
                Ok(c) => {
                    for note in app.reload(c) {
                        tracing::warn!("{note}");
                    }
                    tracing::info!("configuration reloaded");
                }
                Err(e) => tracing::error!(error = %e, "reload refused; the running configuration stays"),
            },
        }
    }
}
