//! The whole HTTP front: a few batches of requests (headers, cookies, bodies, forms, paths
//! from the fuzzer) through a fresh layer; see `front::run_front` for what is checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_refresh_coalesce_fuzz::{front, input};

fuzz_target!(|data: &[u8]| {
    if let Some(input) = input::decode::<input::FrontInput>(data) {
        front::run_front(&input);
    }
});
