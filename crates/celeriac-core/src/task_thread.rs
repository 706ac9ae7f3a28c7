//! Which thread runs a task: a process-wide hook a blocking task calls when it starts on its
//! thread, so a prefork child can tell its supervisor where to look in `/proc` for what the task
//! is blocked on.
//!
//! `#[celeriac::task]` on a blocking `fn` runs the body on the runtime's blocking pool, not on
//! the thread that polls the task; the generated code calls [`entered`] first thing on that
//! thread. A prefork child installs a listener with [`listen`] (which reads the thread's id and
//! reports it); anywhere else no listener is installed and [`entered`] costs one atomic load.
//! A hand-written [`crate::Task`] that moves its work to another thread can call [`entered`]
//! there too.

use std::sync::OnceLock;

type Listener = Box<dyn Fn() + Send + Sync>;

static LISTENER: OnceLock<Listener> = OnceLock::new();

/// Install the process's listener, called on the thread a task starts running on. Only the
/// first call installs one; later calls return `false` and change nothing.
pub fn listen(listener: impl Fn() + Send + Sync + 'static) -> bool {
    LISTENER.set(Box::new(listener)).is_ok()
}

/// The current task starts running on this thread: tell the listener, if there is one.
pub fn entered() {
    if let Some(listener) = LISTENER.get() {
        listener();
    }
}
