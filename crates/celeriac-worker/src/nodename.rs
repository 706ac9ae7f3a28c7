//! Worker node names (`name@host`), with Celery's `%` expansions.
//!
//! `-n/--hostname` takes a template as Celery's `celery worker -n` does
//! (`celery/utils/nodenames.py`): a name without `@` gets `@<host name>` appended, then
//! - `%h`: the full host name (`web1.example.com`),
//! - `%n`: its first label (`web1`),
//! - `%d`: its domain (`example.com`, empty when there is none),
//! - `%i`: the pool process index (`0` in the worker process, the only process that has a node
//!   name: children do not talk to the broker),
//! - `%I`: the same with a `-` prefix, empty for index 0 (so always empty here),
//! - `%%`: a literal `%`.
//!
//! Any other `%x` is refused with the template in the message (Celery raises `ValueError` too).
//! The default is `celeriac@%h`.

/// The template used when no `-n` is given.
pub const DEFAULT_NODENAME: &str = "celeriac@%h";

/// A `-n/--hostname` template that cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodenameError {
    /// `%x` with an `x` that is not one of `h n d i I %`.
    #[error("unknown format key %{key} in node name {template:?} (known: %h %n %d %i %I %%)")]
    UnknownKey {
        /// The letter after `%`.
        key: char,
        /// The whole template.
        template: String,
    },
    /// Nothing left after expansion, or no name before the `@`.
    #[error("node name {template:?} expands to {expanded:?}, which has no name before the '@'")]
    Empty {
        /// The whole template.
        template: String,
        /// What it expanded to.
        expanded: String,
    },
}

/// This machine's host name (`localhost` if it cannot be read).
pub fn host_name() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Expand a node-name template on this machine (see the module documentation).
pub fn expand(template: &str) -> Result<String, NodenameError> {
    expand_on(template, &host_name(), 0)
}

/// Expand a node-name template for `host` and pool process `index`.
pub fn expand_on(template: &str, host: &str, index: usize) -> Result<String, NodenameError> {
    // As Celery's `default_nodename`: `name` alone means `name@<host>`.
    let full = if template.contains('@') { template.to_string() } else { format!("{template}@{host}") };
    let (short, domain) = host.split_once('.').unwrap_or((host, ""));
    let mut out = String::with_capacity(full.len() + host.len());
    let mut chars = full.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(short),
            Some('d') => out.push_str(domain),
            Some('i') => out.push_str(&index.to_string()),
            Some('I') if index > 0 => out.push_str(&format!("-{index}")),
            Some('I') => {}
            Some('%') => out.push('%'),
            Some(key) => return Err(NodenameError::UnknownKey { key, template: template.to_string() }),
            None => out.push('%'),
        }
    }
    if out.split('@').next().unwrap_or("").is_empty() {
        return Err(NodenameError::Empty { template: template.to_string(), expanded: out });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_celery_keys() {
        let h = "web1.example.com";
        assert_eq!(expand_on("celeriac@%h", h, 0).unwrap(), "celeriac@web1.example.com");
        assert_eq!(expand_on("w-%n@%d", h, 0).unwrap(), "w-web1@example.com");
        assert_eq!(expand_on("w%i%I@%h", h, 0).unwrap(), "w0@web1.example.com");
        assert_eq!(expand_on("w%i%I@%h", h, 2).unwrap(), "w2-2@web1.example.com");
        assert_eq!(expand_on("a%%b@%n", h, 0).unwrap(), "a%b@web1");
        assert_eq!(expand_on("%n@x", "box", 0).unwrap(), "box@x");
        assert_eq!(expand_on("w@%d", "box", 0).unwrap(), "w@");
    }

    #[test]
    fn bare_name_gets_the_host() {
        assert_eq!(expand_on("worker1", "box.lan", 0).unwrap(), "worker1@box.lan");
        assert_eq!(expand_on("w.%n", "box.lan", 0).unwrap(), "w.box@box.lan");
    }

    #[test]
    fn refuses_unknown_keys_and_empty_names() {
        assert_eq!(
            expand_on("w@%q", "box", 0).unwrap_err(),
            NodenameError::UnknownKey { key: 'q', template: "w@%q".into() }
        );
        assert!(matches!(expand_on("@%h", "box", 0), Err(NodenameError::Empty { .. })));
        assert!(matches!(expand_on("%I@%h", "box", 0), Err(NodenameError::Empty { .. })));
    }
}
