//! Optionally link the stock `celeriac` binary as a position-dependent executable (Linux, glibc).
//!
//! Off by default: a position-independent executable (PIE) keeps the executable's own code at a
//! random address, a hardening default of every distribution, and celeriac keeps it. Building with
//! `CELERIAC_LINK_NO_PIE=1` links `-no-pie` instead: the loader then no longer fixes up the
//! executable's pointers to itself (1.3 MB of `.data.rel.ro`: vtables, panic locations, string
//! tables) from 1 MB of relocation records at every start, which saves about 1.2 MiB of private
//! memory and 1 MiB of file pages in every process (a prefork supervisor's peak 22-23 -> 20.6
//! MiB; docs/benchmarks.md, "Supervisor RSS"). See ARCHITECTURE.md, "Memory of the supervisor".
fn main() {
    println!("cargo:rerun-if-env-changed=CELERIAC_LINK_NO_PIE");
    let wanted = std::env::var("CELERIAC_LINK_NO_PIE").is_ok_and(|v| v == "1");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if wanted {
        if os == "linux" && env == "gnu" {
            // The linker driver (cc) takes the last of `-pie` (rustc's) and `-no-pie`.
            println!("cargo:rustc-link-arg-bin=celeriac=-no-pie");
        } else {
            println!("cargo:warning=CELERIAC_LINK_NO_PIE=1 is for Linux with glibc only: linked as usual");
        }
    }
}
