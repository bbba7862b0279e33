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

/// The DNS name a node's certificate carries for peers: how replicas tell each other apart.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.tally")
}

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

    /// Issues node `id`'s certificate: valid for `localhost` and 127.0.0.1 (clients) and for
    /// `node-<id>.tally` (peers check it against the node id a replica claims). Returns
    /// (cert PEM, key PEM).
    pub fn issue(&self, id: u64) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let names = vec![
            SERVER_NAME.to_string(),
            "127.0.0.1".to_string(),
            node_name(id),
        ];
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tally node {id}"));
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

/// What every new operator starts from: a chain id, a CA (`ca.pem`), the operator signing key
/// (`operator.key`) and a deposit key (`deposit.key`), written into `dir`.
struct OperatorFiles {
    chain_id: [u8; 32],
    ca: Ca,
    operator: SigningKey,
    deposit: SigningKey,
}

impl OperatorFiles {
    fn create(dir: &Path, ca_name: &str) -> Result<OperatorFiles> {
        fs::create_dir_all(dir)?;
        let files = OperatorFiles {
            chain_id: random_chain_id(),
            ca: Ca::generate(ca_name)?,
            operator: SigningKey::generate(&mut OsRng),
            deposit: SigningKey::generate(&mut OsRng),
        };
        write_new(&dir.join("ca.pem"), &files.ca.cert_pem, false)?;
        write_signing_key(&dir.join("operator.key"), &files.operator)?;
        write_signing_key(&dir.join("deposit.key"), &files.deposit)?;
        Ok(files)
    }
}

/// Writes the client profile of an operator whose files (`ca.pem`, `deposit.key`) are in `abs`.
fn write_profile(
    path: &Path,
    chain_id: [u8; 32],
    operator: &SigningKey,
    abs: &Path,
    replicas: Vec<ReplicaAddress>,
) -> Result<()> {
    let profile = Profile {
        chain_id: hex::encode(chain_id),
        operator_public_key: hex::encode(operator.verifying_key().to_bytes()),
        ca_cert: abs.join("ca.pem"),
        server_name: SERVER_NAME.to_string(),
        deposit_key: Some(abs.join("deposit.key")),
        replicas,
    };
    write_new(path, &profile.to_toml_string()?, false)
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
    let OperatorFiles {
        chain_id,
        ca,
        operator,
        deposit,
    } = OperatorFiles::create(data_dir, "tally development CA")?;
    let (cert, key) = ca.issue(1)?;
    write_new(&data_dir.join("node.pem"), &cert, false)?;
    write_new(&data_dir.join("node.key"), &key, true)?;

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
    let replicas = vec![ReplicaAddress {
        id: config.node.id,
        address: config.listen.client.to_string(),
    }];
    write_profile(&profile_path, chain_id, &operator, &abs, replicas)?;
    config.resolve_paths(data_dir);
    Ok((config, profile_path))
}

/// Port layout of `init-cluster`: node K listens for clients on `base + K`, for peers on
/// `base + 100 + K` and for metrics on `base + 200 + K`.
pub fn cluster_addresses(
    base_port: u16,
    id: u64,
) -> (
    std::net::SocketAddr,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let at = |offset: u64| -> std::net::SocketAddr {
        let port = base_port as u64 + offset + id;
        assert!(
            port <= u16::MAX as u64,
            "base port too high for this many nodes"
        );
        std::net::SocketAddr::from(([127, 0, 0, 1], port as u16))
    };
    (at(0), at(100), at(200))
}

/// `tally-server init-cluster`: everything a local N-replica operator needs in `dir`: a CA, node
/// certificates, the operator key, a deposit key, `nodeK.toml` for each replica (data in
/// `dir/nodeK/`) and `profile.toml` listing every replica.
pub fn init_cluster(nodes: u64, dir: &Path, base_port: u16) -> Result<Vec<PathBuf>> {
    if !(1..=9).contains(&nodes) {
        bail!("--nodes must be between 1 and 9 (got {nodes})");
    }
    if dir.exists() && fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: refusing to overwrite an operator's files",
            dir.display()
        );
    }
    let OperatorFiles {
        chain_id,
        ca,
        operator,
        deposit,
    } = OperatorFiles::create(dir, "tally operator CA")?;
    let ids: Vec<u64> = (1..=nodes).collect();
    let mut paths = Vec::new();
    for &id in &ids {
        let (cert, key) = ca.issue(id)?;
        write_new(&dir.join(format!("node{id}.pem")), &cert, false)?;
        write_new(&dir.join(format!("node{id}.key")), &key, true)?;
        let mut config = Config::dev_default(PathBuf::from(format!("node{id}")), chain_id);
        config.node.id = id;
        let (client, peer, metrics) = cluster_addresses(base_port, id);
        config.listen.client = client;
        config.listen.peer = peer;
        config.listen.metrics = metrics;
        if let Some(tls) = config.tls.as_mut() {
            tls.ca_cert = PathBuf::from("ca.pem");
            tls.cert = PathBuf::from(format!("node{id}.pem"));
            tls.key = PathBuf::from(format!("node{id}.key"));
        }
        if let Some(op) = config.operator.as_mut() {
            op.signing_key = PathBuf::from("operator.key");
            op.deposit_keys = vec![hex::encode(deposit.verifying_key().to_bytes())];
        }
        config.peers = ids
            .iter()
            .filter(|&&p| p != id)
            .map(|&p| {
                let (client, peer, _) = cluster_addresses(base_port, p);
                tally_config::PeerConfig {
                    id: p,
                    address: peer,
                    client_address: client,
                }
            })
            .collect();
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("generated config for node {id} is invalid:\n{e}"))?;
        let path = dir.join(format!("node{id}.toml"));
        let text = format!(
            "# tally replica {id} of {nodes}, generated by init-cluster. Paths are relative to this file.\n{}",
            config.to_toml_string()
        );
        write_new(&path, &text, false)?;
        paths.push(path);
    }
    let abs = fs::canonicalize(dir)?;
    let replicas = ids
        .iter()
        .map(|&id| ReplicaAddress {
            id,
            address: cluster_addresses(base_port, id).0.to_string(),
        })
        .collect();
    write_profile(
        &dir.join("profile.toml"),
        chain_id,
        &operator,
        &abs,
        replicas,
    )?;
    Ok(paths)
}
