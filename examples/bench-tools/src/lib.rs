//! Tools that measure the layer's memory, each run in a process of its own:
//!
//! - `memory` (`src/bin/memory.rs`): bytes per live replay, ours against
//!   `moka::future::Cache`.
//! - `flood` (`src/bin/flood.rs`): bounded memory under a flood of distinct valid refresh
//!   tokens through the HTTP front.
//!
//! This library holds what they share: reading the process's resident set.

pub mod rss;
