//! `trace::parse_plan` on arbitrary bytes.
//!
//! A plan that parses has no duplicate items, and printing it back as `image chunk` lines
//! parses to the same plan.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use va_store::trace::{parse_plan, TraceError};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.plan");
    let items = match parse_plan(data, path) {
        Ok(items) => items,
        Err(e) => {
            if let TraceError::Parse { line, .. } = &e {
                let lines = data.split(|&b| b == b'\n').count();
                assert!(*line >= 1 && *line <= lines, "line {line} of {lines}");
            }
            assert!(e.to_string().starts_with("fuzz.plan"), "{e}");
            return;
        }
    };
    let distinct: HashSet<_> = items.iter().collect();
    assert_eq!(distinct.len(), items.len(), "duplicate plan items");
    let text: String = items
        .iter()
        .map(|i| format!("{} {}\n", i.image, i.chunk))
        .collect();
    let again = parse_plan(text.as_bytes(), path).expect("a printed plan must parse");
    assert_eq!(again, items);
});
