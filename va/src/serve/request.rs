//! Parsing a request head: the fields the server uses, the target path (decoded safely),
//! the `Range` header and `If-None-Match` lists.

/// Most header fields accepted in a request.
const MAX_HEADERS: usize = 64;

/// The parts of a request the server uses.
#[derive(Debug)]
pub(super) struct RequestHead {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) keep_alive: bool,
    pub(super) has_body: bool,
    pub(super) range: Option<String>,
    pub(super) if_range: Option<String>,
    pub(super) if_none_match: Option<String>,
    pub(super) if_modified_since: Option<String>,
}

impl RequestHead {
    /// Parses a complete request head; `Err(status)` for a request to refuse.
    pub(super) fn parse(head: &[u8]) -> Result<RequestHead, u16> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(400),
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(httparse::Error::Version) => return Err(505),
            Err(_) => return Err(400),
        }
        let method = req.method.unwrap_or("").to_string();
        let target = req.path.unwrap_or("").to_string();
        let minor = req.version.unwrap_or(0);
        let mut r = RequestHead {
            method,
            target,
            keep_alive: minor >= 1,
            has_body: false,
            range: None,
            if_range: None,
            if_none_match: None,
            if_modified_since: None,
        };
        for h in req.headers.iter() {
            let Ok(value) = std::str::from_utf8(h.value) else {
                // Only the fields below matter; a non-text one of those is a bad request.
                if is_one_of(
                    h.name,
                    &["range", "if-range", "if-none-match", "connection"],
                ) {
                    return Err(400);
                }
                continue;
            };
            let value = value.trim();
            let name = h.name;
            if name.eq_ignore_ascii_case("connection") {
                for tok in value.split(',').map(str::trim) {
                    if tok.eq_ignore_ascii_case("close") {
                        r.keep_alive = false;
                    } else if tok.eq_ignore_ascii_case("keep-alive") && minor == 0 {
                        r.keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                r.has_body |= value != "0";
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                r.has_body = true;
            } else if name.eq_ignore_ascii_case("range") {
                if r.range.is_some() {
                    return Err(400);
                }
                r.range = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("if-range") {
                r.if_range = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("if-none-match") {
                // Several fields are one comma-separated list.
                let v = r
                    .if_none_match
                    .take()
                    .map_or(value.to_string(), |p| format!("{p},{value}"));
                r.if_none_match = Some(v);
            } else if name.eq_ignore_ascii_case("if-modified-since") {
                r.if_modified_since = Some(value.to_string());
            }
        }
        Ok(r)
    }
}

/// Whether header `name` is one of `names` (ASCII case-insensitive).
fn is_one_of(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Decodes a request target into the relative path segments of a file; `Err(status)` to refuse.
///
/// Accepts origin-form (`/a/b`) and absolute-form (`http://host/a/b`) targets, drops the
/// query, percent-decodes, skips empty segments, and refuses NUL bytes (400) and `.`/`..`
/// segments, encoded or not (403).
pub(super) fn decode_target(target: &str) -> Result<Vec<Vec<u8>>, u16> {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        if t.len() >= scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            t = t[scheme.len()..]
                .find('/')
                .map_or("/", |i| &t[scheme.len() + i..]);
        }
    }
    if !t.starts_with('/') {
        return Err(400);
    }
    let t = t.split(['?', '#']).next().unwrap_or("");
    let raw = t.as_bytes();
    let mut path = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or(400u16)?;
            let hi = (hex[0] as char).to_digit(16).ok_or(400u16)?;
            let lo = (hex[1] as char).to_digit(16).ok_or(400u16)?;
            path.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            path.push(raw[i]);
            i += 1;
        }
    }
    if path.contains(&0) {
        return Err(400);
    }
    let mut segments = Vec::new();
    for seg in path.split(|&b| b == b'/').filter(|s| !s.is_empty()) {
        if seg == b"." || seg == b".." {
            return Err(403);
        }
        segments.push(seg.to_vec());
    }
    Ok(segments)
}

/// A single byte range request resolved against a file size.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ResolvedRange {
    /// Serve the whole file (no range, an invalid header, or several ranges).
    Full,
    /// Serve `start..=end`.
    Single(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Parses a `Range` header value for a file of `size` bytes.
///
/// Syntactically invalid values and other units are ignored (the whole file is served);
/// several ranges are answered with the whole file as well, which RFC 9110 allows.
pub(super) fn parse_range(value: &str, size: u64) -> ResolvedRange {
    let Some((unit, set)) = value.trim().split_once('=') else {
        return ResolvedRange::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return ResolvedRange::Full;
    }
    // Digits only; values too large for u64 saturate (they are past any end anyway).
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(s.parse::<u64>().unwrap_or(u64::MAX))
    };
    let mut specs = Vec::new();
    for spec in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((a, b)) = spec.split_once('-') else {
            return ResolvedRange::Full;
        };
        let (a, b) = (a.trim(), b.trim());
        let parsed = match (num(a), num(b)) {
            (Some(first), Some(last)) if first <= last => (Some(first), Some(last)),
            (Some(first), None) if b.is_empty() => (Some(first), None),
            (None, Some(n)) if a.is_empty() => (None, Some(n)),
            _ => return ResolvedRange::Full,
        };
        specs.push(parsed);
    }
    if specs.len() != 1 {
        return ResolvedRange::Full;
    }
    match specs[0] {
        (Some(first), last) => {
            if first >= size {
                return ResolvedRange::Unsatisfiable;
            }
            let end = last.map_or(size - 1, |l| l.min(size - 1));
            ResolvedRange::Single(first, end)
        }
        (None, Some(n)) => {
            if n == 0 || size == 0 {
                return ResolvedRange::Unsatisfiable;
            }
            ResolvedRange::Single(size - n.min(size), size - 1)
        }
        (None, None) => ResolvedRange::Full,
    }
}

/// Whether an `If-None-Match` list matches `etag` (weak comparison).
pub(super) fn etag_matches_list(list: &str, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let mine = strip(etag);
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || strip(t) == mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use ResolvedRange::*;
        assert_eq!(parse_range("bytes=0-9", 100), Single(0, 9));
        assert_eq!(parse_range("bytes=90-200", 100), Single(90, 99));
        assert_eq!(parse_range("bytes=10-", 100), Single(10, 99));
        assert_eq!(parse_range("bytes=-5", 100), Single(95, 99));
        assert_eq!(parse_range("bytes=-500", 100), Single(0, 99));
        assert_eq!(parse_range("Bytes = 1-1", 100), Single(1, 1));
        assert_eq!(parse_range("bytes=1-2,", 100), Single(1, 2));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(
            parse_range("bytes=99999999999999999999-", 100),
            Unsatisfiable
        );
        assert_eq!(
            parse_range("bytes=0-99999999999999999999", 100),
            Single(0, 99)
        );
        for full in [
            "bytes=0-1,5-6",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
            "items=0-1",
            "bytes",
            "",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=,",
        ] {
            assert_eq!(parse_range(full, 100), Full, "{full:?}");
        }
    }
    #[test]
    fn targets() {
        let segs = |t| {
            decode_target(t).map(|v| {
                v.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            segs("/app/packs/a.pack"),
            Ok(vec!["app".into(), "packs".into(), "a.pack".into()])
        );
        assert_eq!(segs("/a%20b//c?x=1"), Ok(vec!["a b".into(), "c".into()]));
        assert_eq!(segs("http://host:1/a/b"), Ok(vec!["a".into(), "b".into()]));
        assert_eq!(segs("/"), Ok(vec![]));
        assert_eq!(segs("/../etc/passwd"), Err(403));
        assert_eq!(segs("/a/%2e%2e/%2E%2E/etc"), Err(403));
        assert_eq!(segs("/a/%2e/b"), Err(403));
        assert_eq!(segs("/a%2f..%2fb"), Err(403));
        assert_eq!(segs("/a%00b"), Err(400));
        assert_eq!(segs("/a%zz"), Err(400));
        assert_eq!(segs("/a%2"), Err(400));
        assert_eq!(segs("a/b"), Err(400));
        assert_eq!(segs("*"), Err(400));
    }
    #[test]
    fn etag_lists() {
        assert!(etag_matches_list("\"x\"", "\"x\""));
        assert!(etag_matches_list("\"a\", W/\"x\"", "\"x\""));
        assert!(etag_matches_list("*", "\"x\""));
        assert!(!etag_matches_list("\"y\"", "\"x\""));
    }
}
