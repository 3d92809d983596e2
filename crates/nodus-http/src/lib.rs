//! nodus HTTP: one listener serving a Cocaine-compatible gateway to apps, the live dashboard,
//! the API and Prometheus metrics (axum on hyper).
//!
//! Pure cores: [`cocaine`] (routing and the request/response chunks of Cocaine's HTTP
//! protocol) and [`access`] (who may do what). Drivers: [`gateway`] (HTTP request → app
//! invocation through the node's locator), [`dashboard`] (embedded page and server-sent
//! events), [`metrics`] (the registry and `/metrics`), [`server`] (accept loop, TLS, graceful
//! shutdown). The node's state reaches the HTTP side only through the [`NodeView`] trait.
//!
//! ```no_run
//! # async fn demo(view: std::sync::Arc<dyn nodus_http::NodeView>) -> std::io::Result<()> {
//! use nodus_http::{Http, HttpConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4080").await?;
//! let http = Http::new(HttpConfig::default(), Default::default())
//!     .with_gateway("127.0.0.1:10053", None) // the node's locator
//!     .with_view(view);
//! http.serve(listener, None, async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```

pub mod access;
pub mod api;
pub mod cocaine;
pub mod dashboard;
mod front;
pub mod gateway;
pub mod metrics;
pub mod server;
pub mod view;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use access::{Policy, PublicRoute};
pub use api::{Api, ApiError, Caller};
pub use dashboard::Feed;
pub use front::Peer;
pub use gateway::{Gateway, GatewayConfig, GatewayError};
pub use metrics::Metrics;
pub use server::{serve, tls_acceptor, ServeOptions, TlsError};
pub use view::{NodeView, Notice, NoticeKind, Snapshot};

/// Everything the listener is configured with.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// The node's token; beyond loopback every request needs it but public gateway routes.
    /// `None`: only loopback and public routes are open.
    pub token: Option<String>,
    /// Gateway routes open to anyone (`APP` or `APP/EVENT`).
    pub public: Vec<PublicRoute>,
    /// Require the token from loopback peers too (set it when a reverse proxy on the same host
    /// forwards outside traffic).
    pub token_on_loopback: bool,
    /// Gateway bounds and timeouts.
    pub gateway: GatewayConfig,
    /// Listener bounds and timeouts.
    pub serve: ServeOptions,
    /// Pace of the dashboard's live feed.
    pub feed: Feed,
}

/// One HTTP listener's routes and state. Build it, add the parts the node has, then
/// [`Http::serve`] it (or mount [`Http::router`] elsewhere).
pub struct Http {
    config: HttpConfig,
    metrics: Arc<Metrics>,
    gateway: Option<Arc<Gateway>>,
    view: Option<Arc<dyn NodeView>>,
    api: Option<Api>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http").field("config", &self.config).field("gateway", &self.gateway).finish_non_exhaustive()
    }
}

impl Http {
    /// A listener with no gateway and no node state yet (both answer an error until added).
    /// `metrics` is the node's registry: other parts may register into it too.
    pub fn new(config: HttpConfig, metrics: Arc<Metrics>) -> Http {
        Http { config, metrics, gateway: None, view: None, api: None, stop: CancellationToken::new() }
    }

    /// Adds the gateway to apps, reached through the locator at `locator` (`host:port`); apps
    /// of `local` (the node's own engine) are invoked on it directly.
    pub fn with_gateway(mut self, locator: impl Into<String>, local: Option<nodus_engine::Engine>) -> Http {
        let gateway = Gateway::new(locator, local, self.config.gateway.clone(), self.metrics.clone());
        self.gateway = Some(Arc::new(gateway));
        self
    }

    /// Adds the node's state, for the dashboard, the API and the metrics.
    pub fn with_view(mut self, view: Arc<dyn NodeView>) -> Http {
        self.view = Some(view);
        self
    }

    /// Adds the REST API over the node's connections.
    pub fn with_api(mut self, api: Api) -> Http {
        self.api = Some(api);
        self
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Every route, as one axum router. Requests must carry a [`Peer`] extension (the
    /// server adds it); a request without one is treated as coming from beyond loopback.
    pub fn router(&self) -> axum::Router {
        front::router(front::Shared {
            gateway: self.gateway.clone(),
            view: self.view.clone(),
            api: self.api.clone(),
            policy: Arc::new(
                Policy::new(self.config.token.clone(), self.config.public.clone())
                    .token_on_loopback(self.config.token_on_loopback),
            ),
            metrics: self.metrics.clone(),
            feed: self.config.feed,
            stop: self.stop.clone(),
        })
    }

    /// Serves on `listener` (TLS when `tls` is given) until `shutdown` completes, then drains
    /// within the configured grace period.
    pub async fn serve(self, listener: TcpListener, tls: Option<TlsAcceptor>, shutdown: impl Future<Output = ()>) {
        let router = self.router();
        server::serve(
            listener,
            router,
            tls,
            self.config.serve.clone(),
            self.metrics.clone(),
            self.stop.clone(),
            shutdown,
        )
        .await;
    }
}
