//! Parsing of `amqp://` and `amqps://` URLs, Celery's way.
//!
//! `amqp://user:password@host:port/vhost?params`. As in Celery, an empty path or `//` means the
//! vhost `/`; other vhosts are percent-decoded. Defaults: `guest:guest`, port 5672 (5671 for
//! `amqps`). Query parameters:
//! - `heartbeat=SECONDS` (default 60, 0 disables),
//! - `connect_timeout=SECONDS` (TCP connect plus AMQP handshake, default 4),
//! - `queue_type=classic|quorum` (default classic; quorum queues carry `x-queue-type: quorum`),
//! - `max_priority=N` (declare queues with `x-max-priority`, as Celery's
//!   `task_queue_max_priority`).

use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

/// The largest AMQP frame celeriac negotiates (py-amqp's and RabbitMQ's default, 128 KiB).
pub const FRAME_MAX: u32 = 131_072;

/// A parsed AMQP URL.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpConfig {
    /// The URL with the password redacted.
    pub redacted: String,
    /// The URI handed to lapin (vhost percent-encoded, heartbeat set).
    pub lapin_uri: String,
    /// Host and port, for messages.
    pub host: String,
    /// The vhost.
    pub vhost: String,
    /// TCP connect plus handshake timeout.
    pub connect_timeout: Duration,
    /// Heartbeat interval in seconds (0: off).
    pub heartbeat: u16,
    /// Declare quorum queues.
    pub quorum: bool,
    /// `x-max-priority` for declared queues.
    pub max_priority: Option<u8>,
}

impl AmqpConfig {
    /// Parse an AMQP URL.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or("expected amqp://host[:port]/vhost")?;
        let tls = match scheme {
            "amqp" | "pyamqp" => false,
            "amqps" => true,
            other => return Err(format!("unknown scheme {other:?} (expected amqp or amqps)")),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                (decode(user)?, decode(pass)?)
            }
            None => ("guest".to_string(), "guest".to_string()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("port {p:?} is not a number"))?),
            None => (hostport, if tls { 5671 } else { 5672 }),
        };
        let host = if host.is_empty() { "localhost" } else { host };
        let vhost = match path {
            "" | "/" => "/".to_string(),
            p => decode(p)?,
        };
        let mut cfg = AmqpConfig {
            redacted: String::new(),
            lapin_uri: String::new(),
            host: format!("{host}:{port}"),
            vhost: vhost.clone(),
            connect_timeout: Duration::from_secs(4),
            heartbeat: 60,
            quorum: false,
            max_priority: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "heartbeat" => {
                    cfg.heartbeat = v.parse().map_err(|_| format!("heartbeat={v:?} is not a number of seconds"))?
                }
                "connect_timeout" => {
                    let secs = v
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .ok_or_else(|| format!("connect_timeout={v:?} is not a positive number of seconds"))?;
                    cfg.connect_timeout = Duration::from_secs_f64(secs);
                }
                "queue_type" => {
                    cfg.quorum = match v {
                        "classic" => false,
                        "quorum" => true,
                        _ => return Err(format!("queue_type={v:?} (expected classic or quorum)")),
                    }
                }
                "max_priority" => {
                    cfg.max_priority =
                        Some(v.parse().map_err(|_| format!("max_priority={v:?} is not a number from 0 to 255"))?)
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (known: heartbeat, connect_timeout, queue_type, max_priority)"
                    ))
                }
            }
        }
        let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let scheme = if tls { "amqps" } else { "amqp" };
        // frame_max: what py-amqp asks for, and RabbitMQ's default. Asking (rather than taking the
        // server's value) also lets lapin allocate its two 32-frame I/O buffers per connection
        // lazily, once, instead of growing and zero-filling them after the handshake.
        cfg.lapin_uri = format!(
            "{scheme}://{}:{}@{host}:{port}/{}?heartbeat={}&frame_max={FRAME_MAX}",
            enc(&user),
            enc(&password),
            enc(&vhost),
            cfg.heartbeat
        );
        let shown_vhost = if vhost == "/" { "/".to_string() } else { format!("/{}", enc(&vhost)) };
        cfg.redacted = format!("{scheme}://{user}:***@{host}:{port}{shown_vhost}");
        Ok(cfg)
    }
}

fn decode(s: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{s:?} is not valid UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_style_urls() {
        let c = AmqpConfig::from_url("amqp://guest:secret@127.0.0.1:5672//").unwrap();
        assert_eq!(c.vhost, "/");
        assert_eq!(c.redacted, "amqp://guest:***@127.0.0.1:5672/");
        assert_eq!(c.lapin_uri, "amqp://guest:secret@127.0.0.1:5672/%2F?heartbeat=60&frame_max=131072");
        let c = AmqpConfig::from_url("amqp://u:p@h/my%2Fvhost?heartbeat=0&queue_type=quorum&max_priority=10").unwrap();
        assert_eq!((c.vhost.as_str(), c.heartbeat, c.quorum, c.max_priority), ("my/vhost", 0, true, Some(10)));
        assert_eq!(AmqpConfig::from_url("amqp://localhost").unwrap().host, "localhost:5672");
        assert_eq!(AmqpConfig::from_url("amqps://h").unwrap().host, "h:5671");
    }

    #[test]
    fn bad_urls_are_named() {
        assert!(AmqpConfig::from_url("amqp://h:port/").unwrap_err().contains("port"));
        assert!(AmqpConfig::from_url("amqp://h/?colour=red").unwrap_err().contains("colour"));
        assert!(AmqpConfig::from_url("amqp://h/?queue_type=lazy").unwrap_err().contains("queue_type"));
        assert!(AmqpConfig::from_url("amqp://h/?connect_timeout=0").unwrap_err().contains("connect_timeout"));
    }
}
