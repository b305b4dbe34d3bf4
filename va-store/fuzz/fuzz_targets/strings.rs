//! The string parsers an appliance location goes through: `origin::split_digest`,
//! `Hash::from_hex`, `format::valid_pack_path` (pack paths come from the manifest) and, for
//! `http(s)://` strings, the URL parsing of `HttpOrigin::new` and its path mapping
//! (`describe`). Nothing here touches the network or the file system.
//!
//! Input: UTF-8 text (invalid sequences replaced); the first line is the location, the second
//! (if any) a bundle-relative path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use va_store::format::valid_pack_path;
use va_store::origin::{split_digest, HttpOrigin, Origin, OriginOptions};
use va_store::Hash;

fn check_digest_split(s: &str) {
    let Ok((base, digest)) = split_digest(s) else {
        return;
    };
    assert!(base.ends_with('/'), "{base:?}");
    assert!(!base.trim().is_empty());
    assert!(!base.contains('#'));
    match s.split_once('#') {
        None => assert_eq!(digest, None),
        Some((_, frag)) => {
            let h = digest.expect("a fragment that split must be a digest");
            assert_eq!(Hash::from_hex(frag), Some(h));
            let again = split_digest(&format!("{base}#{h}")).expect("re-joined location");
            assert_eq!(again, (base.clone(), Some(h)));
        }
    }
    assert_eq!(split_digest(&base).expect("bare base"), (base, None));
}

fn check_pack_path(p: &str) {
    if !valid_pack_path(p) {
        return;
    }
    assert!(!p.is_empty() && p.len() <= 1024);
    assert!(!p.starts_with('/') && !p.ends_with('/') && !p.contains("//"));
    assert!(p
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/')));
    let segs: Vec<&str> = p.split('/').collect();
    let ups = segs.iter().take_while(|s| **s == "..").count();
    assert!(ups < segs.len(), "{p:?} names no file");
    assert!(segs[ups..].iter().all(|s| *s != "." && *s != ".."), "{p:?}");
}

fn check_hex(s: &str) {
    if let Some(h) = Hash::from_hex(s) {
        assert_eq!(h.to_hex(), s.trim().to_ascii_lowercase());
    }
}

fn check_http(url: &str, path: &str) {
    let l = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(l.starts_with("http://") || l.starts_with("https://")) {
        return;
    }
    let Ok(o) = HttpOrigin::new(url, &OriginOptions::default()) else {
        return;
    };
    let d = o.describe("manifest");
    assert!(d.starts_with("http") && d.ends_with("/manifest"), "{d:?}");
    if !path.is_empty() {
        let d = o.describe(path);
        assert!(
            d.ends_with(path.rsplit('/').next().unwrap_or(path)),
            "{d:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (first, second) = text.split_once('\n').unwrap_or((&text, ""));
    for s in [&*text, first, second] {
        check_digest_split(s);
        check_pack_path(s);
        check_hex(s);
    }
    check_http(first, second);
});
