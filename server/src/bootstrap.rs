//! Key material and files for operators: the development operator that `tally-server` starts
//! with no arguments, `init-cluster`, and its certificate renewal and CA rotation
//! (certificates themselves: [`crate::certs`]).
//!
//! Everything is generated once and reused on the next start, so restarting the development
//! operator keeps its ledger, keys and certificate.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use tally_client::{Profile, ReplicaAddress};
use tally_config::Config;

pub use crate::certs::{node_name, Ca, CertOptions, SERVER_NAME};

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

/// Writes an Ed25519 key as PKCS#8 v1 PEM (what OpenSSL and Python's `cryptography` read) to a
/// new file, mode 0600.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<()> {
    write_new(path, &tally_client::key_pem(key), true)
}

/// Reads an Ed25519 PKCS#8 PEM key, refusing a file group or others may access.
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    Ok(tally_client::load_key(path)?)
}

/// Creates `dir` and its missing parents with mode 0700, whatever the umask (unix): a data
/// directory holds the ledger and, in the development operator, private keys. An existing
/// directory is left as it is (the operator chose its mode).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // The umask may have taken bits from 0700 too; set it exactly.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode 0700 on {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// What every new operator starts from: a chain id, a CA (`ca.pem`, its key `ca.key`), the
/// operator signing key (`operator.key`) and a deposit key (`deposit.key`), written into `dir`.
struct OperatorFiles {
    chain_id: [u8; 32],
    ca: Ca,
    operator: SigningKey,
    deposit: SigningKey,
}

impl OperatorFiles {
    fn create(dir: &Path, ca_name: &str) -> Result<OperatorFiles> {
        create_private_dir(dir)?;
        let files = OperatorFiles {
            chain_id: random_chain_id(),
            ca: Ca::generate(ca_name)?,
            operator: SigningKey::generate(&mut OsRng),
            deposit: SigningKey::generate(&mut OsRng),
        };
        write_new(&dir.join("ca.pem"), &files.ca.cert_pem, false)?;
        write_new(&dir.join("ca.key"), &files.ca.key_pem(), true)?;
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
    // The development operator is reached on 127.0.0.1; its certificate is still not valid
    // for `localhost` (clients use the profile's server name).
    let (cert, key) = ca.issue(1, &CertOptions::default())?;
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
/// `dir/nodeK/`) and `profile.toml` listing every replica. Certificates as
/// [`CertOptions::default`].
pub fn init_cluster(nodes: u64, dir: &Path, base_port: u16) -> Result<Vec<PathBuf>> {
    init_cluster_with(nodes, dir, base_port, &CertOptions::default())
}

/// [`init_cluster`] with node certificates made as `certs` says.
pub fn init_cluster_with(
    nodes: u64,
    dir: &Path,
    base_port: u16,
    certs: &CertOptions,
) -> Result<Vec<PathBuf>> {
    if !(1..=9).contains(&nodes) {
        bail!("--nodes must be between 1 and 9 (got {nodes})");
    }
    if dir.exists() && fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: refusing to overwrite an operator's files",
            dir.display()
        );
    }
    let files = OperatorFiles::create(dir, "tally operator CA")?;
    let ids: Vec<u64> = (1..=nodes).collect();
    let mut paths = Vec::new();
    for &id in &ids {
        let (cert, key) = files.ca.issue(id, certs)?;
        write_new(&dir.join(format!("node{id}.pem")), &cert, false)?;
        write_new(&dir.join(format!("node{id}.key")), &key, true)?;
        let config = node_config(&files, &ids, id, base_port)?;
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
        files.chain_id,
        &files.operator,
        &abs,
        replicas,
    )?;
    Ok(paths)
}

/// Replica `id`'s config in an `init-cluster` directory, validated.
fn node_config(files: &OperatorFiles, ids: &[u64], id: u64, base_port: u16) -> Result<Config> {
    let mut config = Config::dev_default(PathBuf::from(format!("node{id}")), files.chain_id);
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
        op.deposit_keys = vec![hex::encode(files.deposit.verifying_key().to_bytes())];
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
    Ok(config)
}

/// `init-cluster --renew-node ID`: a new certificate and key for node `id` from the CA
/// `<ca_name>.pem` / `<ca_name>.key` in `dir`, written as `node<id>.pem.new` and
/// `node<id>.key.new` (never over existing files). Returns their paths.
pub fn renew_node_cert(
    dir: &Path,
    id: u64,
    ca_name: &str,
    certs: &CertOptions,
) -> Result<(PathBuf, PathBuf)> {
    if id == 0 {
        bail!("--renew-node: node ids start at 1");
    }
    let ca_cert = dir.join(format!("{ca_name}.pem"));
    let ca_key = dir.join(format!("{ca_name}.key"));
    if !ca_key.exists() {
        bail!(
            "{} does not exist: this CA's key was not kept (operators made before tally kept \
             ca.key), so it cannot issue; rotate to a new CA (docs/OPERATING.md, \
             \"Certificates: renewal and CA rotation\")",
            ca_key.display()
        );
    }
    let ca = Ca::load(&ca_cert, &ca_key)?;
    let (cert, key) = ca.issue(id, certs)?;
    let cert_path = dir.join(format!("node{id}.pem.new"));
    let key_path = dir.join(format!("node{id}.key.new"));
    write_new(&cert_path, &cert, false)?;
    write_new(&key_path, &key, true)?;
    Ok((cert_path, key_path))
}

/// `init-cluster --new-ca NAME`: a new CA beside the current one, `<name>.pem` and
/// `<name>.key` in `dir`, plus `<name>-bundle.pem`: the current `ca.pem` followed by the new
/// CA, which every replica and client trusts during a rotation. Returns the paths written.
pub fn new_ca(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    if name.is_empty()
        || name == "ca"
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("--new-ca {name:?}: use letters, digits, '-' or '_', and not \"ca\"");
    }
    let mut current = fs::read_to_string(dir.join("ca.pem"))
        .with_context(|| format!("reading {}", dir.join("ca.pem").display()))?;
    if !current.ends_with('\n') {
        current.push('\n');
    }
    let ca = Ca::generate(&format!("tally operator CA {name}"))?;
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let bundle = dir.join(format!("{name}-bundle.pem"));
    write_new(&cert, &ca.cert_pem, false)?;
    write_new(&key, &ca.key_pem(), true)?;
    write_new(&bundle, &format!("{}{}", current, ca.cert_pem), false)?;
    Ok(vec![cert, key, bundle])
}
