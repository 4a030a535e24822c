//! TLS for the gRPC port (rustls through tonic): the server's certificate and key, and
//! optionally a CA whose client certificates are required (mutual TLS). Files are read once at
//! start; a missing or unreadable one stops the start with the path in the error.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Where the PEM files are. Part of [`super::server::ServeConfig`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) that signs client certificates; when set, a client without a certificate
    /// it signed is refused during the handshake.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files and builds tonic's server configuration.
    pub fn load(&self) -> anyhow::Result<ServerTlsConfig> {
        let identity = Identity::from_pem(
            read(&self.cert, "--tls-cert")?,
            read(&self.key, "--tls-key")?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
        }
        Ok(config)
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{flag}: reading {}", path.display()))?;
    anyhow::ensure!(
        bytes.windows(11).any(|w| w == b"-----BEGIN "),
        "{flag}: {} is not a PEM file",
        path.display()
    );
    Ok(bytes)
}
