//! Whole server sessions (handshake + transmission) driven by fuzzer bytes, against an
//! in-memory device. Half of the inputs get a valid handshake prefix so that the fuzzer
//! spends its time on requests as well as on options.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&sel, rest)) if sel & 0x80 != 0 => {
            let mut input = vanbd::fuzzing::valid_prefix();
            input.extend_from_slice(rest);
            vanbd::fuzzing::session(&input);
        }
        _ => vanbd::fuzzing::session(data),
    }
});
