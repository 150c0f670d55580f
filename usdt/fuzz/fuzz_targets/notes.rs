//! Any bytes as an ELF file, and any text as an argument spec: discovery may refuse them, but
//! must never panic, hang or read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vsrscope_usdt::discover(data, "fuzz");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vsrscope_usdt::parse_arguments(text);
    }
});
