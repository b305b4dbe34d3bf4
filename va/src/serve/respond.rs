//! Choosing the response to a request: file lookup, conditional requests, ranges, status
//! and header fields.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tracing::warn;

use super::http_date::http_date;
use super::request::{decode_target, etag_matches_list, parse_range, RequestHead, ResolvedRange};
use crate::sys::{self, Errno};

/// `Cache-Control` of content-addressed files (under a `packs/` directory).
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The response chosen for a request, before it is written.
pub(super) struct Response {
    /// The status code.
    pub(super) status: u16,
    /// Header fields besides those every response gets (`Date`, `Content-Length`, ...).
    pub(super) headers: Vec<(&'static str, String)>,
    /// What follows the head (nothing for HEAD requests).
    pub(super) body: ResponseBody,
    /// Close the connection after this response.
    pub(super) close: bool,
}

/// The body of a [`Response`].
pub(super) enum ResponseBody {
    /// No body.
    Empty,
    /// A short text (error messages).
    Text(String),
    /// `len` bytes of `file` from `offset`.
    FileRange {
        /// The open file.
        file: File,
        /// Where the bytes start.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
}

impl Response {
    /// A plain-text error response; the connection closes after the statuses that leave the
    /// request stream unreliable.
    pub(super) fn error(status: u16, msg: &str) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: ResponseBody::Text(format!("{status} {msg}\n")),
            close: matches!(status, 400 | 413 | 431 | 505),
        }
    }

    /// The length of the body, as sent in `Content-Length`.
    pub(super) fn body_len(&self) -> u64 {
        match &self.body {
            ResponseBody::Empty => 0,
            ResponseBody::Text(t) => t.len() as u64,
            ResponseBody::FileRange { len, .. } => *len,
        }
    }
}

/// The reason phrase of a status code.
pub(super) fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Chooses the response to a parsed request: finds the file, checks the preconditions and
/// the range, and sets the status and header fields.
pub(super) fn response_for(root: &Path, req: &RequestHead) -> Response {
    if req.has_body {
        let mut r = Response::error(413, "request bodies are not accepted");
        r.close = true;
        return r;
    }
    let head = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Response::error(405, reason_phrase(405));
            r.headers.push(("Allow", "GET, HEAD".into()));
            return r;
        }
    };
    let segments = match decode_target(&req.target) {
        Ok(s) => s,
        Err(status) => return Response::error(status, reason_phrase(status)),
    };
    let mut path = root.to_path_buf();
    for s in &segments {
        path.push(std::ffi::OsStr::from_bytes(s));
    }
    // Non-blocking, so that opening a FIFO cannot hang the connection.
    let file = match sys::open_read_nonblocking(&path) {
        Ok(f) => f,
        Err(e) => return open_failure(&e),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return open_failure(&e),
    };
    if meta.is_dir() {
        return Response::error(403, "directory listing is not supported");
    }
    if !meta.is_file() {
        return Response::error(403, "not a regular file");
    }
    let size = meta.len();
    let etag = format!(
        "\"{:x}-{:x}-{:x}{:08x}\"",
        meta.ino(),
        size,
        meta.mtime(),
        meta.mtime_nsec()
    );
    let modified = http_date(meta.mtime());
    let in_packs =
        segments.len() > 1 && segments[..segments.len() - 1].iter().any(|s| s == b"packs");
    let cache = if in_packs { IMMUTABLE } else { "no-cache" };
    let mut headers = vec![
        ("ETag", etag.clone()),
        ("Last-Modified", modified.clone()),
        ("Cache-Control", cache.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    let not_modified = match (&req.if_none_match, &req.if_modified_since) {
        (Some(list), _) => etag_matches_list(list, &etag),
        (None, Some(since)) => *since == modified,
        (None, None) => false,
    };
    if not_modified {
        headers.retain(|(n, _)| *n != "Accept-Ranges");
        return Response {
            status: 304,
            headers,
            body: ResponseBody::Empty,
            close: false,
        };
    }
    let range = match (&req.range, head) {
        (Some(r), false) => {
            let current = match &req.if_range {
                None => true,
                Some(v) if v.starts_with('"') => *v == etag,
                Some(v) => *v == modified,
            };
            if current {
                parse_range(r, size)
            } else {
                ResolvedRange::Full
            }
        }
        _ => ResolvedRange::Full,
    };
    headers.push(("Content-Type", "application/octet-stream".into()));
    match range {
        ResolvedRange::Full => Response {
            status: 200,
            headers,
            body: ResponseBody::FileRange {
                file,
                offset: 0,
                len: size,
            },
            close: false,
        },
        ResolvedRange::Single(a, b) => {
            headers.push(("Content-Range", format!("bytes {a}-{b}/{size}")));
            Response {
                status: 206,
                headers,
                body: ResponseBody::FileRange {
                    file,
                    offset: a,
                    len: b - a + 1,
                },
                close: false,
            }
        }
        ResolvedRange::Unsatisfiable => {
            headers.retain(|(n, _)| *n == "Accept-Ranges" || *n == "Cache-Control");
            headers.push(("Content-Range", format!("bytes */{size}")));
            Response {
                status: 416,
                headers,
                body: ResponseBody::Empty,
                close: false,
            }
        }
    }
}

/// The response when the requested file cannot be opened.
fn open_failure(e: &io::Error) -> Response {
    match e.kind() {
        ErrorKind::NotFound => Response::error(404, reason_phrase(404)),
        ErrorKind::PermissionDenied => Response::error(403, reason_phrase(403)),
        _ if matches!(sys::errno(e), Some(Errno::NOTDIR | Errno::NAMETOOLONG)) => {
            Response::error(404, reason_phrase(404))
        }
        _ if sys::errno(e) == Some(Errno::LOOP) => Response::error(403, reason_phrase(403)),
        _ => {
            warn!("open: {e}");
            Response::error(500, reason_phrase(500))
        }
    }
}
