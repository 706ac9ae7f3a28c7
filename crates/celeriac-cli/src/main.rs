//! The stock `celeriac` binary: the command line with the built-in diagnostic tasks.
//!
//! Everything lives in the `celeriac` library ([`celeriac::cli`]); a user binary gets the same
//! commands with its own tasks through [`celeriac::App::run_cli`].

fn main() -> std::process::ExitCode {
    celeriac::App::with_builtins().run_cli()
}
