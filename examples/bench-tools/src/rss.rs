//! The process's resident set from `/proc/self`, for the memory tools (`memory`, `flood`). The crate forbids `unsafe`, so the page size is derived rather than asked
//! of `sysconf`.

use std::fs;

/// Resident pages (`/proc/self/statm`), and `VmRSS` and the peak `VmHWM` in bytes
/// (`/proc/self/status`).
pub fn resident() -> (u64, u64, u64) {
    let statm = fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("resident pages");
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
    };
    (pages, kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
}

/// The page size, from the two views of the same resident set.
pub fn page_size() -> u64 {
    let (pages, bytes, _) = resident();
    let size = (bytes / pages).next_power_of_two();
    assert!(
        (4096..=65536).contains(&size),
        "odd page size {size} ({bytes} bytes in {pages} pages)"
    );
    size
}
