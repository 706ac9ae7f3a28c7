//! Beat's Prometheus metrics: runs sent per entry, leadership changes, whether this beat leads.
//!
//! ```text
//! celeriac_beat_runs_sent_total{entry="report"} 12
//! celeriac_beat_leadership_changes_total 3
//! celeriac_beat_leader 1
//! ```

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::beat::Event;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EntryLabel {
    entry: String,
}

/// A beat's metrics, fed with its [`Event`]s.
pub struct BeatMetrics {
    registry: Mutex<Registry>,
    sent: Family<EntryLabel, Counter>,
    changes: Counter,
    leader: Gauge,
}

impl Default for BeatMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("celeriac_beat");
        let sent = Family::<EntryLabel, Counter>::default();
        registry.register("runs_sent", "Runs sent by this beat, by entry", sent.clone());
        let changes = Counter::default();
        registry.register("leadership_changes", "Times this beat became or stopped being the leader", changes.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this beat is the leader", leader.clone());
        BeatMetrics { registry: Mutex::new(registry), sent, changes, leader }
    }
}

impl BeatMetrics {
    /// Count what a beat did.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::Leader => {
                self.changes.inc();
                self.leader.set(1);
            }
            Event::Follower => {
                self.changes.inc();
                self.leader.set(0);
            }
            Event::Sent { entry, .. } => {
                self.sent.get_or_create(&EntryLabel { entry: entry.clone() }).inc();
            }
        }
    }

    /// The metrics in Prometheus' text format (OpenMetrics, ending with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        self.encode_into(&mut out);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }

    /// The metrics' lines without the closing `# EOF`, appended to `out`: for a process that
    /// serves them among its own (a worker running a beat, `worker -B`).
    pub fn encode_into(&self, out: &mut String) {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode_registry(out, &registry) {
            tracing::warn!(error = %e, "cannot encode beat's metrics");
        }
    }
}
