//! The base URL of an HTTP origin, and the request target of each bundle file under it.
//!
//! Accepted: `http://` or `https://`, a host name or IP address (IPv6 in brackets), an
//! optional port, and a directory path of plain segments. Refused: user names, query strings,
//! fragments, `.`/`..` segments, anything but printable ASCII.

use std::fmt;

use crate::origin::{parse_rel_path, OriginError};

/// Where an HTTP origin lives: the parsed base URL (a directory).
#[derive(Debug, Clone)]
pub(super) struct BaseUrl {
    /// `https://` (else `http://`).
    pub(super) https: bool,
    /// Host name or IP address as used to connect (IPv6 without brackets), lower case.
    pub(super) host: String,
    /// TCP port (the scheme's default when the URL names none).
    pub(super) port: u16,
    /// `host[:port]` as sent in the `Host` header (port only when not the default).
    pub(super) host_header: String,
    /// `scheme://authority`, for messages.
    pub(super) prefix: String,
    /// Path segments of the base directory.
    pub(super) dir: Vec<String>,
}

impl BaseUrl {
    /// Parses and checks base URL `url` (a directory; a trailing `/` is implied).
    pub(super) fn parse(url: &str) -> Result<BaseUrl, OriginError> {
        let bad = |why: &str| OriginError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        if !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("only printable ASCII without spaces is allowed"));
        }
        if url.contains(['?', '#']) {
            return Err(bad(
                "query strings and fragments are not supported in the base URL",
            ));
        }
        let (https, rest) = if url.len() >= 8 && url[..8].eq_ignore_ascii_case("https://") {
            (true, &url[8..])
        } else if url.len() >= 7 && url[..7].eq_ignore_ascii_case("http://") {
            (false, &url[7..])
        } else {
            return Err(bad("not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad("user names in URLs are not supported"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port_str) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unterminated '[' in host"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let v6 = authority.starts_with('[');
        if !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') || (v6 && b == b':')
        }) {
            return Err(bad("invalid host name"));
        }
        let port = match port_str {
            None | Some("") => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(bad("invalid port")),
            },
        };
        let host_l = host.to_ascii_lowercase();
        let shown_host = if v6 {
            format!("[{host_l}]")
        } else {
            host_l.clone()
        };
        let host_header = if port == default_port {
            shown_host.clone()
        } else {
            format!("{shown_host}:{port}")
        };
        let mut dir = Vec::new();
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            if seg == "." || seg == ".." {
                return Err(bad("'.' and '..' segments are not allowed in the base URL"));
            }
            dir.push(seg.to_string());
        }
        let prefix = format!("{}://{host_header}", if https { "https" } else { "http" });
        Ok(BaseUrl {
            https,
            host: host_l,
            port,
            host_header,
            prefix,
            dir,
        })
    }

    /// The request target (absolute path) of bundle-relative `path`.
    pub(super) fn target(&self, path: &str) -> Result<String, OriginError> {
        let rel = parse_rel_path(path)?;
        if rel.ups > self.dir.len() {
            return Err(OriginError::BadPath {
                path: path.to_string(),
                why: "climbs above the root of the server",
            });
        }
        let mut t = String::new();
        for seg in self.dir[..self.dir.len() - rel.ups]
            .iter()
            .map(String::as_str)
        {
            t.push('/');
            t.push_str(seg);
        }
        for seg in rel.segments {
            t.push('/');
            t.push_str(seg);
        }
        Ok(t)
    }

    /// `host:port` to connect to (an IPv6 address in brackets).
    pub(super) fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Human-readable location of bundle-relative `path` (the full URL), also for a path that
    /// [`BaseUrl::target`] refuses.
    pub(super) fn describe(&self, path: &str) -> String {
        match self.target(path) {
            Ok(t) => format!("{}{t}", self.prefix),
            Err(_) => {
                let dir: String = self.dir.iter().map(|s| format!("{s}/")).collect();
                format!("{}/{dir}{path}", self.prefix)
            }
        }
    }
}

impl fmt::Display for BaseUrl {
    /// `scheme://authority/dir` (without the trailing `/`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.prefix, self.dir.join("/"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let b = BaseUrl::parse("http://Example.com:8080/a/b").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.host_header.as_str()),
            ("example.com", 8080, "example.com:8080")
        );
        assert_eq!(b.target("../c/x").unwrap(), "/a/c/x");
        let b = BaseUrl::parse("https://h").unwrap();
        assert_eq!((b.port, b.host_header.as_str(), b.https), (443, "h", true));
        assert_eq!(b.target("manifest").unwrap(), "/manifest");
        let b = BaseUrl::parse("http://[::1]:81/x/").unwrap();
        assert_eq!((b.host.as_str(), b.addr()), ("::1", "[::1]:81".to_string()));
        for bad in [
            "http://",
            "http://h:0/",
            "http://h:99999/",
            "http://u@h/",
            "http://h/a?b",
            "http://h/a b",
            "http://h/../x",
            "http://h:8x/",
            "http://[::1/",
            "ftp://h/",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn describe_and_display() {
        let b = BaseUrl::parse("http://h:8080/a/b/").unwrap();
        assert_eq!(b.describe("../x"), "http://h:8080/a/x");
        assert_eq!(b.describe("/bad"), "http://h:8080/a/b//bad");
        assert_eq!(b.to_string(), "http://h:8080/a/b");
    }
}
