//! The pure decoders on arbitrary bytes: client flags, option headers, every option payload,
//! request headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vanbd::decode;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = decode::client_flags([data[0], data[1], data[2], data[3]]);
    }
    if let Some(h) = data.get(..16).and_then(|s| <&[u8; 16]>::try_from(s).ok()) {
        let _ = decode::option_header(h).map(|h| h.check_len());
    }
    if let Some(h) = data.get(..28).and_then(|s| <&[u8; 28]>::try_from(s).ok()) {
        let _ = decode::request(h).map(|r| r.payload_len());
    }
    if let Some((opt, payload)) = data.split_first() {
        let _ = decode::client_option(u32::from(*opt % 12), payload);
    }
});
