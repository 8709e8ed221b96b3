//! [`ClientOptions`]: where the broker is and how to talk to it.

use std::time::Duration;

use crate::client::Client;
use crate::error::{Error, Result};

/// How a [`Client`] connects. Build with [`Client::builder`] or [`ClientOptions::new`], then
/// call [`ClientOptions::connect`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub(crate) url: String,
    pub(crate) token: Option<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_budget: Duration,
    pub(crate) lazy: bool,
}

impl ClientOptions {
    /// Options for the broker at `addr`: a URL (`http://host:port`) or `host:port`.
    pub fn new(addr: impl AsRef<str>) -> ClientOptions {
        ClientOptions {
            url: addr.as_ref().trim().to_string(),
            token: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            retry_budget: Duration::from_secs(60),
            lazy: false,
        }
    }

    /// The bearer token sent with every call. Defaults to none. An empty token means none.
    pub fn token(mut self, token: impl Into<String>) -> ClientOptions {
        let token = token.into();
        self.token = if token.is_empty() { None } else { Some(token) };
        self
    }

    /// How long to wait for a TCP connection. Defaults to 5s.
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientOptions {
        self.connect_timeout = timeout;
        self
    }

    /// Bound of one unary call (a long-poll adds its wait to it). Defaults to 30s.
    pub fn request_timeout(mut self, timeout: Duration) -> ClientOptions {
        self.request_timeout = timeout;
        self
    }

    /// How long an idempotent call keeps retrying while the broker cannot be reached (a
    /// restart, say) before it fails with [`Error::Connection`]. Defaults to 60s; zero
    /// disables retries.
    pub fn retry_budget(mut self, budget: Duration) -> ClientOptions {
        self.retry_budget = budget;
        self
    }

    /// Connect on first use instead of in [`ClientOptions::connect`]. Defaults to false, so that
    /// an unreachable broker is reported at once.
    pub fn lazy(mut self, lazy: bool) -> ClientOptions {
        self.lazy = lazy;
        self
    }

    /// Connects to the broker.
    ///
    /// Fails with [`Error::InvalidArgument`] for an address that is not a URL or `host:port`,
    /// and (unless lazy) with [`Error::Connection`] when the broker cannot be reached.
    pub async fn connect(self) -> Result<Client> {
        Client::from_options(self).await
    }

    /// The normalised broker URL (`http://host:port`).
    pub(crate) fn normalized_url(&self) -> Result<String> {
        normalize_url(&self.url)
    }
}

/// Turns `host:port` or a URL into an `http://` URL; rejects what tonic cannot use.
pub(crate) fn normalize_url(addr: &str) -> Result<String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(Error::InvalidArgument("the broker address is empty".into()));
    }
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    if url.starts_with("https://") {
        return Err(Error::InvalidArgument(format!(
            "{addr}: TLS is not supported yet; use http:// (or host:port)"
        )));
    }
    if !url.starts_with("http://") {
        return Err(Error::InvalidArgument(format!(
            "{addr}: the broker address must be http://host:port or host:port"
        )));
    }
    let uri: tonic::transport::Uri = url.parse().map_err(|e| {
        Error::InvalidArgument(format!("{addr} is not a valid broker address: {e}"))
    })?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(Error::InvalidArgument(format!(
            "{addr}: the broker address names no host"
        )));
    }
    if uri.port().is_none() {
        return Err(Error::InvalidArgument(format!(
            "{addr}: the broker address names no port (e.g. 127.0.0.1:50051)"
        )));
    }
    Ok(url.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_normalise() {
        assert_eq!(
            normalize_url("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(normalize_url("http://h:1/").unwrap(), "http://h:1");
        assert!(normalize_url("https://h:1").is_err());
        assert!(normalize_url("").is_err());
        assert!(normalize_url("h").is_err());
        assert!(normalize_url("ftp://h:1").is_err());
        assert!(normalize_url("not a host:x").is_err());
    }
}
