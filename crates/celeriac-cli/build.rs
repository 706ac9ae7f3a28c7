//! Link options of the stock `celeriac` binary: its hot code laid out together, and a
//! position-dependent executable (Linux, glibc).
//!
//! **Hot code first.** The code a prefork supervisor runs (start-up, the drain of a Python pool,
//! shutdown) is spread over the whole 11 MB of `.text`, and the kernel maps 64 KiB of cached file
//! around each page fault, so the supervisor kept 7.5-8 MiB of code resident for 2.4 MB it runs.
//! `symbol-order.txt` (next to this file) lists the functions a profiled supervisor ran, hottest
//! first, as the linker names them; from it this script writes a linker script that puts them
//! together in a `.text.hot` section before `.text` (functions are in sections of their own, so
//! the linker can place each one). `scripts/symbol-order.sh` regenerates the list from a
//! callgrind profile. A name that went stale (code renamed or inlined) is only not placed; the
//! build never depends on the list being current (see [`hot_text_script`] for the hashes).
//! Only with rust-lld, the default linker of Rust 1.90 and later on x86_64 Linux: not when Cargo
//! names a linker (`RUSTC_LINKER`) or the flags choose one, and not with
//! `CELERIAC_SYMBOL_ORDER=0`. See ARCHITECTURE.md, "Memory of the supervisor".
//!
//! **No PIE.** Linked `-no-pie` (as Go links its executables on Linux): the loader no longer
//! fixes up the executable's pointers to itself (1.3 MB of `.data.rel.ro`: vtables, panic
//! locations, string tables) from 1 MB of relocation records at every start, which saves about
//! 1.2 MiB of private memory and 1 MiB of file pages in every process, a fifth of a prefork
//! supervisor's (docs/benchmarks.md, "Supervisor RSS"). The price is the executable's own code
//! at a fixed address (libraries, heap and stacks stay random); `CELERIAC_LINK_PIE=1` at build
//! time links a position-independent executable as rustc does by default.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CELERIAC_LINK_PIE");
    println!("cargo:rerun-if-env-changed=CELERIAC_SYMBOL_ORDER");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();

    let order = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    let order_wanted = std::env::var("CELERIAC_SYMBOL_ORDER").map_or(true, |v| v != "0");
    if order_wanted && os == "linux" && env == "gnu" && arch == "x86_64" && links_with_rust_lld() {
        let out_dir = std::env::var("OUT_DIR").unwrap_or_default();
        let script = Path::new(&out_dir).join("hot-text.ld");
        let written =
            std::fs::read_to_string(&order).and_then(|names| std::fs::write(&script, hot_text_script(&names)));
        match (written, script.to_str()) {
            // `-Wl,` splits its argument at commas.
            (Ok(()), Some(path)) if !path.contains(',') => {
                println!("cargo:rustc-link-arg-bin=celeriac=-Wl,--script={path}");
            }
            (Err(e), _) => println!("cargo:warning=code not ordered: {}: {e}", order.display()),
            _ => println!("cargo:warning=code not ordered: {} has a comma", script.display()),
        }
    }

    let pie = std::env::var("CELERIAC_LINK_PIE").is_ok_and(|v| v == "1");
    if !pie && os == "linux" && env == "gnu" {
        // The linker driver (cc) takes the last of `-pie` (rustc's) and `-no-pie`.
        println!("cargo:rustc-link-arg-bin=celeriac=-no-pie");
    }
}

/// Whether rustc links this target with its own rust-lld: Rust 1.90 or later (its default on
/// x86_64-unknown-linux-gnu), with no linker named by Cargo's configuration or the flags.
fn links_with_rust_lld() -> bool {
    if std::env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if ["linker", "fuse-ld", "link-self-contained"].iter().any(|f| flags.contains(f)) {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    // "release: 1.95.0" (or "1.96.0-nightly"): major 1, minor at least 90.
    let minor = text
        .lines()
        .find_map(|l| l.strip_prefix("release: 1."))
        .and_then(|rest| rest.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}

/// A linker script that adds an output section `.text.hot` before `.text`, holding the listed
/// functions in the listed order (`INSERT BEFORE` keeps the linker's default layout for all
/// else). Each function is in an input section of its own, `.text.<symbol>`, or
/// `.text.unlikely.<symbol>` for a function LLVM takes for cold (`#[cold]`: a `Vec`'s growth).
///
/// A Rust symbol's trailing hash (`17h<16 hex digits>E`) changes with the crate's metadata (a
/// dependency's version, the features Cargo unifies for the packages built together), not with
/// the code. So every function is listed twice: first by its exact name, which places exactly
/// the functions profiled when the names are current; then by its name with any hash, which
/// still gathers them (with their same-named generic siblings, at the end of the section) when
/// the hashes moved. A name the build no longer has matches nothing, and the code is laid out
/// as without the list. Names with characters a linker script would not read as one pattern
/// are left out.
fn hot_text_script(names: &str) -> String {
    let usable = |n: &&str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.$".contains(&b));
    let names: Vec<&str> = names.lines().map(str::trim).filter(usable).collect();
    let mut script = String::from(
        "/* Generated by crates/celeriac-cli/build.rs from symbol-order.txt: the supervisor's hot code first. */\n\
         SECTIONS\n{\n  .text.hot : {\n",
    );
    for name in &names {
        script.push_str(&format!("    *(.text.{name} .text.unlikely.{name})\n"));
    }
    let mut seen = std::collections::HashSet::new();
    for name in &names {
        if let Some(stem) = without_hash(name) {
            if seen.insert(stem) {
                script.push_str(&format!("    *(.text.{stem}17h* .text.unlikely.{stem}17h*)\n"));
            }
        }
    }
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    script
}

/// A legacy-mangled Rust symbol without its hash: `_ZN...17h0123456789abcdefE` -> `_ZN...`.
fn without_hash(name: &str) -> Option<&str> {
    let stem = name.strip_suffix('E')?;
    let (stem, hash) = stem.split_at_checked(stem.len().checked_sub(19)?)?;
    let hex = hash.strip_prefix("17h")?;
    (name.starts_with("_ZN") && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(stem)
}
