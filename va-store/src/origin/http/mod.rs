//! The HTTP(S) origin: HTTP/1.1 over a keep-alive connection pool shared by all threads.
//!
//! A small purpose-built client rather than a general one, so that every reply can be checked
//! exactly (status, `Content-Range`, framing, length), the number of connections is capped,
//! connections are counted, bodies land directly in the caller's buffer, and no reply can make
//! it panic.
//!
//! Read top-down:
//!
//! * this module: [`HttpOrigin`] and its [`Origin`] methods;
//! * [`exchange`]: one request from first attempt to last (retries, backoff, reply checks);
//! * [`request`]: the [`Request`] value, its [`RequestHooks`], and its rendering to bytes;
//! * [`pool`]: the keep-alive pool and the limit on connections in use;
//! * [`conn`]: one connection (TCP, TLS) and its read buffer; the TLS configuration;
//! * [`head`]: reading and parsing a response head, and `Content-Range` values;
//! * [`url`]: the base URL and the request target of each bundle file.

mod conn;
mod exchange;
mod head;
mod pool;
mod request;
mod url;

use std::sync::Arc;

use rustls::pki_types::ServerName;

pub use conn::TlsConfigError;
pub use request::{ByteRange, Request, RequestError, RequestHook, RequestHooks};

use super::{
    range_desc, FileSize, Origin, OriginCounters, OriginError, OriginOptions, OriginStats,
};
use exchange::RequestedBytes;
use pool::ConnectionPool;
use url::BaseUrl;

/// A bundle served over HTTP/1.1 (`http://` or `https://`).
pub struct HttpOrigin {
    base: BaseUrl,
    opts: OriginOptions,
    /// The client configuration for `https://` origins (`None` for `http://`).
    tls: Option<Arc<rustls::ClientConfig>>,
    pool: ConnectionPool,
    stats: OriginCounters,
}

impl std::fmt::Debug for HttpOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOrigin")
            .field("base", &self.base.to_string())
            .field("opts", &self.opts)
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl HttpOrigin {
    /// An origin for base URL `url` (a directory; a trailing '/' is implied). Nothing is
    /// connected until the first request.
    pub fn new(url: &str, opts: &OriginOptions) -> Result<Self, OriginError> {
        Self::with_tls(url, opts, None)
    }

    /// Like [`HttpOrigin::new`], with a TLS configuration of the caller's for `https://` URLs
    /// instead of the process-wide one (Mozilla roots plus `SSL_CERT_FILE`).
    pub fn with_tls(
        url: &str,
        opts: &OriginOptions,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, OriginError> {
        let base = BaseUrl::parse(url)?;
        let tls = match (base.https, tls) {
            (false, _) => None,
            (true, Some(cfg)) => Some(cfg),
            (true, None) => Some(conn::tls_config().map_err(|source| OriginError::TlsSetup {
                url: url.to_string(),
                source,
            })?),
        };
        if base.https {
            ServerName::try_from(base.host.clone()).map_err(|e| OriginError::BadUrl {
                url: url.to_string(),
                why: format!("not a valid TLS server name: {e}"),
            })?;
        }
        Ok(HttpOrigin {
            base,
            opts: opts.clone(),
            tls,
            pool: ConnectionPool::new(opts.max_connections),
            stats: OriginCounters::default(),
        })
    }
}

impl Origin for HttpOrigin {
    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, OriginError> {
        self.get_range_streaming(path, offset, len, &mut |_| {})
    }

    fn get_range_streaming(
        &self,
        path: &str,
        offset: u64,
        len: u64,
        progress: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<u8>, OriginError> {
        if offset.checked_add(len).is_none() {
            return Err(OriginError::OutOfRange {
                what: format!("GET {} {}", self.describe(path), range_desc(offset, len)),
                size: FileSize(None),
            });
        }
        if len == 0 {
            self.base.target(path)?;
            return Ok(Vec::new());
        }
        self.fetch(path, RequestedBytes::Range { offset, len }, progress)
    }

    fn get_file(&self, path: &str, max_len: u64) -> Result<Vec<u8>, OriginError> {
        self.fetch(path, RequestedBytes::WholeFile { max_len }, &mut |_| {})
    }

    fn describe(&self, path: &str) -> String {
        self.base.describe(path)
    }

    fn stats(&self) -> OriginStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
