//! What the proxy knows about the client connection a request came on.
//!
//! The connection layer (listener, TLS, protocol negotiation) fills it in once per connection;
//! the proxy reads it per request (forwarded headers, HTTPS redirects, rate-limit keys, logs).

use std::net::SocketAddr;

#[derive(Debug)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The gateway address the client connected to.
    pub local: SocketAddr,
    /// True when the connection is TLS-terminated by the gateway.
    pub tls: bool,
    /// TLS server name the client asked for (SNI), lower-cased.
    pub sni: Option<String>,
    /// Process-unique connection number, for logs.
    pub id: u64,
    /// The forwarding headers' per-connection part, computed on the first proxied request.
    forwarding: std::sync::OnceLock<crate::headers::Forwarding>,
}

impl ConnInfo {
    /// A plain-text connection.
    pub fn plain(peer: SocketAddr, local: SocketAddr, id: u64) -> Self {
        Self {
            peer,
            local,
            tls: false,
            sni: None,
            id,
            forwarding: std::sync::OnceLock::new(),
        }
    }

    /// A TLS-terminated connection.
    pub fn tls(peer: SocketAddr, local: SocketAddr, id: u64, sni: Option<String>) -> Self {
        Self {
            tls: true,
            sni,
            ..Self::plain(peer, local, id)
        }
    }

    pub(crate) fn forwarding(&self) -> &crate::headers::Forwarding {
        self.forwarding
            .get_or_init(|| crate::headers::Forwarding::new(self.peer, self.scheme()))
    }

    /// The scheme clients used to reach the gateway: `X-Forwarded-Proto` and `Forwarded`.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}
