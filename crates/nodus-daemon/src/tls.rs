//! TLS for cluster links (`cds:`): every node presents a certificate signed by the cluster CA and
//! requires the same of its peer, in both directions (mutual authentication). rustls with the
//! ring provider; PEM files named in the `[cluster]` configuration.

use crate::config::ClusterConfig;
use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The acceptor and connector of one node.
#[derive(Clone)]
pub struct Tls {
    /// For the TLS cluster listener.
    pub acceptor: TlsAcceptor,
    /// For dialing neighbours.
    pub connector: TlsConnector,
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM certificate in {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate found in {}", path.display());
    }
    Ok(certs)
}

impl Tls {
    /// Loads the node's certificate, key and the cluster CA; `None` when TLS is not configured.
    ///
    /// Fails when a file is missing or invalid, or the key does not match the certificate.
    pub fn load(c: &ClusterConfig) -> anyhow::Result<Option<Tls>> {
        if !c.tls() {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs(&c.tls_cert)?;
        let key = PrivateKeyDer::from_pem_file(&c.tls_key)
            .with_context(|| format!("cannot read a private key from {}", c.tls_key.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&c.tls_ca)? {
            roots.add(ca).context("invalid cluster CA certificate")?;
        }
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .context("cannot build the client certificate verifier")?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the TLS key does not match the certificate")?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("the TLS key does not match the certificate")?;
        Ok(Some(Tls { acceptor: TlsAcceptor::from(Arc::new(server)), connector: TlsConnector::from(Arc::new(client)) }))
    }
}

/// The name a neighbour's certificate must carry: the host part of `host:port`.
///
/// Fails when the host is neither an IP address nor a DNS name.
pub fn server_name(addr: &str) -> anyhow::Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).with_context(|| format!("{host:?} is not a valid TLS server name"))
}
