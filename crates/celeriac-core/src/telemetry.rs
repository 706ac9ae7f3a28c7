//! Process-wide counters of transport events that the metrics endpoint reports.
//!
//! Transports and the client count here (one call where the event happens) rather than each
//! exposing counters of its own: the worker's metrics read them at each scrape without knowing
//! which transport is in use.

use std::sync::atomic::{AtomicU64, Ordering};

static BROKER_RECONNECTS: AtomicU64 = AtomicU64::new(0);
static PUBLISH_RETRIES: AtomicU64 = AtomicU64::new(0);

/// A lost broker connection was established again.
pub fn broker_reconnected() {
    BROKER_RECONNECTS.fetch_add(1, Ordering::Relaxed);
}

/// A publish is being retried under the publish retry policy.
pub fn publish_retried() {
    PUBLISH_RETRIES.fetch_add(1, Ordering::Relaxed);
}

/// The counters now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Telemetry {
    /// Broker connections re-established after a loss.
    pub broker_reconnects: u64,
    /// Publishes retried.
    pub publish_retries: u64,
}

/// Read the counters.
pub fn snapshot() -> Telemetry {
    Telemetry {
        broker_reconnects: BROKER_RECONNECTS.load(Ordering::Relaxed),
        publish_retries: PUBLISH_RETRIES.load(Ordering::Relaxed),
    }
}
