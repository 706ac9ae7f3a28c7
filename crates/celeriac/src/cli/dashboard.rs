//! `celeriac dashboard` and `worker --dashboard`: the web dashboard
//! ([`crate::dashboard`]) on a loopback address unless told otherwise, read-only unless a token
//! is given.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::{parse_listen, CliError, CliResult};
use crate::connect;
use crate::dashboard::{Dashboard, DashboardConfig};

#[derive(Debug, Args)]
pub(crate) struct DashboardArgs {
    /// Where to serve the dashboard (host:port). It listens on this machine only unless told
    /// otherwise.
    #[arg(long, default_value = "127.0.0.1:5555", value_name = "ADDR")]
    listen: String,
    /// The token actions (revoke, terminate, retry, purge, pool size, rate limit) need, sent by
    /// the page in a header; without one the dashboard is read-only.
    #[arg(long = "auth-token", env = "CELERIAC_DASHBOARD_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Queues to show on RabbitMQ, which cannot list them over AMQP (the queues tasks are seen
    /// on are added), comma-separated.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',', default_value = "celery")]
    queues: Vec<String>,
}

/// Start a dashboard on `addr` beside something else (the worker).
pub(crate) async fn start(
    addr: &str,
    token: Option<String>,
    queues: Vec<String>,
    broker: Arc<dyn celeriac_core::Broker>,
    backend: Arc<dyn celeriac_core::ResultBackend>,
) -> Result<Dashboard, CliError> {
    let listen = parse_listen("--dashboard", addr, "127.0.0.1:5555")?;
    let token = token.filter(|t| !t.is_empty());
    Dashboard::start(DashboardConfig { listen, token, queues }, broker, backend)
        .await
        .map_err(|e| CliError::usage(e.to_string()))
}

pub(crate) async fn run(broker_url: &str, backend_url: Option<&str>, args: DashboardArgs) -> CliResult {
    // An SQLite database that does not exist has nothing to show, and opening it would create
    // it (`celeriac.db` in the current directory when no -b is given).
    if let Some(path) = connect::sqlite_path(broker_url).filter(|p| !p.exists()) {
        return Err(CliError::usage(format!(
            "no SQLite broker database at {}: nothing to show (name the broker with -b/--broker, \
             or start a worker on it first)",
            path.display()
        )));
    }
    // The dashboard logs the broker's loss and return (one line each); lapin's own lines about
    // its connection (an ERROR for each failed try) would say the same again and again.
    super::logging::quiet_lapin();
    // Read-only on an SQLite file: the dashboard writes it only for an action asked for.
    let broker = connect::broker_for_reading(broker_url)?;
    let backend = connect::backend_for_reading(backend_url, broker_url)?;
    let listen = parse_listen("--listen", &args.listen, "127.0.0.1:5555")?;
    let token = args.auth_token.filter(|t| !t.is_empty());
    let dashboard = Dashboard::start(DashboardConfig { listen, token, queues: args.queues }, broker, backend)
        .await
        .map_err(|e| CliError::usage(e.to_string()))?;
    eprintln!("dashboard at http://{}/ (Ctrl-C to stop)", dashboard.addr);
    let _ = wait_for_stop().await;
    drop(dashboard);
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
async fn wait_for_stop() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
