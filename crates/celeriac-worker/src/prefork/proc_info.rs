//! The few operating-system calls the prefork pool needs, through `nix`'s safe wrappers.
//!
//! - [`die_with_parent`]: `PR_SET_PDEATHSIG(SIGKILL)`, then check the parent is still alive.
//! - [`take_stdout_for_protocol`]: keep fd 1 for frames, point fd 1 at stderr.
//! - [`rss_kib`]: a process's resident set from `/proc/<pid>/statm`; [`OwnRss`] reads this
//!   process's own with one `pread` on a file kept open.
//! - [`kill`]: SIGKILL a child.
//! - [`describe_wait`]: what a process is blocked on (state, wait channel, syscall), from /proc.

use std::fs::File;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Ask for SIGKILL when the parent dies, then make sure the parent is still `parent`.
pub fn die_with_parent(parent: u32) -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl(PR_SET_PDEATHSIG): {e}"))?;
    // The supervisor may have died between our fork and the prctl: then we were re-parented.
    let now = nix::unistd::getppid().as_raw() as u32;
    if now != parent {
        return Err(format!("the supervisor (pid {parent}) is gone (parent is now {now})"));
    }
    Ok(())
}

/// Duplicate stdout into a new descriptor for the protocol and point fd 1 at stderr.
pub fn take_stdout_for_protocol() -> Result<File, String> {
    let proto = nix::unistd::dup(std::io::stdout()).map_err(|e| format!("dup(stdout): {e}"))?;
    nix::unistd::dup2_stdout(std::io::stderr()).map_err(|e| format!("dup2(stderr, stdout): {e}"))?;
    Ok(File::from(proto))
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    // `statm` is a handful of numbers (resident pages second); `status` renders forty lines, and
    // a child reads this after every task.
    parse_statm(&std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?)
}

/// This process's resident set, read from `/proc/self/statm` kept open: a child reads it after
/// every task, and one `pread` costs less than open, read and close.
pub struct OwnRss {
    statm: Option<File>,
}

impl OwnRss {
    /// Open `/proc/self/statm` (if that fails, [`OwnRss::kib`] falls back to opening it each time).
    pub fn open() -> Self {
        OwnRss { statm: File::open("/proc/self/statm").ok() }
    }

    /// The resident set now, KiB.
    pub fn kib(&self) -> Option<u64> {
        let Some(file) = &self.statm else { return rss_kib(std::process::id()) };
        let mut buf = [0u8; 128];
        // A read at offset 0 makes the kernel render the numbers afresh.
        let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, 0).ok()?;
        parse_statm(std::str::from_utf8(&buf[..n]).ok()?)
    }
}

fn parse_statm(statm: &str) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size_kib())
}

/// The page size in KiB (4 on x86-64).
fn page_size_kib() -> u64 {
    static SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map_or(4, |b| (b as u64 / 1024).max(1))
    })
}

/// SIGKILL `pid` (no error if it is already gone).
pub fn kill(pid: u32) {
    signal(pid, Signal::SIGKILL);
}

/// Send a signal to `pid` (errors ignored: the process may be gone already).
pub fn signal(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
}

/// What `pid` is doing right now: scheduler state, kernel wait channel and current syscall, e.g.
/// `S (sleeping) in futex_wait_queue, syscall futex`.
pub fn describe_wait(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let state = stat.lines().find_map(|l| l.strip_prefix("State:")).map(str::trim).unwrap_or("?").to_string();
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let syscall = syscall.split_whitespace().next().and_then(|n| n.parse::<i64>().ok()).map(syscall_name);
    let mut out = state;
    if !wchan.trim().is_empty() && wchan.trim() != "0" {
        out.push_str(&format!(" in {}", wchan.trim()));
    }
    if let Some(s) = syscall {
        out.push_str(&format!(", syscall {s}"));
    }
    Some(out)
}

/// Names of the syscalls a blocked task is usually in (x86_64 numbers).
fn syscall_name(n: i64) -> String {
    match n {
        0 => "read".into(),
        1 => "write".into(),
        7 => "poll".into(),
        23 => "select".into(),
        35 => "nanosleep".into(),
        202 => "futex".into(),
        232 => "epoll_wait".into(),
        230 => "clock_nanosleep".into(),
        281 => "epoll_pwait".into(),
        61 => "wait4".into(),
        other => format!("#{other}"),
    }
}

/// A readable exit: "exit code 1" or "signal 6 (SIGABRT)".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("signal {s} ({sig})"),
            Err(_) => format!("signal {s}"),
        },
        _ => "unknown status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_rss_and_state() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(describe_wait(me).unwrap().starts_with('R') || describe_wait(me).is_some());
        assert!(rss_kib(u32::MAX).is_none());
    }

    #[test]
    fn rss_from_statm_is_the_vmrss_of_status() {
        let me = std::process::id();
        let status = std::fs::read_to_string(format!("/proc/{me}/status")).unwrap();
        let vmrss: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        let ours = rss_kib(me).unwrap();
        assert!(ours.abs_diff(vmrss) <= vmrss / 10, "statm {ours} KiB, status {vmrss} KiB");
    }

    #[test]
    fn own_rss_kept_open_follows_growth() {
        let rss = OwnRss::open();
        let before = rss.kib().unwrap();
        let block = vec![1u8; 64 << 20];
        let after = rss.kib().unwrap();
        assert!(after >= before + (48 << 10), "before {before} KiB, after touching 64 MiB {after} KiB");
        drop(std::hint::black_box(block));
    }
}
