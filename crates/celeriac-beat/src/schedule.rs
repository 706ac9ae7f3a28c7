//! The schedule: entries read from a TOML file (or declared in Rust), and when each runs.
//!
//! ```toml
//! timezone = "Europe/Berlin"            # IANA name; default UTC
//! [[entry]]
//! name = "cleanup"                      # unique; the entry's identity
//! task = "celeriac.noop"
//! every = "30s"                         # a duration: 500ms, 30s, 5m, 1h, 1d
//! [[entry]]
//! name = "report"
//! task = "reports.daily"
//! cron = "30 2 * * *"                   # minute hour day-of-month month day-of-week
//! args = [1, "x"]
//! kwargs = { verbose = true }
//! queue = "reports"
//! options = { expires = 3600, priority = 5 }
//! catch_up = "once"                     # after downtime: "once" (default), "all", "skip"
//! ```
//!
//! Times:
//! - `every` runs fall on a grid counted from the Unix epoch (`every = "30s"`: :00 and :30 of
//!   each minute), so every beat computes the same scheduled times, and a run's id (derived from
//!   its schedule's name, entry and scheduled time, [`run_id`]) is the same whichever beat sends
//!   it.
//! - `cron` runs are in the schedule's timezone, computed by the `croner` crate with Vixie cron's
//!   rules for daylight saving time: a time that does not exist on the spring-forward day runs at
//!   the first valid instant after the gap, once; a time that occurs twice on the fall-back day
//!   runs once, at the earlier instant.
//! - [`Entry::due`] gives the runs to send now from the last one sent and the policy after
//!   downtime ([`CatchUp`]): a forward clock jump is downtime too, so it never floods beyond the
//!   policy; a backward jump sends nothing twice (nothing at or before the last run sent).
//!
//! Every error names the file, the entry and the field ([`ScheduleError`]).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};

/// At most this many missed runs are sent for one entry after downtime with `catch_up = "all"`.
pub const MAX_CATCH_UP: usize = 1000;

/// A schedule file that cannot be used: where and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{source_name}: {}{}{reason}", entry.as_ref().map(|e| format!("entry {e:?}: ")).unwrap_or_default(), field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ScheduleError {
    /// The file (or `"App::periodic"` for entries declared in Rust).
    pub source_name: String,
    /// The entry's name (or `#N`, its position, when it has none).
    pub entry: Option<String>,
    /// The field.
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
}

/// What to send after downtime (the beat stopped, or the clock jumped forward) for the runs
/// missed meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// The latest missed run only (the default).
    #[default]
    Once,
    /// Every missed run, oldest first, at most [`MAX_CATCH_UP`].
    All,
    /// None of them: the next run is the next one due after now.
    Skip,
}

/// When an entry runs.
#[derive(Debug, Clone)]
pub enum When {
    /// On a grid of this period counted from the Unix epoch.
    Every(Duration),
    /// At the times of a cron expression, in the schedule's timezone.
    Cron {
        /// The expression as written.
        text: String,
        /// The parsed expression.
        cron: Box<croner::Cron>,
    },
}

/// One periodic task.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Unique; the entry's identity (run ids and last-run records are keyed by it).
    pub name: String,
    /// The task to send.
    pub task: String,
    /// When it runs.
    pub when: When,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// The queue to send to (`None`: the sender's default).
    pub queue: Option<String>,
    /// Seconds after its scheduled time the run expires (message `expires`), if set.
    pub expires: Option<f64>,
    /// The message priority, if set.
    pub priority: Option<u8>,
    /// What to send after downtime.
    pub catch_up: CatchUp,
}

/// A whole schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The timezone of the cron entries.
    pub timezone: Tz,
    /// The entries, in file order.
    pub entries: Vec<Entry>,
}

/// The task id of the run at `scheduled` of entry `entry` of the schedule `schedule` (the beats'
/// `--name`): a UUID (version 5) of the three, so the same run sent twice (across a failover)
/// has the same id, and two schedules with an entry of the same name never share one.
pub fn run_id(schedule: &str, entry: &str, scheduled: DateTime<Utc>) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6ce1_e2ac_b3a7_4c0e_9a52_0c7b_ea70_0001);
    let key = format!("{schedule}/{entry}@{}", scheduled.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    uuid::Uuid::new_v5(&NAMESPACE, key.as_bytes()).to_string()
}

/// Parse a crontab expression: five fields (minute hour day-of-month month day-of-week) or an
/// `@` shorthand (`@daily`, ...), which must fire at some time (`0 0 31 2 *` never does).
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    let fields = text.split_whitespace().count();
    if !text.trim_start().starts_with('@') && fields != 5 {
        return Err(format!(
            "{text:?} has {fields} fields; a cron expression has 5: minute hour day-of-month month day-of-week"
        ));
    }
    let cron = croner::parser::CronParser::builder()
        .build()
        .parse(text)
        .map_err(|e| format!("{text:?} is not a cron expression: {e}"))?;
    let now = Utc::now();
    match cron.find_next_occurrence(&now, false) {
        Ok(next) if next < now + chrono::Duration::days(366 * 30) => Ok(cron),
        _ => Err(format!("{text:?} never fires (no such date)")),
    }
}

/// Parse a duration: a number and a unit, `500ms`, `30s`, `5m`, `1h`, `1d` (fractions allowed:
/// `1.5s`); zero and negative durations are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 5m, 1h, 1d)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h, d)")),
    };
    if !(secs.is_finite() && secs >= 0.001) {
        return Err(format!("{text:?}: a duration must be at least 1ms"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Entry {
    /// An entry running `task` every `period` (at least 1 ms), with no arguments.
    pub fn every(name: impl Into<String>, task: impl Into<String>, period: Duration) -> Self {
        Entry::with(name.into(), task.into(), When::Every(period.max(Duration::from_millis(1))))
    }

    /// An entry running `task` at the times of the crontab expression `expr` (in the schedule's
    /// timezone); the error names the entry and the expression.
    pub fn cron(name: impl Into<String>, task: impl Into<String>, expr: &str) -> Result<Self, ScheduleError> {
        let name = name.into();
        let cron = parse_cron(expr).map_err(|reason| ScheduleError {
            source_name: "App::periodic".into(),
            entry: Some(name.clone()),
            field: Some("cron".into()),
            reason,
        })?;
        Ok(Entry::with(name, task.into(), When::Cron { text: expr.to_string(), cron: Box::new(cron) }))
    }

    fn with(name: String, task: String, when: When) -> Self {
        Entry {
            name,
            task,
            when,
            args: Vec::new(),
            kwargs: Map::new(),
            queue: None,
            expires: None,
            priority: None,
            catch_up: CatchUp::Once,
        }
    }

    /// Add a positional argument.
    pub fn arg(mut self, value: impl Into<Value>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Add a keyword argument.
    pub fn kwarg(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.kwargs.insert(name.into(), value.into());
        self
    }

    /// Send to `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Each run expires `seconds` after its scheduled time.
    pub fn expires(mut self, seconds: f64) -> Self {
        self.expires = Some(seconds);
        self
    }

    /// Send with `priority`.
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// What to send after downtime.
    pub fn catch_up(mut self, policy: CatchUp) -> Self {
        self.catch_up = policy;
        self
    }

    /// The first scheduled time strictly after `after`.
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> DateTime<Utc> {
        match &self.when {
            When::Every(period) => {
                let p = period.as_millis().max(1) as i64;
                let t = after.timestamp_millis();
                let next = (t.div_euclid(p) + 1) * p;
                Utc.timestamp_millis_opt(next).single().unwrap_or(after)
            }
            When::Cron { cron, .. } => cron
                .find_next_occurrence(&after.with_timezone(&tz), false)
                .map(|t| t.with_timezone(&Utc))
                // An expression that never matches again (a date past): far away.
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// The runs to send at `now`, oldest first, given the last run sent (`None`: never; the
    /// entry starts with the next run due after `now`): the scheduled times in `(last, now]`,
    /// kept by the [`CatchUp`] policy when more than one was missed. A `last` in the future (the
    /// clock went back) sends nothing until time passes it. Computed without walking every
    /// missed run, so a year-long jump costs no more than a short one.
    pub fn due(&self, tz: Tz, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let Some(last) = last else { return Vec::new() };
        let first = self.next_after(tz, last);
        if first > now {
            return Vec::new();
        }
        if self.next_after(tz, first) > now {
            // A normal tick: the one run due, whatever the policy.
            return vec![first];
        }
        let latest = self.at_or_before(tz, now).max(first);
        match self.catch_up {
            CatchUp::Skip => Vec::new(),
            CatchUp::Once => vec![latest],
            CatchUp::All => {
                let mut runs = vec![latest];
                while runs.len() < MAX_CATCH_UP {
                    match self.before(tz, runs[runs.len() - 1]) {
                        Some(t) if t >= first => runs.push(t),
                        _ => break,
                    }
                }
                runs.reverse();
                runs
            }
        }
    }

    /// The last scheduled time at or before `t`.
    pub fn at_or_before(&self, tz: Tz, t: DateTime<Utc>) -> DateTime<Utc> {
        match &self.when {
            When::Every(period) => {
                let p = period.as_millis().max(1) as i64;
                Utc.timestamp_millis_opt(t.timestamp_millis().div_euclid(p) * p).single().unwrap_or(t)
            }
            When::Cron { cron, .. } => cron
                .find_previous_occurrence(&t.with_timezone(&tz), true)
                .map(|x| x.with_timezone(&Utc))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }

    /// The last scheduled time strictly before `t`, if any.
    fn before(&self, tz: Tz, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(period) => t.checked_sub_signed(chrono::Duration::from_std(*period).ok()?),
            When::Cron { cron, .. } => {
                cron.find_previous_occurrence(&t.with_timezone(&tz), false).ok().map(|x| x.with_timezone(&Utc))
            }
        }
    }
}

impl Schedule {
    /// Add entries declared elsewhere (in Rust, `App::periodic`): a name already in the schedule
    /// is refused, named.
    pub fn extend(&mut self, entries: &[Entry]) -> Result<(), ScheduleError> {
        let mut names: std::collections::HashSet<String> = self.entries.iter().map(|x| x.name.clone()).collect();
        for e in entries {
            if !names.insert(e.name.clone()) {
                return Err(ScheduleError {
                    source_name: "App::periodic".into(),
                    entry: Some(e.name.clone()),
                    field: Some("name".into()),
                    reason: "an entry of this name is also in the schedule file (names must be unique)".into(),
                });
            }
            self.entries.push(e.clone());
        }
        Ok(())
    }
}

/// A TOML syntax error on one line: `TOML parse error at line L, column C: message` (toml's own
/// text spans several lines, with a drawing of the spot).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// Read a schedule file's text; `source_name` names it in errors.
pub fn parse(text: &str, source_name: &str) -> Result<Schedule, ScheduleError> {
    let err = |entry: Option<String>, field: Option<&str>, reason: String| ScheduleError {
        source_name: source_name.to_string(),
        entry,
        field: field.map(str::to_string),
        reason,
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(None, None, toml_error(text, &e)))?;
    let mut timezone = Tz::UTC;
    let mut raw_entries = Vec::new();
    for (key, value) in table {
        match key.as_str() {
            "timezone" => {
                let name = value.as_str().ok_or_else(|| err(None, Some("timezone"), "expected a string".into()))?;
                timezone = name.parse::<Tz>().map_err(|_| {
                    err(None, Some("timezone"), format!("unknown timezone {name:?} (an IANA name, e.g. Europe/Berlin)"))
                })?;
            }
            "entry" => match value {
                toml::Value::Array(list) => raw_entries = list,
                _ => return Err(err(None, Some("entry"), "expected [[entry]] tables".into())),
            },
            other => return Err(err(None, Some(other), "unknown key (known: timezone, entry)".into())),
        }
    }
    if raw_entries.is_empty() {
        return Err(err(None, None, "no [[entry]]: nothing to schedule".into()));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(raw_entries.len());
    // Names seen so far: a set, as a schedule may have 100,000 entries.
    let mut names = std::collections::HashSet::with_capacity(raw_entries.len());
    for (i, raw) in raw_entries.iter().enumerate() {
        let t = raw.as_table().ok_or_else(|| err(Some(format!("#{}", i + 1)), None, "expected a table".into()))?;
        let label = t.get("name").and_then(|v| v.as_str()).map(str::to_string).unwrap_or_else(|| format!("#{}", i + 1));
        let e = |field: &str, reason: String| err(Some(label.clone()), Some(field), reason);
        let string = |field: &str| -> Result<Option<String>, ScheduleError> {
            match t.get(field) {
                None => Ok(None),
                Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
                Some(other) => Err(e(field, format!("expected a non-empty string, got {other}"))),
            }
        };
        let name = string("name")?.ok_or_else(|| e("name", "missing".into()))?;
        if !names.insert(name.clone()) {
            return Err(e("name", "a second entry with this name (names must be unique)".into()));
        }
        let task = string("task")?.ok_or_else(|| e("task", "missing".into()))?;
        let when = match (string("every")?, string("cron")?) {
            (Some(every), None) => When::Every(parse_duration(&every).map_err(|r| e("every", r))?),
            (None, Some(text)) => {
                let cron = parse_cron(&text).map_err(|r| e("cron", r))?;
                When::Cron { text, cron: Box::new(cron) }
            }
            (Some(_), Some(_)) => return Err(e("every", "give either every or cron, not both".into())),
            (None, None) => return Err(e("every", "missing: give every (a duration) or cron (an expression)".into())),
        };
        let json = |field: &str| -> Result<Option<Value>, ScheduleError> {
            t.get(field).map(|v| serde_json::to_value(v).map_err(|x| e(field, x.to_string()))).transpose()
        };
        let args = match json("args")? {
            None => Vec::new(),
            Some(Value::Array(a)) => a,
            Some(other) => return Err(e("args", format!("expected a list, got {other}"))),
        };
        let kwargs = match json("kwargs")? {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => return Err(e("kwargs", format!("expected a table, got {other}"))),
        };
        let (mut expires, mut priority) = (None, None);
        if let Some(options) = t.get("options") {
            let options = options.as_table().ok_or_else(|| e("options", "expected a table".into()))?;
            for (k, v) in options {
                match k.as_str() {
                    "expires" => {
                        let secs = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
                        expires = Some(
                            secs.filter(|s| *s > 0.0)
                                .ok_or_else(|| e("options.expires", format!("expected seconds > 0, got {v}")))?,
                        );
                    }
                    "priority" => {
                        let p = v.as_integer().filter(|p| (0..=255).contains(p));
                        priority =
                            Some(p.ok_or_else(|| e("options.priority", format!("expected 0-255, got {v}")))? as u8);
                    }
                    other => {
                        return Err(e(&format!("options.{other}"), "unknown option (known: expires, priority)".into()))
                    }
                }
            }
        }
        let catch_up = match string("catch_up")?.as_deref() {
            None | Some("once") => CatchUp::Once,
            Some("all") => CatchUp::All,
            Some("skip") => CatchUp::Skip,
            Some(other) => return Err(e("catch_up", format!("{other:?} (known: once, all, skip)"))),
        };
        for key in t.keys() {
            if !matches!(
                key.as_str(),
                "name" | "task" | "every" | "cron" | "args" | "kwargs" | "queue" | "options" | "catch_up"
            ) {
                return Err(e(
                    key,
                    "unknown key (known: name, task, every, cron, args, kwargs, queue, options, catch_up)".into(),
                ));
            }
        }
        entries.push(Entry { name, task, when, args, kwargs, queue: string("queue")?, expires, priority, catch_up });
    }
    Ok(Schedule { timezone, entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn one(text: &str) -> Result<Schedule, ScheduleError> {
        parse(text, "beat.toml")
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn berlin_daily(cron: &str) -> (Schedule, Entry) {
        let s =
            one(&format!("timezone = \"Europe/Berlin\"\n[[entry]]\nname = \"d\"\ntask = \"t\"\ncron = \"{cron}\"\n"))
                .unwrap();
        let e = s.entries[0].clone();
        (s, e)
    }

    #[test]
    fn the_issue_example_reads() {
        let s = one(r#"
            timezone = "Europe/Berlin"
            [[entry]]
            name = "cleanup"
            task = "celeriac.noop"
            every = "30s"
            [[entry]]
            name = "report"
            task = "reports.daily"
            cron = "30 2 * * *"
            args = [1, "x"]
            kwargs = { verbose = true }
            queue = "reports"
            options = { expires = 3600, priority = 5 }
            catch_up = "once"
        "#)
        .unwrap();
        assert_eq!(s.timezone, chrono_tz::Europe::Berlin);
        assert_eq!(s.entries.len(), 2);
        let r = &s.entries[1];
        assert_eq!(
            (r.args.clone(), r.queue.as_deref(), r.expires, r.priority),
            (vec![1.into(), "x".into()], Some("reports"), Some(3600.0), Some(5))
        );
        assert_eq!(r.kwargs["verbose"], Value::Bool(true));
        assert!(matches!(s.entries[0].when, When::Every(d) if d == Duration::from_secs(30)));
    }

    #[test]
    fn every_bad_input_names_the_file_the_entry_and_the_field() {
        let cases = [
            ("[[entry]]\nname = \"a\"\ntask = \"t\"\ncron = \"61 * * * *\"", "beat.toml: entry \"a\": cron: "),
            ("timezone = \"Mars/Olympus\"\n[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"", "beat.toml: timezone: unknown timezone"),
            ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"5 parsecs\"", "beat.toml: entry \"a\": every: "),
            ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\n[[entry]]\nname = \"a\"\ntask = \"u\"\nevery = \"2s\"", "beat.toml: entry \"a\": name: a second entry"),
            ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\nbogus = 1", "beat.toml: entry \"a\": bogus: unknown key"),
            ("timezone = \"UTC\"", "beat.toml: no [[entry]]"),
            ("[[entry]]\nname = \"a\"\ntask = \"t\"", "beat.toml: entry \"a\": every: missing"),
            ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"0s\"", "beat.toml: entry \"a\": every: "),
            ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\noptions = { retry = true }", "beat.toml: entry \"a\": options.retry: unknown option"),
            ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\ncatch_up = \"sometimes\"", "beat.toml: entry \"a\": catch_up: "),
            ("[[entry]\nname = \"a\"", "beat.toml: TOML parse error at line 1, column 9: "),
        ];
        for (text, want) in cases {
            let got = one(text).unwrap_err().to_string();
            assert!(got.starts_with(want), "{text:?}: {got:?} should start with {want:?}");
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("-1s").is_err() && parse_duration("1w").is_err() && parse_duration("s").is_err());
    }

    #[test]
    fn every_runs_fall_on_a_grid_every_beat_agrees_on() {
        let s = one("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"30s\"").unwrap();
        let e = &s.entries[0];
        assert_eq!(e.next_after(s.timezone, utc("2026-03-29T00:00:10Z")), utc("2026-03-29T00:00:30Z"));
        assert_eq!(e.next_after(s.timezone, utc("2026-03-29T00:00:30Z")), utc("2026-03-29T00:01:00Z"));
        let t = utc("2026-03-29T00:00:30Z");
        assert_eq!(run_id("s", "a", t), run_id("s", "a", t));
        assert_ne!(run_id("s", "a", t), run_id("s", "a", utc("2026-03-29T00:01:00Z")));
        assert_ne!(run_id("s", "a", t), run_id("s", "b", t));
        // Two schedules (beats of different --name) with an entry of the same name.
        assert_ne!(run_id("s", "a", t), run_id("t", "a", t));
        // Cron: five fields or a shorthand, and a time that exists.
        assert!(parse_cron("@daily").is_ok() && parse_cron("30 2 * * *").is_ok());
        assert!(parse_cron("*/10 * * * * *").unwrap_err().contains("has 6 fields"));
        assert!(parse_cron("0 0 31 2 *").unwrap_err().contains("never fires"));
        assert!(parse_cron("0 0 29 2 *").is_ok(), "a leap day fires every fourth year");
    }

    #[test]
    fn spring_forward_runs_a_missing_time_once_at_the_first_valid_instant() {
        // Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        let (s, e) = berlin_daily("30 2 * * *");
        let day_before = e.next_after(s.timezone, utc("2026-03-28T00:00:00Z"));
        assert_eq!(day_before, utc("2026-03-28T01:30:00Z")); // 02:30 CET
        let on_the_day = e.next_after(s.timezone, day_before);
        assert_eq!(on_the_day, utc("2026-03-29T01:00:00Z")); // 03:00 CEST, the first valid instant
        let after = e.next_after(s.timezone, on_the_day);
        assert_eq!(after, utc("2026-03-30T00:30:00Z")); // 02:30 CEST the next day
    }

    #[test]
    fn fall_back_runs_a_repeated_time_once() {
        // Europe/Berlin, 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
        let (s, e) = berlin_daily("30 2 * * *");
        let first = e.next_after(s.timezone, utc("2026-10-24T12:00:00Z"));
        assert_eq!(first, utc("2026-10-25T00:30:00Z")); // 02:30 CEST, the earlier instant
        let next = e.next_after(s.timezone, first);
        assert_eq!(next, utc("2026-10-26T01:30:00Z")); // not 02:30 CET an hour later
        let runs = e.due(s.timezone, Some(utc("2026-10-24T12:00:00Z")), utc("2026-10-25T03:00:00Z"));
        assert_eq!(runs, vec![first]);
    }

    #[test]
    fn catch_up_after_ten_missed_intervals() {
        let text =
            |policy: &str| format!("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\ncatch_up = \"{policy}\"");
        let last = utc("2026-01-01T00:00:00Z");
        let now = utc("2026-01-01T00:00:10.5Z");
        let due = |policy: &str| {
            let s = one(&text(policy)).unwrap();
            s.entries[0].due(s.timezone, Some(last), now)
        };
        assert_eq!(due("once"), vec![utc("2026-01-01T00:00:10Z")]);
        assert_eq!(due("all").len(), 10);
        assert_eq!(due("skip"), Vec::<DateTime<Utc>>::new());
        // A normal tick: one run due, sent whatever the policy.
        let s = one(&text("skip")).unwrap();
        assert_eq!(
            s.entries[0].due(s.timezone, Some(last), utc("2026-01-01T00:00:01.2Z")),
            vec![utc("2026-01-01T00:00:01Z")]
        );
    }

    #[test]
    fn clock_jumps_neither_flood_nor_resend() {
        let s = one("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"").unwrap();
        let e = &s.entries[0];
        let last = utc("2026-01-01T00:00:00Z");
        // Forward by a year: one run (catch_up once), computed without walking every second.
        let started = std::time::Instant::now();
        assert_eq!(e.due(s.timezone, Some(last), utc("2027-01-01T00:00:00.5Z")), vec![utc("2027-01-01T00:00:00Z")]);
        assert!(started.elapsed() < Duration::from_secs(2));
        // Back by an hour: nothing at or before the last run is sent again.
        assert!(e.due(s.timezone, Some(last), utc("2025-12-31T23:00:00Z")).is_empty());
        let _ = Utc.timestamp_opt(0, 0);
    }
}
