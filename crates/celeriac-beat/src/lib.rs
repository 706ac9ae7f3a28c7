//! celeriac beat: periodic tasks sent on schedule, by one leader among any number of beats.
//!
//! - [`schedule`]: the entries (TOML file or Rust), when each runs (fixed grid for `every`,
//!   cron in the schedule's timezone with Vixie cron's daylight-saving rules), the runs due after
//!   downtime, and each run's id (from the entry and its scheduled time).
//!
//! - [`beat`]: the loop: the leader lease through the broker ([`celeriac_core::Broker::lease`]),
//!   the last runs kept in the broker, each due run sent once with its id.
//!
//! - [`clock`]: the time beat reads and waits on: the system's, or a test's moved by hand.
//!
//! - [`metrics`]: runs sent per entry, leadership changes, whether this beat leads.
#![deny(missing_docs)]

pub mod beat;
pub mod clock;
pub mod metrics;
pub mod schedule;

pub use beat::{Beat, BeatConfig, BeatError, Event, Record};
pub use clock::{Clock, ManualClock, SystemClock};

pub use schedule::{parse, run_id, CatchUp, Entry, Schedule, ScheduleError, When};
