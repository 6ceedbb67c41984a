//! Test code shared by the tests of every crate of the workspace.
//!
//! - [`gate`]: inner services that count their calls and hold each one at a gate until the
//!   test opens it, so that a test can gather every caller of a storm first.
//! - [`tokens`]: refresh tokens for tests, well-formed or broken on purpose.
//! - [`dpop`]: DPoP proofs (RFC 9449) signed with fixed test keys.
//! - [`redis`]: `redis-server` processes of the test's own.
//!
//! It never depends on `tower-refresh-coalesce`, whose tests depend on it. A crate uses it
//! as a dev-dependency: `support = { package = "test-support", path = "tests/support" }`.

pub mod dpop;
pub mod gate;
pub mod redis;
pub mod tokens;

pub use gate::{Calls, Gate, Gated, until};
