//! Parsing of `redis://` URLs, shared by the result backend (and the broker to come).
//!
//! `redis://[[user]:password@]host[:port][/db][?param=value&...]`, as Celery and redis-py write
//! them: the host defaults to `localhost`, the port to 6379 and the database to 0; the user and
//! password are percent-decoded. [`RedisUrl::parse`] reads the parts every Redis transport shares
//! (where to connect, how long to wait) and hands the remaining query parameters to the caller,
//! which accepts its own and rejects the rest by name.
//!
//! Parameters understood here:
//! - `connect_timeout` (alias `socket_connect_timeout`, redis-py's name): seconds allowed for
//!   connecting, handshake included; default 5.
//! - `command_timeout` (alias `socket_timeout`): seconds allowed for the answer to one command;
//!   default 10.
//!
//! `rediss://` (TLS) is recognised but refused: this build has no TLS support.

use std::fmt;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

/// The default time allowed for connecting (TCP connect plus the Redis handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default time allowed for the answer to one command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a Redis server is and how to talk to it, read from a `redis://` URL.
#[derive(Clone, PartialEq)]
pub struct RedisUrl {
    /// Host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Database number (`SELECT`ed on connect).
    pub db: i64,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password, if any (never shown by `Debug`).
    pub password: Option<String>,
    /// Time allowed for connecting, handshake included.
    pub connect_timeout: Duration,
    /// Time allowed for the answer to one command.
    pub command_timeout: Duration,
    /// Query parameters not consumed here, in order, for the transport to interpret.
    pub params: Vec<(String, String)>,
    /// The URL as given, with the password replaced by `***`.
    pub redacted: String,
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("params", &self.params)
            .field("redacted", &self.redacted)
            .finish()
    }
}

impl RedisUrl {
    /// Parse a `redis://` URL. The error says what is wrong; callers wrap it in their `BadUrl`
    /// together with [`redact`]ed URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| "expected a URL starting with redis://".to_string())?;
        match scheme {
            "redis" => {}
            "rediss" => {
                return Err("TLS (rediss://) is not built into celeriac's Redis transport; use redis:// \
                            (through a TLS tunnel such as stunnel if the server needs TLS)"
                    .into())
            }
            other => return Err(format!("unsupported scheme {other:?} (expected redis://)")),
        }
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        if before_query.contains('#') || query.contains('#') {
            return Err("a fragment (#...) is not allowed (percent-encode '#' in a password as %23)".into());
        }
        let (authority, path) = match before_query.find('/') {
            Some(i) => before_query.split_at(i),
            None => (before_query, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, pass) = match info.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (info, None),
                };
                let user = percent_decode(user).map_err(|e| format!("user name: {e}"))?;
                let pass = pass.map(percent_decode).transpose().map_err(|e| format!("password: {e}"))?;
                (Some(user).filter(|u| !u.is_empty()), pass.filter(|p| !p.is_empty()))
            }
        };
        let (host, port) = parse_host_port(hostport)?;
        let db = match path.trim_start_matches('/') {
            "" => 0,
            db => db
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("database {db:?} is not a number (write redis://host:port/0)"))?,
        };
        let mut parsed = RedisUrl {
            host,
            port,
            db,
            username,
            password,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            params: Vec::new(),
            redacted: redact(url),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "connect_timeout" | "socket_connect_timeout" => parsed.connect_timeout = seconds(key, value)?,
                "command_timeout" | "socket_timeout" => parsed.command_timeout = seconds(key, value)?,
                _ => parsed.params.push((key.to_string(), value.to_string())),
            }
        }
        Ok(parsed)
    }

    /// The redis crate's connection settings for this URL.
    pub fn connection_info(&self) -> Result<ConnectionInfo, String> {
        let mut redis = RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &self.password {
            redis = redis.set_password(password);
        }
        let info =
            ConnectionAddr::Tcp(self.host.clone(), self.port).into_connection_info().map_err(|e| e.to_string())?;
        Ok(info.set_redis_settings(redis).set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
    }
}

/// `host[:port]`, `[v6addr][:port]`, or nothing (localhost:6379).
fn parse_host_port(hostport: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(|| format!("unclosed '[' in the host {hostport:?}"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| format!("unexpected {p:?} after the address [{addr}]"))?),
        };
        (addr, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.contains(':') && !hostport.starts_with('[') {
        return Err(format!("host {hostport:?}: write an IPv6 address in brackets, e.g. redis://[::1]:6379"));
    }
    let port = match port {
        None | Some("") => 6379,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("port {p:?} is not a number between 1 and 65535"))?,
    };
    let host = if host.is_empty() { "localhost".to_string() } else { host.to_string() };
    Ok((host, port))
}

/// A positive number of seconds.
fn seconds(key: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{key}={value:?} is not a positive number of seconds"))
}

/// Decode `%XX` escapes (a `+` stays a `+`, as in a URL's user info).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| format!("bad percent escape at byte {i}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes do not decode to UTF-8".to_string())
}

/// The URL with its password (if any) replaced by `***`: `redis://:***@host:6379/0`. Works on
/// any text, parsable or not, so it can be used in error messages about bad URLs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some(at) = authority.rfind('@') else { return url.to_string() };
    let (userinfo, hostport) = (&authority[..at], &authority[at + 1..]);
    match userinfo.split_once(':') {
        Some((user, pass)) if !pass.is_empty() => format!("{scheme}://{user}:***@{hostport}{tail}"),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_parts() {
        let u = RedisUrl::parse("redis://").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("localhost", 6379, 0));
        assert_eq!((u.connect_timeout, u.command_timeout), (DEFAULT_CONNECT_TIMEOUT, DEFAULT_COMMAND_TIMEOUT));
        let u = RedisUrl::parse("redis://user:p%40ss%3Aw@10.0.0.1:6380/3?connect_timeout=0.5&x=1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("10.0.0.1", 6380, 3));
        assert_eq!(u.username.as_deref(), Some("user"));
        assert_eq!(u.password.as_deref(), Some("p@ss:w"));
        assert_eq!(u.connect_timeout, Duration::from_millis(500));
        assert_eq!(u.params, vec![("x".to_string(), "1".to_string())]);
        assert_eq!(u.redacted, "redis://user:***@10.0.0.1:6380/3?connect_timeout=0.5&x=1");
        assert!(!format!("{u:?}").contains("p@ss"));
        let u = RedisUrl::parse("redis://:secret@h/").unwrap();
        assert_eq!((u.username, u.password.as_deref(), u.db), (None, Some("secret"), 0));
        let u = RedisUrl::parse("redis://[::1]:7000/2?socket_timeout=3").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db, u.command_timeout), ("::1", 7000, 2, Duration::from_secs(3)));
        assert!(u.connection_info().is_ok());
    }

    #[test]
    fn bad_urls_name_the_problem() {
        let err = |u: &str| RedisUrl::parse(u).unwrap_err();
        assert!(err("redis://host:notaport").contains("notaport"));
        assert!(err("redis://host:0").contains("port"));
        assert!(err("redis://host/x").contains("database"));
        assert!(err("rediss://host").contains("TLS"));
        assert!(err("http://host").contains("scheme"));
        assert!(err("host:6379").contains("redis://"));
        assert!(err("redis://::1/0").contains("brackets"));
        assert!(err("redis://h?connect_timeout=0").contains("connect_timeout"));
        assert!(err("redis://:pa%zzss@h").contains("password"));
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact("redis://u@h"), "redis://u@h");
        assert_eq!(redact("redis://:p@w@h:notaport"), "redis://:***@h:notaport");
        assert_eq!(redact("nonsense"), "nonsense");
    }
}
