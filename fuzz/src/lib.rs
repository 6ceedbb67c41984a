//! Fuzz harnesses for `tower-refresh-coalesce`; see `fuzz/README.md`.
//!
//! - `front`: whole requests through the layer, a counting inner service that checks what
//!   reaches it, every response checked.
//! - `token`: `JwtVerifier::verify` against an independent oracle, and the extraction of one
//!   request through a layer with the `Opaque` verifier.

pub mod dpop;
mod findings;
pub mod front;
pub mod input;
pub mod model;
pub mod seeds;
pub mod token;
pub mod tokens;

/// `FUZZ_DEBUG=1`: the harnesses print every request's outcome (for triage with
/// `cargo fuzz run <target> <artifact>` or the `seeds_run_clean` test).
pub fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some_and(|v| v == "1"))
}
