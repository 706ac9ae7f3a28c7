//! From URLs to transports: the one place that knows which crate serves which scheme.
//!
//! `sqlite://` is the embedded default; `amqp://` is RabbitMQ; `redis://` is Redis, as a broker
//! (kombu's layout, shared with Python Celery) and as a result backend. `rediss://` (TLS) is
//! refused with a message saying so. `rpc://` (Celery's RPC result backend) needs an `amqp://`
//! broker, whose connection settings it uses; with any other broker it is refused, naming both.
//! Unknown schemes are refused with a message naming them, never silently mapped to something
//! else.
//!
//! As in Celery, a broker never implies a result backend: only the embedded SQLite broker stores
//! results in its own file when no backend is named; with `amqp://` or `redis://` and no
//! `--result-backend`, results are not stored.

use std::sync::Arc;

use celeriac_amqp::{AmqpBroker, RpcBackend};
use celeriac_core::backend::DisabledBackend;
use celeriac_core::{BackendError, Broker, BrokerError, ResultBackend};
use celeriac_redis::{RedisBackend, RedisBroker};
use celeriac_sqlite::{SqliteBackend, SqliteBroker};

/// The broker used when none is configured.
pub const DEFAULT_BROKER_URL: &str = "sqlite://celeriac.db";

/// Why a broker or backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL's scheme is not one celeriac knows.
    #[error("unknown URL scheme in {url:?} (known: {known})")]
    UnknownScheme {
        /// The URL.
        url: String,
        /// The schemes that are known.
        known: &'static str,
    },
    /// The broker could not be opened.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The result backend could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl ConnectError {
    /// Whether the problem is the URL itself (rather than the service behind it).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            ConnectError::UnknownScheme { .. }
                | ConnectError::Broker(BrokerError::BadUrl { .. })
                | ConnectError::Backend(BackendError::BadUrl { .. })
        )
    }
}

fn scheme(url: &str) -> &str {
    url.split_once("://").map(|(s, _)| s).unwrap_or("")
}

/// Open the broker at `url`.
pub fn broker(url: &str) -> Result<Arc<dyn Broker>, ConnectError> {
    match scheme(url) {
        "sqlite" => Ok(Arc::new(SqliteBroker::open(url)?)),
        "amqp" | "amqps" | "pyamqp" => Ok(Arc::new(AmqpBroker::open(url)?)),
        // `rediss://` is refused by the URL parser, with the reason.
        "redis" | "rediss" => Ok(Arc::new(RedisBroker::open(url)?)),
        _ => Err(ConnectError::UnknownScheme { url: redact(url), known: "sqlite://, amqp://, amqps://, redis://" }),
    }
}

/// Open the broker at `url` for a monitor (the dashboard): an SQLite file is opened read-only,
/// and for writing only when something is written (an action asked for); other brokers as
/// [`broker`].
pub fn broker_for_reading(url: &str) -> Result<Arc<dyn Broker>, ConnectError> {
    match scheme(url) {
        "sqlite" => Ok(Arc::new(SqliteBroker::open_read_only(url)?)),
        _ => broker(url),
    }
}

/// Open the result backend as [`backend`] does, for a monitor: an SQLite file read-only until
/// something is stored (see [`broker_for_reading`]).
pub fn backend_for_reading(url: Option<&str>, broker_url: &str) -> Result<Arc<dyn ResultBackend>, ConnectError> {
    // With no URL, an SQLite broker's results are in its own file. A results file no worker
    // has created yet is opened as a worker opens it (created), as before: the dashboard must
    // not refuse to start before the first worker.
    match url.or((scheme(broker_url) == "sqlite").then_some(broker_url)) {
        Some(file) if sqlite_path(file).is_some_and(|p| p.is_file()) => {
            Ok(Arc::new(SqliteBackend::open_read_only(file)?))
        }
        _ => backend(url, broker_url),
    }
}

/// The database file of an `sqlite://` URL (`None` for other schemes or a bad URL).
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    (scheme(url) == "sqlite").then(|| celeriac_sqlite::SqliteConfig::from_url(url).ok()).flatten().map(|c| c.path)
}

/// Open the result backend at `url`; with no URL, an SQLite broker stores results in its own
/// file and other brokers store none.
pub fn backend(url: Option<&str>, broker_url: &str) -> Result<Arc<dyn ResultBackend>, ConnectError> {
    let url = match url {
        Some(u) => u,
        None if scheme(broker_url) == "sqlite" => broker_url,
        None => return Ok(Arc::new(DisabledBackend)),
    };
    match scheme(url) {
        "sqlite" => Ok(Arc::new(SqliteBackend::open(url)?)),
        "disabled" => Ok(Arc::new(DisabledBackend)),
        "redis" | "rediss" => Ok(Arc::new(RedisBackend::open(url)?)),
        "rpc" => match scheme(broker_url) {
            "amqp" | "amqps" | "pyamqp" => Ok(Arc::new(RpcBackend::open(url, broker_url)?)),
            other => Err(BackendError::BadUrl {
                url: redact(url),
                reason: format!(
                    "the rpc:// result backend sends results over an AMQP broker's reply queues, and the broker \
                     {} is {other}://, not amqp://: use redis:// or sqlite:// for results",
                    redact(broker_url)
                ),
            }
            .into()),
        },
        _ => Err(ConnectError::UnknownScheme { url: redact(url), known: "sqlite://, redis://, rpc://, disabled://" }),
    }
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = rest.split_once('/').map(|(a, t)| (a, Some(t))).unwrap_or((rest, None));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    match tail {
        Some(t) => format!("{scheme}://{authority}/{t}"),
        None => format!("{scheme}://{authority}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("amqp://guest:secret@host:5672/vh"), "amqp://guest:***@host:5672/vh");
        assert_eq!(redact("sqlite://a.db"), "sqlite://a.db");
    }

    #[test]
    fn unknown_schemes_are_named() {
        let e = broker("kafka://x").err().unwrap();
        assert!(e.is_configuration());
        assert!(e.to_string().contains("kafka://x"), "{e}");
        assert!(broker("nonsense").err().unwrap().is_configuration());
    }

    #[test]
    fn redis_is_a_broker_and_never_implies_a_backend() {
        let b = broker("redis://:pw@127.0.0.1:6379/5?visibility_timeout=30").unwrap();
        assert_eq!(b.url(), "redis://:***@127.0.0.1:6379/5?visibility_timeout=30");
        assert_eq!(b.max_unacked_hold(), None);
        assert!(!b.delivers_eta_natively());
        let e = broker("rediss://127.0.0.1:6379/5").err().unwrap();
        assert!(e.is_configuration() && e.to_string().contains("TLS"), "{e}");
        let e = broker("redis://127.0.0.1/5?bogus=1").err().unwrap();
        assert!(e.is_configuration() && e.to_string().contains("bogus"), "{e}");
        let none = backend(None, "redis://127.0.0.1:6379/5").unwrap();
        assert!(none.url().starts_with("disabled"), "{}", none.url());
    }

    #[test]
    fn rpc_needs_an_amqp_broker() {
        let rpc = backend(Some("rpc://"), "amqp://guest:guest@127.0.0.1:5672//").unwrap();
        assert_eq!(rpc.url(), "rpc://");
        for broker in ["redis://:pw@127.0.0.1:6379/5", "sqlite://x.db"] {
            let e = backend(Some("rpc://"), broker).err().unwrap();
            assert!(e.is_configuration(), "{e}");
            let text = e.to_string();
            assert!(text.contains("rpc://") && text.contains("not amqp://") && !text.contains("pw"), "{text}");
        }
        let e = backend(Some("rpc://?bogus=1"), "amqp://127.0.0.1//").err().unwrap();
        assert!(e.is_configuration() && e.to_string().contains("bogus"), "{e}");
    }
}
