//! Key material and files for operators: the development operator that `tally-server` starts
//! with no arguments, and (later) `init-cluster`.
//!
//! Everything is generated once and reused on the next start, so restarting the development
//! operator keeps its ledger, keys and certificate.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tally_client::{Profile, ReplicaAddress};
use tally_config::Config;

/// The TLS name every tally certificate carries, besides the loopback IP.
pub const SERVER_NAME: &str = "localhost";

/// A certificate authority that issues node certificates.
pub struct Ca {
    pub cert_pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn generate(name: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert,
            key,
        })
    }

    /// Issues a certificate for `localhost` / 127.0.0.1 whose common name is `node_name`
    /// (peers check it against the node id they expect). Returns (cert PEM, key PEM).
    pub fn issue(&self, node_name: &str) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_name);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

pub fn random_chain_id() -> [u8; 32] {
    let mut id = [0u8; 32];
    OsRng.fill_bytes(&mut id);
    id
}

/// Writes a new file, refusing to overwrite one (keys are never silently replaced).
pub fn write_new(path: &Path, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<()> {
    use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePrivateKey};
    let pem = key.to_pkcs8_pem(LineEnding::LF).context("encoding key")?;
    write_new(path, &pem, true)
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let text =
        fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&text)
        .with_context(|| format!("{}: not a PKCS#8 PEM Ed25519 key", path.display()))
}

/// The development operator: a single node in `data_dir` (default `./tally-data`) with generated
/// keys, certificate and client profile. Returns the config to run and the profile's path.
pub fn dev_operator(data_dir: &Path) -> Result<(Config, PathBuf)> {
    let config_path = data_dir.join("config.toml");
    let profile_path = data_dir.join("profile.toml");
    if config_path.exists() {
        let text = fs::read_to_string(&config_path)?;
        let mut config = Config::from_toml_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:\n{e}", config_path.display()))?;
        config.resolve_paths(data_dir);
        return Ok((config, profile_path));
    }
    if data_dir.exists() && fs::read_dir(data_dir)?.next().is_some() {
        bail!(
            "{} exists but has no config.toml: refusing to set up a development operator over it",
            data_dir.display()
        );
    }
    fs::create_dir_all(data_dir)?;
    let chain_id = random_chain_id();
    let ca = Ca::generate("tally development CA")?;
    let (cert, key) = ca.issue("tally-node-1")?;
    write_new(&data_dir.join("ca.pem"), &ca.cert_pem, false)?;
    write_new(&data_dir.join("node.pem"), &cert, false)?;
    write_new(&data_dir.join("node.key"), &key, true)?;
    let operator = SigningKey::generate(&mut OsRng);
    let deposit = SigningKey::generate(&mut OsRng);
    write_signing_key(&data_dir.join("operator.key"), &operator)?;
    write_signing_key(&data_dir.join("deposit.key"), &deposit)?;

    // Paths in the written config are relative to the data directory, so it can be moved.
    let mut config = Config::dev_default(PathBuf::from("."), chain_id);
    if let Some(op) = config.operator.as_mut() {
        op.deposit_keys = vec![hex::encode(deposit.verifying_key().to_bytes())];
    }
    let text = format!(
        "# tally development operator, generated on first start. Paths are relative to this file.\n{}",
        config.to_toml_string()
    );
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("generated config is invalid:\n{e}"))?;
    write_new(&config_path, &text, false)?;

    let abs = fs::canonicalize(data_dir)?;
    let profile = Profile {
        chain_id: hex::encode(chain_id),
        operator_public_key: hex::encode(operator.verifying_key().to_bytes()),
        ca_cert: abs.join("ca.pem"),
        server_name: SERVER_NAME.to_string(),
        deposit_key: Some(abs.join("deposit.key")),
        replicas: vec![ReplicaAddress {
            id: config.node.id,
            address: config.listen.client.to_string(),
        }],
    };
    write_new(&profile_path, &profile.to_toml_string()?, false)?;
    config.resolve_paths(data_dir);
    Ok((config, profile_path))
}
