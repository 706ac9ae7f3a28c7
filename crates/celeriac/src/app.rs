//! [`App`]: the tasks a binary knows, and the entry point to the command line.

use std::process::ExitCode;
use std::sync::Arc;

use celeriac_core::{Registry, Task};

/// A set of registered tasks. A worker binary builds one and calls [`App::run_cli`].
///
/// ```no_run
/// #[celeriac::task(name = "hello")]
/// async fn hello(name: String) -> String { format!("hello {name}") }
///
/// fn main() -> std::process::ExitCode {
///     celeriac::App::new().task(hello).run_cli()
/// }
/// ```
#[derive(Debug, Clone, Default)]
pub struct App {
    registry: Registry,
    periodic: Vec<celeriac_beat::Entry>,
    timezone: Option<chrono_tz::Tz>,
}

impl App {
    /// An app with no tasks.
    pub fn new() -> Self {
        App::default()
    }

    /// A periodic task, sent by `celeriac beat` (and `worker -B`) of this app's binary, alongside
    /// the entries of `--schedule` (a name in both is refused at start):
    /// `App::new().periodic(celeriac_beat::Entry::every("cleanup", "celeriac.noop", Duration::from_secs(30)))`.
    pub fn periodic(mut self, entry: celeriac_beat::Entry) -> Self {
        self.periodic.push(entry);
        self
    }

    /// The timezone of this app's cron entries when no schedule file names one (default UTC).
    pub fn timezone(mut self, tz: chrono_tz::Tz) -> Self {
        self.timezone = Some(tz);
        self
    }

    /// The periodic tasks declared with [`App::periodic`], and their timezone.
    pub fn periodic_entries(&self) -> (&[celeriac_beat::Entry], Option<chrono_tz::Tz>) {
        (&self.periodic, self.timezone)
    }

    /// An app with the built-in diagnostic tasks (`celeriac.ping`, `celeriac.add`, ...).
    pub fn with_builtins() -> Self {
        let mut app = App::new();
        crate::builtins::register(&mut app.registry);
        app
    }

    /// Register a task.
    pub fn task<T: Task>(mut self, task: T) -> Self {
        self.registry.register(task);
        self
    }

    /// Register a task on an existing app.
    pub fn register<T: Task>(&mut self, task: T) -> &mut Self {
        self.registry.register(task);
        self
    }

    /// The registered tasks, to change.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The registered tasks.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registered tasks, shared.
    pub fn shared_registry(&self) -> Arc<Registry> {
        Arc::new(self.registry.clone())
    }

    /// Run the `celeriac` command line with this app's tasks, reading `std::env::args`.
    pub fn run_cli(self) -> ExitCode {
        crate::cli::main(self, std::env::args_os())
    }
}
