//! The listener's driver: accepts TCP connections (optionally TLS), serves HTTP/1.1 and
//! HTTP/2 on each with hyper, and shuts down gracefully.
//!
//! Bounds: open connections ([`ServeOptions::max_connections`]; more are closed at once and
//! counted), the wait for a request's headers ([`ServeOptions::header_read_timeout`]) and for
//! the TLS handshake ([`ServeOptions::tls_handshake_timeout`]). Shutdown: stop accepting, end
//! the live feeds, let requests in flight finish within [`ServeOptions::shutdown_grace`], then
//! close what is left.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::front::Peer;
use crate::metrics::Metrics;

/// Listener bounds and timeouts.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Longest wait for a request's headers on a connection (also closes idle keep-alive
    /// connections that start a request and stall).
    pub header_read_timeout: Duration,
    /// Longest TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// On shutdown, how long requests in flight may take before connections are closed.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// `certificates` or `a private key`.
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key does not match the certificate, or rustls refused the set-up.
    #[error("invalid TLS set-up: {0}")]
    Config(String),
}

/// A TLS acceptor for the HTTP listener from a PEM certificate chain and key (rustls with the
/// ring provider; ALPN offers HTTP/2 and HTTP/1.1).
///
/// # Errors
/// [`TlsError`] when a file cannot be read, holds no certificate or key, or the key does not
/// match.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |what, path: &Path, reason: String| TlsError::Pem { what, path: path.display().to_string(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem("certificates", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem("certificates", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem("certificates", cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem("a private key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` until `shutdown` completes, then drains (see the module doc).
/// `stop` is cancelled when shutdown begins, so long-lived responses (the live feed) end.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    options: ServeOptions,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let max = options.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let graceful = GracefulShutdown::new();
    let force = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused("limit");
            tracing::debug!(peer = %addr, limit = max, "HTTP connection limit reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        metrics.connection_opened();
        let (router, builder, watcher, force, metrics, tls) =
            (router.clone(), builder.clone(), graceful.watcher(), force.clone(), metrics.clone(), tls.clone());
        let handshake = options.tls_handshake_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(stream, Peer { addr, tls: false }, router, builder, watcher, &force).await,
                Some(acceptor) => match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => connection(s, Peer { addr, tls: true }, router, builder, watcher, &force).await,
                    Ok(Err(e)) => {
                        metrics.connection_refused("tls");
                        tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.connection_refused("tls");
                        tracing::debug!(peer = %addr, "TLS handshake timed out");
                    }
                },
            }
            metrics.connection_closed();
        });
    }
    drop(listener);
    stop.cancel();
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::info!(grace = ?options.shutdown_grace, "HTTP requests still open after the grace period; closing them");
    }
    force.cancel();
    // Every connection task holds a slot until it has ended.
    let _ = slots.acquire_many(max as u32).await;
}

async fn connection<S>(
    stream: S,
    peer: Peer,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    force: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(peer);
        router.clone().oneshot(req)
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
    tokio::select! {
        r = watcher.watch(conn) => {
            if let Err(e) = r {
                tracing::debug!(peer = %peer.addr, error = %e, "HTTP connection ended with an error");
            }
        }
        _ = force.cancelled() => {}
    }
}
