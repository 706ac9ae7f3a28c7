//! Link the stock `celeriac` binary as a position-dependent executable on Linux with glibc.
//!
//! A position-independent executable (the default) has its pointers to itself (1.3 MB of
//! `.data.rel.ro`: vtables, panic locations, string tables) fixed up by the loader at every
//! start, from 1 MB of relocation records it reads whole: about 1.2 MiB of private memory and
//! 1 MiB of file pages in every process, a prefork supervisor included, before it does anything.
//! Linked with `-no-pie`, those pointers are final in the file and only the pages read are
//! resident. The cost is that the executable's own code is not at a random address (libraries,
//! heap and stacks still are); see ARCHITECTURE.md, "Memory of the supervisor".
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // The linker driver (cc) takes the last of `-pie` (rustc's) and `-no-pie`.
        println!("cargo:rustc-link-arg-bin=celeriac=-no-pie");
    }
}
