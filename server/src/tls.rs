//! rustls configuration from the operator's PEM files. The ring provider is used explicitly so
//! that no process-wide default has to be installed.

use std::fs;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(&text[..]))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    tally_client::check_private_file(path)?;
    let text = fs::read(path).with_context(|| format!("reading TLS key {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(&text[..]))
        .with_context(|| format!("{}: not a PEM private key", path.display()))?
        .ok_or_else(|| anyhow!("{}: no private key in the file", path.display()))
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("TLS certificate and key do not match")?;
    Ok(Arc::new(config))
}
