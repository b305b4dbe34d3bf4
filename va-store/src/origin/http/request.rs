//! HTTP requests as values: built, changed by the origin's hooks, then rendered to bytes.
//!
//! Every request an [`HttpOrigin`](super::HttpOrigin) sends is first a [`Request`]: method,
//! target, an ordered list of header fields, and the byte range asked for. The origin's
//! [`RequestHooks`] (from [`OriginOptions::request_hooks`]) run on it in order, for every
//! attempt (so a signature made by a hook is fresh on each retry), and then
//! [`Request::to_bytes`], the one place a request becomes bytes, checks and renders it.
//!
//! A hook may add, replace or remove headers and change the target (e.g. add a query string
//! for a pre-signed URL). It must not change what is asked for: the reply is checked against
//! the range the origin asked for, whatever `range` says when the request is sent.
//!
//! [`OriginOptions::request_hooks`]: crate::origin::OriginOptions::request_hooks

use std::fmt;
use std::sync::Arc;

/// A byte range of a file: `len` bytes (at least 1) from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Number of bytes (at least 1).
    pub len: u64,
}

impl ByteRange {
    /// The last byte of the range.
    pub fn last(&self) -> u64 {
        self.offset + self.len.max(1) - 1
    }
}

/// One HTTP/1.1 request, before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target: an absolute path, optionally with `?query`, e.g.
    /// `/app/packs/<hex>.pack`.
    pub target: String,
    /// Header fields in the order they are sent (`Host` first). Names are matched without
    /// regard to case by [`Request::header`] and [`Request::set_header`].
    pub headers: Vec<(String, String)>,
    /// The byte range asked for, sent as the last header (`Range: bytes=<first>-<last>`).
    pub range: Option<ByteRange>,
}

/// Why a request cannot be sent as it is (after a hook changed it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The method is not an HTTP token.
    #[error("invalid method {0:?}")]
    Method(String),
    /// The target is not an absolute path of visible ASCII.
    #[error("invalid request target {0:?}")]
    Target(String),
    /// A header name is not an HTTP token.
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    /// A header value holds a control character (such as CR or LF).
    #[error("invalid value of header {name:?}")]
    HeaderValue {
        /// The header's name.
        name: String,
    },
    /// A `Range` header in the list, although ranges go in [`Request::range`].
    #[error("a Range header must be given as the request's range")]
    RangeHeader,
}

/// Whether `s` is an HTTP token (RFC 9110 `tchar`s, at least one).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

impl Request {
    /// A `GET` of `target` from host `host` (the `Host` header value), with the headers every
    /// request of this client carries: `Host`, `User-Agent`, `Accept-Encoding: identity`.
    pub fn get(target: &str, host: &str, range: Option<ByteRange>) -> Request {
        Request {
            method: "GET".into(),
            target: target.into(),
            headers: vec![
                ("Host".into(), host.into()),
                (
                    "User-Agent".into(),
                    format!("vastream/{}", env!("CARGO_PKG_VERSION")),
                ),
                ("Accept-Encoding".into(), "identity".into()),
            ],
            range,
        }
    }

    /// The value of the first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Sets header `name`: replaces the value of the first header of that name (any case) and
    /// removes any others, or appends it.
    pub fn set_header(&mut self, name: &str, value: &str) {
        let mut seen = false;
        self.headers.retain_mut(|(n, v)| {
            if !n.eq_ignore_ascii_case(name) {
                return true;
            }
            if seen {
                return false;
            }
            seen = true;
            *v = value.to_string();
            true
        });
        if !seen {
            self.headers.push((name.to_string(), value.to_string()));
        }
    }

    /// Removes every header named `name` (any case).
    pub fn remove_header(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// The value of the `Range` header this request sends, if any: `bytes=<first>-<last>`.
    pub fn range_header(&self) -> Option<String> {
        self.range
            .map(|r| format!("bytes={}-{}", r.offset, r.last()))
    }

    /// Checks the request and renders it as it goes on the wire: the request line, the
    /// headers in order, the `Range` header, and the empty line.
    pub fn to_bytes(&self) -> Result<Vec<u8>, RequestError> {
        if !is_token(&self.method) {
            return Err(RequestError::Method(self.method.clone()));
        }
        if !self.target.starts_with('/') || !self.target.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RequestError::Target(self.target.clone()));
        }
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        for (name, value) in &self.headers {
            if !is_token(name) {
                return Err(RequestError::HeaderName(name.clone()));
            }
            if name.eq_ignore_ascii_case("range") {
                return Err(RequestError::RangeHeader);
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(RequestError::HeaderValue { name: name.clone() });
            }
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        if let Some(range) = self.range_header() {
            out.push_str("Range: ");
            out.push_str(&range);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        Ok(out.into_bytes())
    }
}

/// Something that changes each request of an HTTP origin before it is sent: signs it, adds
/// custom headers or credentials. Closures `Fn(&mut Request) + Send + Sync` are hooks.
///
/// Hooks run for every attempt (so a signature is fresh on each retry), in the order of the
/// [`RequestHooks`] list, after the origin built the request and before
/// [`Request::to_bytes`] checks and renders it. A hook may add, replace or remove headers and
/// change the target (e.g. add a query string); it must not change what is asked for: the reply
/// is checked against the range the origin asked for.
pub trait RequestHook: Send + Sync {
    /// Changes `request`.
    fn apply(&self, request: &mut Request);
}

impl<F: Fn(&mut Request) + Send + Sync> RequestHook for F {
    fn apply(&self, request: &mut Request) {
        self(request)
    }
}

/// The hooks of an origin, run in the order they were added. Cloning shares the hooks.
///
/// Two lists are equal when they hold the same hooks (the same `Arc`s) in the same order.
#[derive(Clone, Default)]
pub struct RequestHooks(Vec<Arc<dyn RequestHook>>);

impl RequestHooks {
    /// Adds `hook` after the others.
    pub fn push(&mut self, hook: impl RequestHook + 'static) {
        self.0.push(Arc::new(hook));
    }

    /// Adds a shared `hook` after the others.
    pub fn push_shared(&mut self, hook: Arc<dyn RequestHook>) {
        self.0.push(hook);
    }

    /// Number of hooks.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no hooks.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs every hook on `request`, in order.
    pub fn apply(&self, request: &mut Request) {
        for hook in &self.0 {
            hook.apply(request);
        }
    }
}

impl fmt::Debug for RequestHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestHooks({} hooks)", self.0.len())
    }
}

impl PartialEq for RequestHooks {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Eq for RequestHooks {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_exactly_one_request() {
        let r = Request::get(
            "/app/packs/a.pack",
            "h:8080",
            Some(ByteRange {
                offset: 3,
                len: 20_000,
            }),
        );
        assert_eq!(
            String::from_utf8(r.to_bytes().unwrap()).unwrap(),
            format!(
                "GET /app/packs/a.pack HTTP/1.1\r\nHost: h:8080\r\nUser-Agent: vastream/{}\r\n\
                 Accept-Encoding: identity\r\nRange: bytes=3-20002\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
        let whole = Request::get("/app/manifest", "h", None);
        let text = String::from_utf8(whole.to_bytes().unwrap()).unwrap();
        assert!(text.starts_with("GET /app/manifest HTTP/1.1\r\nHost: h\r\n"));
        assert!(!text.contains("Range"));
        assert!(text.ends_with("identity\r\n\r\n"));
    }

    #[test]
    fn headers_are_set_replaced_and_removed_by_name() {
        let mut r = Request::get("/x", "h", None);
        r.set_header("x-amz-date", "1");
        r.set_header("X-Amz-Date", "2");
        assert_eq!(r.header("X-AMZ-DATE"), Some("2"));
        assert_eq!(r.headers.len(), 4);
        r.headers.push(("x-amz-date".into(), "3".into()));
        r.set_header("x-amz-date", "4");
        assert_eq!(
            r.headers.iter().filter(|(n, _)| n == "x-amz-date").count(),
            1
        );
        r.remove_header("USER-AGENT");
        assert_eq!(r.header("user-agent"), None);
        assert_eq!(r.headers[0].0, "Host");
    }

    #[test]
    fn unsendable_requests_are_refused() {
        let ok = Request::get("/x", "h", None);
        let with = |f: &dyn Fn(&mut Request)| {
            let mut r = ok.clone();
            f(&mut r);
            r.to_bytes()
        };
        assert_eq!(
            with(&|r| r.set_header("X-Evil", "a\r\nHost: other")),
            Err(RequestError::HeaderValue {
                name: "X-Evil".into()
            })
        );
        assert!(with(&|r| r.set_header("Bad Name", "v")).is_err());
        assert!(with(&|r| r.set_header("", "v")).is_err());
        assert!(with(&|r| r.set_header("Range", "bytes=0-1")).is_err());
        assert!(with(&|r| r.method = "G T".into()).is_err());
        assert!(with(&|r| r.target = "x".into()).is_err());
        assert!(with(&|r| r.target = "/a b".into()).is_err());
        assert!(with(&|r| r.set_header("X-Tab", "a\tb")).is_ok());
        assert!(with(&|r| r.target = "/x?X-Amz-Signature=ab%2F".into()).is_ok());
    }

    #[test]
    fn hooks_run_in_order_and_compare_by_identity() {
        let mut hooks = RequestHooks::default();
        hooks.push(|r: &mut Request| r.set_header("X-Order", "first"));
        hooks.push(|r: &mut Request| {
            let v = format!("{}, second", r.header("x-order").unwrap_or(""));
            r.set_header("X-Order", &v);
        });
        let mut r = Request::get("/x", "h", None);
        hooks.apply(&mut r);
        assert_eq!(r.header("x-order"), Some("first, second"));
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks.clone(), hooks);
        let mut other = RequestHooks::default();
        other.push(|_: &mut Request| {});
        other.push(|_: &mut Request| {});
        assert_ne!(other, hooks);
        assert_eq!(format!("{hooks:?}"), "RequestHooks(2 hooks)");
    }
}
