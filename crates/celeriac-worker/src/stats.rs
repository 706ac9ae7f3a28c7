//! Counters of what a worker did, readable while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries taken from the broker.
    pub received: AtomicU64,
    /// Tasks that ended SUCCESS.
    pub succeeded: AtomicU64,
    /// Tasks that ended FAILURE.
    pub failed: AtomicU64,
    /// Retries scheduled.
    pub retried: AtomicU64,
    /// Tasks revoked (expired).
    pub revoked: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Deliveries put back in their queue (shutdown, storage errors).
    pub requeued: AtomicU64,
    /// Ready deliveries given back unstarted because every slot stayed busy (see
    /// [`crate::prefetch`]), so that an idle worker could take them.
    pub released: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Deliveries taken from the broker.
    pub received: u64,
    /// Tasks that ended SUCCESS.
    pub succeeded: u64,
    /// Tasks that ended FAILURE.
    pub failed: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Tasks revoked (expired).
    pub revoked: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Deliveries put back.
    pub requeued: u64,
    /// Ready deliveries given back unstarted for other workers.
    pub released: u64,
}

impl Stats {
    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Read every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: r(&self.received),
            succeeded: r(&self.succeeded),
            failed: r(&self.failed),
            retried: r(&self.retried),
            revoked: r(&self.revoked),
            dead_lettered: r(&self.dead_lettered),
            requeued: r(&self.requeued),
            released: r(&self.released),
        }
    }
}
