//! The comparison table: one row per measure, the three figures, the ratios, and the brief's
//! target for the measure with whether celeriac met it (and by how much it missed).

use std::fmt::Write;

/// What the brief asks of a measure.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// No target (shown for context).
    None,
    /// A throughput at least `vs_celery` times Celery's and `vs_bare` times the bare client's.
    Throughput {
        /// Minimum ratio to Celery.
        vs_celery: f64,
        /// Minimum ratio to the bare lapin client.
        vs_bare: f64,
    },
    /// A throughput at least this many times Celery's (where no bare client is measured).
    VsCelery(f64),
    /// At most this value (same unit as the row).
    AtMost(f64),
    /// A time at most Celery's divided by this (celeriac this many times as fast).
    FasterThanCelery(f64),
    /// At most Celery's figure (same unit as the row).
    AtMostCelery,
}

/// How a row's numbers are shown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    /// Messages or tasks per second.
    PerSec,
    /// Milliseconds.
    Ms,
    /// MiB.
    Mib,
    /// Seconds.
    Secs,
}

/// One measure.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub measure: String,
    /// Unit of the figures.
    pub unit: Unit,
    /// celeriac's figure.
    pub celeriac: Option<f64>,
    /// Celery's figure.
    pub celery: Option<f64>,
    /// How Celery's figure is made up (RSS of main plus children), if worth saying.
    pub celery_detail: Option<String>,
    /// The bare lapin client's figure.
    pub bare: Option<f64>,
    /// The brief's target.
    pub target: Target,
}

impl Row {
    /// A row with no figures yet.
    pub fn new(measure: &str, unit: Unit, target: Target) -> Self {
        Row { measure: measure.into(), unit, celeriac: None, celery: None, celery_detail: None, bare: None, target }
    }

    fn cell(&self, v: Option<f64>) -> String {
        match v {
            None => "—".into(),
            Some(v) => match self.unit {
                Unit::PerSec => format!("{}/s", thousands(v)),
                Unit::Ms => format!("{v:.2} ms"),
                Unit::Mib => format!("{v:.1} MiB"),
                Unit::Secs => format!("{v:.2} s"),
            },
        }
    }

    fn ratio(a: Option<f64>, b: Option<f64>) -> String {
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => {
                let r = a / b;
                if r >= 10.0 {
                    format!("{r:.1}×")
                } else {
                    format!("{r:.2}×")
                }
            }
            _ => "—".into(),
        }
    }

    /// The target, and met / missed (by how much).
    pub fn verdict(&self) -> (String, String) {
        match self.target {
            Target::None => ("—".into(), "—".into()),
            Target::Throughput { vs_celery, vs_bare } => {
                let text = format!("≥ {vs_celery:.0}× Celery and ≥ {:.0}% of bare", vs_bare * 100.0);
                let (Some(c), Some(p), Some(b)) = (self.celeriac, self.celery, self.bare) else {
                    return (text, "not measured".into());
                };
                let (rc, rb) = (c / p, c / b);
                let mut missed = Vec::new();
                if rc < vs_celery {
                    missed.push(format!("{rc:.1}× Celery, {:.0}% short", (1.0 - rc / vs_celery) * 100.0));
                }
                if rb < vs_bare {
                    missed.push(format!("{:.0}% of bare, {:.0} points short", rb * 100.0, (vs_bare - rb) * 100.0));
                }
                let verdict = if missed.is_empty() {
                    "**met**".to_string()
                } else {
                    format!("**missed** ({})", missed.join("; "))
                };
                (text, verdict)
            }
            Target::VsCelery(vs_celery) => {
                let text = format!("≥ {vs_celery:.0}× Celery");
                let (Some(c), Some(p)) = (self.celeriac, self.celery) else {
                    return (text, "not measured".into());
                };
                let rc = c / p;
                if rc >= vs_celery {
                    return (text, "**met**".into());
                }
                let short = format!("{rc:.1}× Celery, {:.0}% short", (1.0 - rc / vs_celery) * 100.0);
                // A consumer that does no work at all is the most any worker can drain.
                match self.bare.map(|b| b / p) {
                    Some(ceiling) if ceiling < vs_celery => (
                        text,
                        format!("**missed** ({short}; out of reach here: the bare consumer is {ceiling:.1}× Celery)"),
                    ),
                    _ => (text, format!("**missed** ({short})")),
                }
            }
            Target::FasterThanCelery(times) => {
                let text = format!("≥ {times:.0}× as fast as Celery");
                let (Some(c), Some(p)) = (self.celeriac, self.celery) else {
                    return (text, "not measured".into());
                };
                let speedup = p / c;
                if speedup >= times {
                    (text, format!("**met** ({speedup:.1}×)"))
                } else {
                    let short = format!("{speedup:.1}× as fast, {:.0}% short", (1.0 - speedup / times) * 100.0);
                    // The bare relay, doing no work, is the fastest any worker can be.
                    match self.bare.map(|b| p / b) {
                        Some(ceiling) if ceiling < times => (
                            text,
                            format!("**missed** ({short}; out of reach here: the bare relay is {ceiling:.1}× as fast as Celery)"),
                        ),
                        _ => (text, format!("**missed** ({short})")),
                    }
                }
            }
            Target::AtMostCelery => {
                let text = "≤ Celery".to_string();
                match (self.celeriac, self.celery) {
                    (Some(c), Some(p)) if c <= p => (text, "**met**".into()),
                    (Some(c), Some(p)) => {
                        (text, format!("**missed** by {} ({:.2}× Celery)", self.cell(Some(c - p)), c / p))
                    }
                    _ => (text, "not measured".into()),
                }
            }
            Target::AtMost(limit) => {
                let text = format!("≤ {}", self.cell(Some(limit)));
                match self.celeriac {
                    None => (text, "not measured".into()),
                    Some(v) if v <= limit => (text, "**met**".into()),
                    Some(v) => {
                        (text, format!("**missed** by {} ({:.1}× the limit)", self.cell(Some(v - limit)), v / limit))
                    }
                }
            }
        }
    }
}

/// `12345.6` as `12,346`.
pub fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The Markdown table of all rows.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| measure | celeriac | Celery 5.7 | bare lapin | celeriac / Celery | celeriac / bare | target | result |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let celery = match &r.celery_detail {
            Some(d) => format!("{} ({d})", r.cell(r.celery)),
            None => r.cell(r.celery),
        };
        let (target, verdict) = r.verdict();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.measure,
            r.cell(r.celeriac),
            celery,
            r.cell(r.bare),
            Row::ratio(r.celeriac, r.celery),
            Row::ratio(r.celeriac, r.bare),
            target,
            verdict
        );
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Rows of several runs (same measures in the same order) as one row each, every figure the
/// median of the runs.
pub fn median_rows(runs: &[Vec<Row>]) -> Vec<Row> {
    let Some(first) = runs.first() else { return Vec::new() };
    (0..first.len())
        .map(|i| {
            let mut row = first[i].clone();
            let col = |f: fn(&Row) -> Option<f64>| median(runs.iter().filter_map(|r| r.get(i).and_then(f)).collect());
            row.celeriac = col(|r| r.celeriac);
            row.celery = col(|r| r.celery);
            row.bare = col(|r| r.bare);
            if runs.len() > 1 {
                row.celery_detail = None;
            }
            row
        })
        .collect()
}

/// The lowest and highest figure of each cell over several runs.
pub fn spread_table(runs: &[Vec<Row>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| measure | celeriac | Celery 5.7 | bare lapin |");
    let _ = writeln!(out, "|---|---|---|---|");
    let Some(first) = runs.first() else { return out };
    for (i, row) in first.iter().enumerate() {
        let cell = |f: fn(&Row) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(|r| r.get(i).and_then(f)).collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if v.is_empty() {
                "—".to_string()
            } else {
                format!("{} – {}", row.cell(Some(lo)), row.cell(Some(hi)))
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            row.measure,
            cell(|r| r.celeriac),
            cell(|r| r.celery),
            cell(|r| r.bare)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let mut r = Row::new("drain", Unit::PerSec, Target::Throughput { vs_celery: 10.0, vs_bare: 0.85 });
        (r.celeriac, r.celery, r.bare) = (Some(24_000.0), Some(2_000.0), Some(26_000.0));
        assert_eq!(r.verdict().1, "**met**");
        r.celeriac = Some(13_000.0);
        assert!(r.verdict().1.contains("50% of bare"), "{}", r.verdict().1);
        let mut r = Row::new("p50", Unit::Ms, Target::AtMost(0.5));
        r.celeriac = Some(0.75);
        assert_eq!(r.verdict().1, "**missed** by 0.25 ms (1.5× the limit)");
        let mut r = Row::new("prefork", Unit::PerSec, Target::VsCelery(10.0));
        (r.celeriac, r.celery) = (Some(15_000.0), Some(3_000.0));
        assert_eq!(r.verdict().1, "**missed** (5.0× Celery, 50% short)");
        r.bare = Some(25_000.0);
        assert!(r.verdict().1.ends_with("out of reach here: the bare consumer is 8.3× Celery)"), "{}", r.verdict().1);
        r.bare = Some(35_000.0);
        assert_eq!(r.verdict().1, "**missed** (5.0× Celery, 50% short)");
        let mut r = Row::new("chord", Unit::Secs, Target::FasterThanCelery(10.0));
        (r.celeriac, r.celery) = (Some(2.0), Some(30.0));
        assert_eq!(r.verdict().1, "**met** (15.0×)");
        r.celeriac = Some(6.0);
        assert_eq!(r.verdict().1, "**missed** (5.0× as fast, 50% short)");
        r.bare = Some(4.0);
        assert!(
            r.verdict().1.ends_with("out of reach here: the bare relay is 7.5× as fast as Celery)"),
            "{}",
            r.verdict().1
        );
        let mut r = Row::new("child RSS", Unit::Mib, Target::AtMostCelery);
        (r.celeriac, r.celery) = (Some(30.0), Some(40.0));
        assert_eq!(r.verdict().1, "**met**");
        r.celeriac = Some(50.0);
        assert_eq!(r.verdict().1, "**missed** by 10.0 MiB (1.25× Celery)");
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }

    #[test]
    fn medians_of_runs() {
        let run = |v: f64| {
            let mut r = Row::new("m", Unit::PerSec, Target::None);
            (r.celeriac, r.bare) = (Some(v), None);
            vec![r]
        };
        let rows = median_rows(&[run(3.0), run(1.0), run(2.0)]);
        assert_eq!((rows[0].celeriac, rows[0].bare), (Some(2.0), None));
        assert!(spread_table(&[run(3.0), run(1.0)]).contains("1/s – 3/s"));
    }
}
