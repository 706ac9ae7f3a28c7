//! celeriac beat: periodic tasks sent on schedule, by one leader among any number of beats.
//!
//! - [`schedule`]: the entries (TOML file or Rust), when each runs (fixed grid for `every`,
//!   cron in the schedule's timezone with Vixie cron's daylight-saving rules), the runs due after
//!   downtime, and each run's id (from the entry and its scheduled time).
//!
//! Work in progress (issue 14): the leader lease through the broker, the send loop, `celeriac
//! beat` and `worker -B` come next.
#![deny(missing_docs)]

pub mod schedule;

pub use schedule::{parse, run_id, CatchUp, Entry, Schedule, ScheduleError, When};
