//! The flight table's locks and atomics: std's, or loom's when the table is model-checked.
//!
//! `RUSTFLAGS="--cfg refresh_coalesce_loom" cargo test --release --lib loom_` swaps in
//! loom's mocks, whose every lock and atomic operation is a point where loom tries the
//! other threads. The cfg is the crate's own, not `loom`: tokio does not build under
//! `--cfg loom`. Only the crate's own unit tests see the mocks, so a build that sets the
//! cfg for other reasons (docs, dependents) keeps std's.

#[cfg(all(test, refresh_coalesce_loom))]
pub(crate) use loom::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

#[cfg(not(all(test, refresh_coalesce_loom)))]
pub(crate) use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};
