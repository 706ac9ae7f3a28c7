//! Parsing of `sqlite://` URLs.

use std::path::PathBuf;
use std::time::Duration;

/// Celery's default `result_expires`: one day.
pub const DEFAULT_RESULT_EXPIRES: Duration = Duration::from_secs(86_400);

/// Where the SQLite file is and how it is used.
#[derive(Debug, Clone, PartialEq)]
pub struct SqliteConfig {
    /// Path of the database file.
    pub path: PathBuf,
    /// How long a fetched message stays invisible to other consumers without a lease renewal.
    pub visibility_timeout: Duration,
    /// The longest pause between polls of an idle queue.
    pub poll_interval: Duration,
    /// How long a stored result is kept (Celery's `result_expires`, default one day); `None`
    /// keeps results forever.
    pub result_expires: Option<Duration>,
    /// The URL as given.
    pub url: String,
}

impl SqliteConfig {
    /// Parse `sqlite://path.db[?visibility_timeout=S&poll_interval=MS&result_expires=S]`
    /// (`result_expires=0` keeps results forever).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("sqlite://").ok_or_else(|| "expected a URL starting with sqlite://".to_string())?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err("no database path (write sqlite://path/to/file.db)".into());
        }
        let mut cfg = SqliteConfig {
            path: PathBuf::from(path),
            visibility_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            result_expires: Some(DEFAULT_RESULT_EXPIRES),
            url: url.to_string(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = value.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0);
            match key {
                "visibility_timeout" => {
                    let secs = number
                        .ok_or_else(|| format!("visibility_timeout={value:?} is not a positive number of seconds"))?;
                    cfg.visibility_timeout = Duration::from_secs_f64(secs);
                }
                "poll_interval" => {
                    let ms = number
                        .ok_or_else(|| format!("poll_interval={value:?} is not a positive number of milliseconds"))?;
                    cfg.poll_interval = Duration::from_secs_f64(ms / 1000.0);
                }
                "result_expires" => {
                    let secs = value.parse::<u64>().map_err(|_| {
                        format!("result_expires={value:?} is not a whole number of seconds (0 = never expire)")
                    })?;
                    cfg.result_expires = (secs > 0).then(|| Duration::from_secs(secs));
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (known: visibility_timeout, poll_interval, result_expires)"
                    ))
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_absolute_and_parameters() {
        assert_eq!(SqliteConfig::from_url("sqlite://a/b.db").unwrap().path, PathBuf::from("a/b.db"));
        assert_eq!(SqliteConfig::from_url("sqlite:///tmp/b.db").unwrap().path, PathBuf::from("/tmp/b.db"));
        let c = SqliteConfig::from_url("sqlite://x.db?visibility_timeout=2.5&poll_interval=10").unwrap();
        assert_eq!(c.visibility_timeout, Duration::from_millis(2500));
        assert_eq!(c.poll_interval, Duration::from_millis(10));
        assert!(SqliteConfig::from_url("sqlite://").is_err());
        assert!(SqliteConfig::from_url("sqlite://x.db?visibility_timeout=-1")
            .unwrap_err()
            .contains("visibility_timeout"));
        assert!(SqliteConfig::from_url("sqlite://x.db?colour=red").unwrap_err().contains("colour"));
        assert_eq!(SqliteConfig::from_url("sqlite://x.db").unwrap().result_expires, Some(DEFAULT_RESULT_EXPIRES));
        assert_eq!(
            SqliteConfig::from_url("sqlite://x.db?result_expires=60").unwrap().result_expires,
            Some(Duration::from_secs(60))
        );
        assert_eq!(SqliteConfig::from_url("sqlite://x.db?result_expires=0").unwrap().result_expires, None);
        assert!(SqliteConfig::from_url("sqlite://x.db?result_expires=soon").unwrap_err().contains("result_expires"));
    }
}
