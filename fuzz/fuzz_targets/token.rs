//! Token extraction and verification alone; see `token::run_token`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_refresh_coalesce_fuzz::{input, token};

fuzz_target!(|data: &[u8]| {
    if let Some(input) = input::decode::<input::TokenInput>(data) {
        token::run_token(&input);
    }
});
