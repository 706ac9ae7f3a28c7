//! Revokes that outlive a restart and reach every worker of the fleet.
//!
//! Celery keeps revoked ids in each worker's memory (and on disk only with `--statedb`), so a
//! countdown task revoked before a restart runs after it. Here every revoke a worker hears is also
//! recorded in the result backend ([`ResultBackend::record_revokes`], with its time; kept
//! Celery's three hours, 50,000 ids at most), and a worker loads the recorded ids when it starts,
//! before it runs anything. The in-memory set ([`crate::state::WorkerState`]) stays the only thing
//! the task path reads, so checking a task costs no round trip; it is kept current by broadcasts
//! and by reading what was recorded since the last look every [`REFRESH`] (a revoke recorded by
//! `celeriac control revoke` with no worker online, or by another worker while this one was
//! reconnecting its broadcast subscription).
//!
//! A backend that keeps nothing (`disabled://`, or none named with an AMQP or Redis broker)
//! leaves revokes in memory only, as Celery without `--statedb`; the worker says so at start.
//!
//! [`ResultBackend::record_revokes`]: celeriac_core::ResultBackend::record_revokes

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::backend::unix_now;

use crate::Shared;

/// How often a worker reads the revokes recorded since its last look.
pub const REFRESH: Duration = Duration::from_secs(10);

/// A read looks this far before the previous one, for revokes recorded by clocks a little behind.
const CLOCK_SLACK: f64 = 60.0;

/// Record revoked ids where the fleet and the next start see them (best effort: a failure is
/// logged, and the ids stay revoked in this worker's memory).
pub(crate) async fn record(shared: &Shared, ids: &[String]) {
    if !shared.backend.keeps_revokes() {
        return;
    }
    if let Err(e) = shared.backend.record_revokes(ids, unix_now()).await {
        tracing::warn!(ids = %ids.join(", "), error = %e, "could not record the revoke in the result backend; only this worker remembers it");
    }
}

/// Load the revokes recorded in the result backend into the worker's state, then keep reading
/// what is recorded since, every [`REFRESH`], until the returned task is aborted. Returns `None`
/// for a backend that keeps no revokes (logged).
pub(crate) async fn load_and_follow(shared: Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    if !shared.backend.keeps_revokes() {
        tracing::warn!(
            backend = %shared.backend.url(),
            "revoked task ids are kept in this worker's memory only: a restart forgets them and \
             other workers learn them only from the broadcast (name a redis:// or sqlite:// result \
             backend to keep them)"
        );
        return None;
    }
    let mut since = match read(&shared, 0.0).await {
        Some((n, read_at)) => {
            tracing::info!(revoked = n, backend = %shared.backend.url(), "revoked task ids loaded");
            Some(read_at)
        }
        None => None,
    };
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let from = since.map_or(0.0, |t| t - CLOCK_SLACK);
            if let Some((n, read_at)) = read(&shared, from).await {
                if since.is_none() {
                    tracing::info!(revoked = n, backend = %shared.backend.url(), "revoked task ids loaded");
                }
                since = Some(read_at);
            }
        }
    }))
}

/// Read the revokes recorded since `from` into the state; returns how many were read and when
/// the read started, or `None` after logging a failure.
async fn read(shared: &Shared, from: f64) -> Option<(usize, f64)> {
    let read_at = unix_now();
    match shared.backend.revokes_since(from).await {
        Ok(revokes) => {
            let added = shared.state.revoke_recorded(&revokes, read_at);
            if added > 0 && from > 0.0 {
                tracing::info!(revoked = added, "revoked task ids learnt from the result backend");
            }
            Some((revokes.len(), read_at))
        }
        Err(e) => {
            tracing::warn!(error = %e, retry_in = ?REFRESH, "cannot read the revoked task ids from the result backend");
            None
        }
    }
}
