//! The few operating-system calls the prefork pool needs, through `nix`'s safe wrappers.
//!
//! - [`die_with_parent`]: `PR_SET_PDEATHSIG(SIGKILL)`, then check the parent is still alive.
//! - [`take_stdout_for_protocol`]: keep fd 1 for frames, point fd 1 at stderr.
//! - [`rss_kib`]: a process's resident set from `/proc/<pid>/statm`; [`OwnRss`] reads this
//!   process's own with one `pread` on a file kept open.
//! - [`kill`]: SIGKILL a child.
//! - [`ThreadWait`]: what one thread is blocked on (state, wait channel, syscall by name), from
//!   `/proc/<pid>/task/<tid>/`; [`thread_id`]: `gettid`, the thread a child reports its task
//!   runs on.
//! - [`release_free_heap`]: glibc's `malloc_trim(0)`, the free pages of every malloc arena
//!   back to the kernel (a supervisor does it every [`HEAP_RELEASE_EVERY`]).

use std::fs::File;
use std::time::Duration;

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

/// What one thread of a process is doing right now, read from `/proc/<pid>/task/<tid>/`
/// (`status`'s `State:` line, `wchan`, `syscall`; see proc(5)): for `inspect active`, the SIGUSR1
/// dump and the dashboard. A hung task shows as e.g. `S (sleeping)`, wait channel
/// `futex_wait_queue`, syscall `futex`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ThreadWait {
    /// The scheduler state as the kernel spells it: `R (running)`, `S (sleeping)`,
    /// `D (disk sleep)`, `T (stopped)`, `Z (zombie)`.
    pub state: String,
    /// The kernel function the thread sleeps in (`futex_wait_queue`, `do_epoll_wait`,
    /// `pipe_read`); `None` when it is running, or when the kernel does not say (`0`, or
    /// reading `wchan` is not allowed).
    pub wchan: Option<String>,
    /// The system call it is in, by name (`futex`, `read`; `#N` for a number not in
    /// [`syscall_name`]'s table); `None` when it is running in user space or not in a syscall.
    pub syscall: Option<String>,
}

impl ThreadWait {
    /// Read thread `tid` of process `pid`; `None` when the thread is gone (or `/proc` cannot
    /// be read).
    pub fn read(pid: u32, tid: u32) -> Option<ThreadWait> {
        let dir = format!("/proc/{pid}/task/{tid}");
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        let state = status.lines().find_map(|l| l.strip_prefix("State:")).map_or("?", str::trim).to_string();
        let wchan = std::fs::read_to_string(format!("{dir}/wchan")).ok();
        let syscall = std::fs::read_to_string(format!("{dir}/syscall")).ok();
        Some(ThreadWait::parse(state, wchan.as_deref(), syscall.as_deref()))
    }

    /// From the texts of `State:`, `wchan` and `syscall` (its first field is the syscall's
    /// number, `-1` when blocked outside one, or the word `running`).
    fn parse(state: String, wchan: Option<&str>, syscall: Option<&str>) -> ThreadWait {
        let wchan = wchan.map(str::trim).filter(|w| !w.is_empty() && *w != "0").map(str::to_string);
        let syscall = syscall
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .map(syscall_name);
        ThreadWait { state, wchan, syscall }
    }

    /// What it is blocked on, in one phrase: `S (sleeping) in futex_wait_queue, syscall futex`.
    pub fn summary(&self) -> String {
        let mut out = self.state.clone();
        if let Some(w) = &self.wchan {
            out.push_str(&format!(" in {w}"));
        }
        if let Some(s) = &self.syscall {
            out.push_str(&format!(", syscall {s}"));
        }
        out
    }
}

/// The calling thread's kernel id (`gettid(2)`): what a child reports as the thread its task
/// runs on, and the `<tid>` of `/proc/<pid>/task/<tid>/`.
pub fn thread_id() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

/// The name of system call `n` on this architecture (the numbers are `libc`'s `SYS_*` for the
/// target, so x86_64's `202` is `futex`): the calls a blocked thread is usually in, and the
/// common others; `#N` for the rest.
pub fn syscall_name(n: i64) -> String {
    macro_rules! names {
        ($($name:ident),* $(,)?) => {
            $(if n == nix::libc::$name as i64 {
                return stringify!($name)["SYS_".len()..].to_string();
            })*
        };
    }
    names!(
        SYS_read,
        SYS_write,
        SYS_openat,
        SYS_close,
        SYS_pread64,
        SYS_pwrite64,
        SYS_readv,
        SYS_writev,
        SYS_ppoll,
        SYS_pselect6,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_futex,
        SYS_futex_waitv,
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_wait4,
        SYS_waitid,
        SYS_accept4,
        SYS_connect,
        SYS_recvfrom,
        SYS_sendto,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_fsync,
        SYS_fdatasync,
        SYS_flock,
        SYS_fcntl,
        SYS_ioctl,
        SYS_msgrcv,
        SYS_semtimedop,
        SYS_rt_sigtimedwait,
        SYS_rt_sigsuspend,
        SYS_io_getevents,
        SYS_io_uring_enter,
        SYS_mmap,
        SYS_munmap,
        SYS_brk,
        SYS_madvise,
    );
    // Calls only the older architectures (x86_64 among them) have.
    #[cfg(target_arch = "x86_64")]
    names!(SYS_poll, SYS_select, SYS_epoll_wait, SYS_pause, SYS_accept, SYS_open, SYS_sendfile,);
    format!("#{n}")
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

/// How often a prefork supervisor gives its malloc arenas' free pages back to the kernel.
pub const HEAP_RELEASE_EVERY: Duration = Duration::from_millis(250);

/// Give the free pages inside glibc's malloc arenas back to the kernel (`malloc_trim(0)`);
/// whether any was. glibc returns only the top of an arena by itself, so memory freed in the
/// middle stays resident: a supervisor's deliveries are allocated on lapin's threads and freed
/// on the runtime's, across several arenas, and a drain's window left 2-3 MiB resident in them
/// after it was freed (docs/benchmarks.md, "Supervisor RSS"). `false`, doing nothing, where the
/// C library is not glibc.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the arenas' own locks and only releases free pages; any
        // thread may call it at any time.
        unsafe { nix::libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that read this process's resident memory run one at a time: one of them frees
    /// 48 MiB, which another's reading would see.
    static RSS_READERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn one_reader() -> std::sync::MutexGuard<'static, ()> {
        RSS_READERS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resident anonymous memory of this process, KiB.
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn memory_freed_in_the_middle_of_an_arena_goes_back_to_the_kernel() {
        let _one = one_reader();
        // A thread of its own (an arena of its own) allocates 48 MiB in 2 KiB blocks and frees
        // all but every 32nd: glibc keeps the freed pages between the survivors resident.
        let (done, wait) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let blocks: Vec<Box<[u8; 2048]>> = (0..24_576).map(|i| Box::new([i as u8; 2048])).collect();
            let kept: Vec<Box<[u8; 2048]>> = blocks.into_iter().step_by(32).collect();
            done.send(()).unwrap();
            released.recv().unwrap();
            drop(kept);
        });
        wait.recv().unwrap();
        let before = rss_anon_kib();
        assert!(release_free_heap(), "malloc_trim released nothing");
        let after = rss_anon_kib();
        release.send(()).unwrap();
        holder.join().unwrap();
        assert!(before.saturating_sub(after) > 24 * 1024, "resident anonymous memory {before} -> {after} KiB");
    }

    #[test]
    fn reads_our_own_rss_and_state() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(ThreadWait::read(me, thread_id()).unwrap().state.starts_with('R'), "we are running");
        assert!(rss_kib(u32::MAX).is_none());
    }

    #[test]
    fn a_thread_blocked_on_a_condvar_is_sleeping_in_a_futex_wait() {
        let (tx, rx) = std::sync::mpsc::channel();
        let pair = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let theirs = pair.clone();
        let waiter = std::thread::spawn(move || {
            tx.send(thread_id()).unwrap();
            let (lock, cv) = &*theirs;
            let mut done = lock.lock().unwrap();
            while !*done {
                done = cv.wait(done).unwrap();
            }
        });
        let tid = rx.recv().unwrap();
        let me = std::process::id();
        assert_ne!(tid, me, "the waiter is another thread");
        // It sleeps shortly after saying its id: poll its state with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let wait = loop {
            let w = ThreadWait::read(me, tid).expect("the thread is alive");
            // The syscall is set on entry, the state and wait channel once it sleeps.
            let asleep = w.state.starts_with('S') && w.wchan.is_some() && w.syscall.as_deref() == Some("futex");
            if asleep || std::time::Instant::now() > deadline {
                break w;
            }
            std::thread::yield_now();
        };
        assert!(wait.state.starts_with('S'), "{wait:?}");
        assert_eq!(wait.syscall.as_deref(), Some("futex"), "{wait:?}");
        assert!(wait.wchan.as_deref().is_some_and(|w| w.contains("futex")), "{wait:?}");
        assert!(wait.summary().starts_with("S (sleeping) in futex"), "{}", wait.summary());
        *pair.0.lock().unwrap() = true;
        pair.1.notify_all();
        waiter.join().unwrap();
        assert!(ThreadWait::read(me, tid).is_none(), "a finished thread reads as gone");
    }

    #[test]
    fn proc_texts_parse_into_a_wait() {
        let w = ThreadWait::parse(
            "S (sleeping)".into(),
            Some("futex_wait_queue\n"),
            Some("202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f1\n"),
        );
        assert_eq!(w.summary(), "S (sleeping) in futex_wait_queue, syscall futex");
        let running = ThreadWait::parse("R (running)".into(), Some("0"), Some("running\n"));
        assert_eq!((running.wchan, running.syscall), (None, None));
        let outside = ThreadWait::parse("S (sleeping)".into(), Some(""), Some("-1 0x7ffd 0x7f1\n"));
        assert_eq!(outside.summary(), "S (sleeping)");
        assert_eq!(syscall_name(100_000), "#100000");
        #[cfg(target_arch = "x86_64")]
        for (n, name) in [(0, "read"), (202, "futex"), (230, "clock_nanosleep"), (232, "epoll_wait"), (7, "poll")] {
            assert_eq!(syscall_name(n), name);
        }
    }

    #[test]
    fn rss_from_statm_is_the_vmrss_of_status() {
        let _one = one_reader();
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
        let _one = one_reader();
        let rss = OwnRss::open();
        let before = rss.kib().unwrap();
        let block = vec![1u8; 64 << 20];
        let after = rss.kib().unwrap();
        assert!(after >= before + (48 << 10), "before {before} KiB, after touching 64 MiB {after} KiB");
        drop(std::hint::black_box(block));
    }
}
