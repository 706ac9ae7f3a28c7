//! Where a task panicked: a panic hook that remembers the location on the panicking thread, so
//! the worker can store it in the result's traceback with the panic's message.
//!
//! The worker catches a task's panic on the thread that panicked (the async pool polls the task
//! under `catch_unwind`; a blocking task is caught inside its blocking thread; a prefork child
//! runs its task on its own thread), so a thread-local is enough: [`install_hook`] once, then
//! [`take_location`] right after `catch_unwind` returns the panic. The previous hook still runs
//! (by default, Rust's message on stderr).

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Install the hook (once per process; later calls do nothing).
pub fn install_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(l) = info.location() {
                let at = format!("{}:{}:{}", l.file(), l.line(), l.column());
                LOCATION.with(|cell| *cell.borrow_mut() = Some(at));
            }
            previous(info);
        }));
    });
}

/// The location (`file:line:column`) of the last panic on this thread since the last call.
pub fn take_location() -> Option<String> {
    LOCATION.with(|cell| cell.borrow_mut().take())
}

/// A caught panic's message (`&str` and `String` payloads; anything else says it panicked).
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the task panicked".into())
}

/// A caught panic as a task error: type `Panic` (module `celeriac`), its message, and its location
/// as the traceback detail (`panicked at src/lib.rs:10:5`), taken from this thread.
pub fn to_task_error(payload: &(dyn std::any::Any + Send)) -> crate::TaskError {
    let mut e = crate::TaskError::new("Panic", message(payload)).with_module("celeriac");
    e.traceback = take_location().map(|at| format!("panicked at {at}"));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_keeps_its_message_and_location() {
        install_hook();
        let caught = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        let line = line!() - 1;
        let e = to_task_error(caught.as_ref());
        assert_eq!((e.exc_type.as_str(), e.message.as_str(), e.module.as_str()), ("Panic", "boom 7", "celeriac"));
        let detail = e.traceback.unwrap();
        assert!(detail.starts_with("panicked at ") && detail.contains(&format!("panics.rs:{line}:")), "{detail}");
        assert_eq!(take_location(), None, "taken once");
    }
}
