//! `celeriac worker --python-app MODULE:ATTR`: the prefork pool's children are Python processes
//! running an existing Celery app's tasks (`python/celeriac_child` in this repository).
//!
//! The child module is built into this binary and written once to a cache directory named by
//! its content (`$XDG_CACHE_HOME/celeriac/python-<hash>`, else `~/.cache/...`, else the temporary
//! directory), which is put first on the children's `PYTHONPATH`; so the binary and its children
//! always agree on the pipe protocol, and `pip install ./python` is needed only to use the module
//! elsewhere. Before the pool starts, the interpreter is checked to exist and to import
//! `celery`, so a missing one is one clear line rather than a pool that cannot start.

use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use super::CliError;

/// The child module's files, relative to the directory put on `PYTHONPATH`.
const FILES: &[(&str, &str)] = &[
    ("celeriac_child/__init__.py", include_str!("../../../../python/celeriac_child/__init__.py")),
    ("celeriac_child/__main__.py", include_str!("../../../../python/celeriac_child/__main__.py")),
];

/// The interpreter to run: `--python`, else `$VIRTUAL_ENV/bin/python`, else `python3` on PATH.
pub(crate) fn interpreter(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(venv).join("bin").join("python");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("python3")
}

/// Check that `python` runs and imports `celery`; its Celery version.
pub(crate) fn check_interpreter(python: &Path) -> Result<String, CliError> {
    let out = std::process::Command::new(python)
        .args(["-c", "import celery, sys; sys.stdout.write(celery.__version__)"])
        .output()
        .map_err(|e| CliError::usage(format!("--python: cannot run {}: {e}", python.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(CliError::usage(format!(
            "--python-app: {} cannot import celery ({last}); install it there (pip install celery) or name another interpreter with --python",
            python.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Check the `MODULE:ATTR` form.
pub(crate) fn check_app_spec(spec: &str) -> Result<(), CliError> {
    let (module, _attr) = spec.split_once(':').unwrap_or((spec, ""));
    let ok = !module.is_empty()
        && module.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'));
    if ok {
        Ok(())
    } else {
        Err(CliError::usage(format!("--python-app {spec:?}: expected MODULE:ATTR, e.g. proj.celery:app")))
    }
}

/// Write the child module where the children import it from; the directory to put on
/// `PYTHONPATH`.
pub(crate) fn install() -> Result<PathBuf, CliError> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    FILES.hash(&mut h);
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("celeriac");
    let dir = base.join(format!("python-{:016x}", h.finish()));
    if FILES.iter().all(|(rel, text)| std::fs::read_to_string(dir.join(rel)).is_ok_and(|t| t == *text)) {
        return Ok(dir);
    }
    let failed = |e: std::io::Error| {
        CliError::failed(format!("cannot write the Python child module under {}: {e}", base.display()))
    };
    // Written beside, then renamed into place: a concurrent worker sees all of it or none.
    let staging = base.join(format!(".python-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    for (rel, text) in FILES {
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        std::fs::write(&path, text).map_err(failed)?;
    }
    match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Another worker put the same files there first.
        Err(_) if dir.join(FILES[0].0).exists() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(e) => Err(failed(e)),
    }
}

/// The pool's program, arguments and environment for Python children running `spec`.
pub(crate) fn child_command(
    python: PathBuf,
    spec: &str,
    module_dir: &Path,
) -> (PathBuf, Vec<OsString>, Vec<(OsString, OsString)>) {
    let mut path = OsString::from(module_dir);
    if let Some(existing) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(existing);
    }
    let args = vec![OsString::from("-m"), OsString::from("celeriac_child"), OsString::from(spec)];
    (python, args, vec![(OsString::from("PYTHONPATH"), path), (OsString::from("PYTHONUNBUFFERED"), "1".into())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_specs_are_module_and_attribute() {
        assert!(check_app_spec("proj.celery:app").is_ok());
        assert!(check_app_spec("tasks").is_ok());
        assert!(check_app_spec("proj-x:app").is_err());
        assert!(check_app_spec(":app").is_err());
        assert!(check_app_spec("a..b:app").is_err());
    }
}
