//! Warm and cold shutdown.
//!
//! A [`Shutdown`] handle moves one way: `Running` → `Warm` (stop consuming, let running tasks
//! finish within the shutdown timeout, put everything else back) → `Cold` (put running tasks back
//! now). [`Shutdown::install_signal_handlers`] maps signals the way Celery does: the first SIGTERM
//! or SIGINT is warm, a second one is cold, SIGQUIT is cold at once.

use tokio::sync::watch;

/// How far along shutdown is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShutdownLevel {
    /// Working.
    Running,
    /// Finish what runs, take nothing new.
    Warm,
    /// Stop now, requeue what runs.
    Cold,
}

/// A handle to ask a worker to stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: watch::Sender<ShutdownLevel>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A handle in the running state.
    pub fn new() -> Self {
        Shutdown { tx: watch::channel(ShutdownLevel::Running).0 }
    }

    /// Ask for a warm shutdown (no effect if already shutting down).
    pub fn warm(&self) {
        self.tx.send_if_modified(|l| {
            if *l == ShutdownLevel::Running {
                *l = ShutdownLevel::Warm;
                true
            } else {
                false
            }
        });
    }

    /// Ask for a cold shutdown.
    pub fn cold(&self) {
        self.tx.send_replace(ShutdownLevel::Cold);
    }

    /// Escalate: running → warm → cold.
    pub fn escalate(&self) {
        if self.level() == ShutdownLevel::Running {
            self.warm();
        } else {
            self.cold();
        }
    }

    /// The current level.
    pub fn level(&self) -> ShutdownLevel {
        *self.tx.borrow()
    }

    /// Watch the level.
    pub fn subscribe(&self) -> watch::Receiver<ShutdownLevel> {
        self.tx.subscribe()
    }

    /// Map SIGTERM/SIGINT (warm, then cold) and SIGQUIT (cold) onto this handle.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut quit = signal(SignalKind::quit())?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                    _ = quit.recv() => "SIGQUIT",
                };
                if name == "SIGQUIT" {
                    this.cold();
                } else {
                    this.escalate();
                }
                match this.level() {
                    ShutdownLevel::Warm => {
                        tracing::info!(signal = name, "warm shutdown (send it again for a cold shutdown)")
                    }
                    _ => tracing::warn!(signal = name, "cold shutdown"),
                }
            }
        });
        Ok(())
    }
}
