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

/// The operator keys a replica's config names (`[operator]`): the configured signing key, the
/// next one ahead of a rotation, and the ledger's genesis public key (`genesis_public_key`, or
/// the configured key's): the one place that decides them, for the server and for a restore.
pub struct OperatorKeyFiles {
    pub configured: SigningKey,
    pub next: Option<SigningKey>,
    pub genesis: tally_wire::PublicKey,
}

impl OperatorKeyFiles {
    pub fn read(config: &tally_config::Config) -> Result<OperatorKeyFiles> {
        let op_cfg = config.operator.as_ref().context("[operator] is required")?;
        let configured = read_signing_key(&op_cfg.signing_key)?;
        let next = match &op_cfg.next_signing_key {
            Some(path) => Some(read_signing_key(path)?),
            None => None,
        };
        let genesis = config
            .genesis_public_key_bytes()
            .unwrap_or_else(|| configured.verifying_key().to_bytes());
        Ok(OperatorKeyFiles {
            configured,
            next,
            genesis,
        })
    }

    /// The keys that sign headers (PROTOCOL.md §4.14).
    pub fn signing_keys(&self) -> tally_core::key_chain::SigningKeys {
        use tally_core::crypto::OperatorKey;
        tally_core::key_chain::SigningKeys::new(
            OperatorKey::new(self.configured.clone()),
            self.next.clone().map(OperatorKey::new),
            self.genesis,
        )
    }
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
/// operator signing key (`operator.key`), a deposit key (`deposit.key`) and an admin key
/// (`admin.key`, which signs membership changes), written into `dir`. Private keys get mode
/// 0600.
struct OperatorFiles {
    chain_id: [u8; 32],
    ca: Ca,
    operator: SigningKey,
    deposit: SigningKey,
    admin: SigningKey,
}

impl OperatorFiles {
    fn create(dir: &Path, ca_name: &str) -> Result<OperatorFiles> {
        create_private_dir(dir)?;
        let files = OperatorFiles {
            chain_id: random_chain_id(),
            ca: Ca::generate(ca_name)?,
            operator: SigningKey::generate(&mut OsRng),
            deposit: SigningKey::generate(&mut OsRng),
            admin: SigningKey::generate(&mut OsRng),
        };
        write_new(&dir.join("ca.pem"), &files.ca.cert_pem, false)?;
        write_new(&dir.join("ca.key"), &files.ca.key_pem(), true)?;
        write_signing_key(&dir.join("operator.key"), &files.operator)?;
        write_signing_key(&dir.join("deposit.key"), &files.deposit)?;
        write_signing_key(&dir.join("admin.key"), &files.admin)?;
        Ok(files)
    }

    /// `[cluster]` of every replica of this operator: its admin key, and `voters` as the
    /// initial voters.
    fn cluster(&self, voters: &[u64]) -> tally_config::ClusterConfig {
        tally_config::ClusterConfig {
            admin_keys: vec![hex::encode(self.admin.verifying_key().to_bytes())],
            initial_voters: Some(voters.to_vec()),
        }
    }
}

/// Writes the client profile of an operator whose files (`ca.pem`, `deposit.key`,
/// `admin.key`) are in `abs`.
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
        admin_key: Some(abs.join("admin.key")),
        witness_quorum: 0,
        witnesses: Vec::new(),
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
    let files = OperatorFiles::create(data_dir, "tally development CA")?;
    // The development operator is reached on 127.0.0.1; its certificate is still not valid
    // for `localhost` (clients use the profile's server name).
    let (cert, key) = files.ca.issue(1, &CertOptions::default())?;
    write_new(&data_dir.join("node.pem"), &cert, false)?;
    write_new(&data_dir.join("node.key"), &key, true)?;

    // Paths in the written config are relative to the data directory, so it can be moved.
    let mut config = Config::dev_default(PathBuf::from("."), files.chain_id);
    if let Some(op) = config.operator.as_mut() {
        op.deposit_keys = vec![hex::encode(files.deposit.verifying_key().to_bytes())];
    }
    config.cluster = files.cluster(&[config.node.id]);
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
    write_profile(
        &profile_path,
        files.chain_id,
        &files.operator,
        &abs,
        replicas,
    )?;
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
    config.cluster = files.cluster(ids);
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
    let ca = load_ca(dir, ca_name)?;
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

/// The CA `<name>.pem` / `<name>.key` in `dir`, refused with the way out when its key was not
/// kept or group or others may read it.
fn load_ca(dir: &Path, name: &str) -> Result<Ca> {
    let ca_cert = dir.join(format!("{name}.pem"));
    let ca_key = dir.join(format!("{name}.key"));
    if !ca_key.exists() {
        bail!(
            "{} does not exist: this CA's key was not kept (operators made before tally kept \
             ca.key), so it cannot issue; rotate to a new CA (docs/OPERATING.md, \
             \"Certificates: renewal and CA rotation\")",
            ca_key.display()
        );
    }
    Ca::load(&ca_cert, &ca_key)
}

/// The largest node id `--add-node` accepts: beyond it, node K's client port `base + K` would be
/// another node's peer port (`base + 100 + K'`).
pub const ADDED_NODE_ID_MAX: u64 = 99;

/// What `init-cluster --add-node` wrote, and where the new replica listens.
#[derive(Debug)]
pub struct AddedNode {
    pub id: u64,
    /// `DIR/node<id>.toml`.
    pub config: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Its `listen.peer`: what `tally cluster add --address` takes.
    pub peer_address: std::net::SocketAddr,
    /// Its `listen.client`: what `tally cluster add --client-address` takes.
    pub client_address: std::net::SocketAddr,
    /// The cluster's original voters, written as its `cluster.initial_voters`.
    pub initial_voters: Vec<u64>,
}

/// `init-cluster --add-node ID`: the files of a new replica `id` in an existing `init-cluster`
/// directory `dir`, from the CA there (`ca.pem`, `ca.key`): `node<id>.pem`, `node<id>.key` and
/// `node<id>.toml`, whose `[[peers]]` are every `node<K>.toml` in `dir`. Its other settings
/// (chain id, operator and deposit keys, archive, tuning, admin keys) are the lowest existing
/// node's; its `cluster.initial_voters` are the cluster's original voters, so it starts as a
/// non-member. Appends it to `dir/profile.toml`'s `[[replicas]]`. Other nodes' files are not
/// touched. Everything is checked before anything is written.
pub fn add_node(dir: &Path, id: u64, base_port: u16, certs: &CertOptions) -> Result<AddedNode> {
    let config_path = unused_config_path(dir, id)?;
    let existing = existing_nodes(dir)?;
    let initial_voters = original_voters(&existing)?;
    if initial_voters.contains(&id) {
        bail!(
            "--add-node {id}: node {id} was one of the cluster's initial voters \
             {initial_voters:?}; a new replica needs an id that was never used (raft must \
             never see a removed id come back)"
        );
    }
    let (cert_path, key_path) = unused_node_paths(dir, id)?;
    let ca = load_ca(dir, "ca")?;
    let config = added_node_config(&existing, id, base_port, &initial_voters)?;
    let (client, peer) = (config.listen.client, config.listen.peer);
    let profile_path = dir.join("profile.toml");
    let profile = fs::read_to_string(&profile_path)
        .with_context(|| format!("reading {}", profile_path.display()))?;
    let profile = with_replica(&profile, id, client)
        .with_context(|| format!("adding node {id} to {}", profile_path.display()))?;

    let (cert, key) = ca.issue(id, certs)?;
    write_new(&cert_path, &cert, false)?;
    write_new(&key_path, &key, true)?;
    let text = format!(
        "# tally replica {id}, added by init-cluster --add-node to a cluster started with \
         {initial_voters:?}. Paths are relative to this file.\n{}",
        config.to_toml_string()
    );
    write_new(&config_path, &text, false)?;
    replace_file(&profile_path, &profile)?;
    Ok(AddedNode {
        id,
        config: config_path,
        cert: cert_path,
        key: key_path,
        peer_address: peer,
        client_address: client,
        initial_voters,
    })
}

/// `DIR/node<id>.toml` for a new replica `id`, refusing an id out of range or one whose
/// config file already exists.
fn unused_config_path(dir: &Path, id: u64) -> Result<PathBuf> {
    if !(1..=ADDED_NODE_ID_MAX).contains(&id) {
        bail!(
            "--add-node {id}: node ids are 1..={ADDED_NODE_ID_MAX} (node K listens on \
             base-port + K, + 100 + K and + 200 + K)"
        );
    }
    let config_path = dir.join(format!("node{id}.toml"));
    if config_path.exists() {
        bail!(
            "{} exists: node {id} is already part of this operator; a new replica needs an \
             id that was never used",
            config_path.display()
        );
    }
    Ok(config_path)
}

/// The certificate and key paths of a new replica `id` in `dir`, refusing them (or its data
/// directory) if something is left there of an earlier node `id`.
fn unused_node_paths(dir: &Path, id: u64) -> Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join(format!("node{id}.pem"));
    let key_path = dir.join(format!("node{id}.key"));
    let data_dir = dir.join(format!("node{id}"));
    for path in [&cert_path, &key_path, &data_dir] {
        if path.exists() {
            bail!(
                "{} exists: remove what is left of an earlier node {id}, or choose another id",
                path.display()
            );
        }
    }
    Ok((cert_path, key_path))
}

/// The config of a new replica `id`: the lowest existing node's, with its own id, data
/// directory, addresses (from `base_port`) and certificate, every existing node as a peer,
/// and the cluster's original voters as its `cluster.initial_voters`. Refuses one that would
/// not validate.
fn added_node_config(
    existing: &[(u64, Config)],
    id: u64,
    base_port: u16,
    initial_voters: &[u64],
) -> Result<Config> {
    let template = &existing[0].1;
    let (client, peer, metrics) = checked_cluster_addresses(base_port, id)?;
    let mut config = template.clone();
    config.node.id = id;
    config.node.data_dir = PathBuf::from(format!("node{id}"));
    config.listen.client = client;
    config.listen.peer = peer;
    config.listen.metrics = metrics;
    let tls = config
        .tls
        .as_mut()
        .with_context(|| format!("node{}.toml has no [tls]", existing[0].0))?;
    tls.cert = PathBuf::from(format!("node{id}.pem"));
    tls.key = PathBuf::from(format!("node{id}.key"));
    config.cluster.initial_voters = Some(initial_voters.to_vec());
    config.peers = existing
        .iter()
        .map(|(k, _)| {
            let (address, client_address) = advertised(existing, *k)?;
            Ok(tally_config::PeerConfig {
                id: *k,
                address,
                client_address,
            })
        })
        .collect::<Result<_>>()?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("the config for node {id} would be invalid:\n{e}"))?;
    Ok(config)
}

/// [`cluster_addresses`], refusing ports beyond 65535 instead of panicking.
fn checked_cluster_addresses(
    base_port: u16,
    id: u64,
) -> Result<(
    std::net::SocketAddr,
    std::net::SocketAddr,
    std::net::SocketAddr,
)> {
    if u64::from(base_port) + 200 + id > u64::from(u16::MAX) {
        bail!("--base-port {base_port} is too high for node {id}: its metrics port passes 65535");
    }
    Ok(cluster_addresses(base_port, id))
}

/// Every `node<K>.toml` in `dir`, parsed, by ascending id. Each must be node K's (`node.id`).
fn existing_nodes(dir: &Path) -> Result<Vec<(u64, Config)>> {
    let mut nodes = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node")?.strip_suffix(".toml"))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u64>().ok())
        else {
            continue;
        };
        let path = dir.join(&name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let config = Config::from_toml_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
        if config.node.id != id {
            bail!(
                "{} says node.id = {}: the file name and the id must agree",
                path.display(),
                config.node.id
            );
        }
        nodes.push((id, config));
    }
    if nodes.is_empty() {
        bail!(
            "{} holds no node<K>.toml: --add-node adds to a directory init-cluster made",
            dir.display()
        );
    }
    nodes.sort_by_key(|(id, _)| *id);
    Ok(nodes)
}

/// The voters the cluster was created with: `cluster.initial_voters` of every node file that
/// writes it (they must agree), or, for a cluster made before the key existed, the ids of the
/// node files.
fn original_voters(nodes: &[(u64, Config)]) -> Result<Vec<u64>> {
    let mut found: Option<(u64, Vec<u64>)> = None;
    for (id, config) in nodes {
        if config.cluster.initial_voters.is_none() {
            continue;
        }
        let voters = config.initial_voters();
        match &found {
            None => found = Some((*id, voters)),
            Some((first, theirs)) if *theirs != voters => bail!(
                "node{first}.toml and node{id}.toml disagree on cluster.initial_voters \
                 ({theirs:?}, {voters:?}): fix the one that was edited"
            ),
            Some(_) => {}
        }
    }
    Ok(match found {
        Some((_, voters)) => voters,
        None => nodes.iter().map(|(id, _)| *id).collect(),
    })
}

/// Where node `id` is reached: its own `listen.peer` and `listen.client`, unless it binds an
/// unspecified address (`0.0.0.0`) or port 0; then what another node's `[[peers]]` entry for
/// it says.
fn advertised(
    nodes: &[(u64, Config)],
    id: u64,
) -> Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    let dialable = |a: &std::net::SocketAddr| !a.ip().is_unspecified() && a.port() != 0;
    let own = &nodes.iter().find(|(k, _)| *k == id).expect("a known id").1;
    if dialable(&own.listen.peer) && dialable(&own.listen.client) {
        return Ok((own.listen.peer, own.listen.client));
    }
    nodes
        .iter()
        .flat_map(|(_, config)| &config.peers)
        .find(|peer| peer.id == id)
        .map(|peer| (peer.address, peer.client_address))
        .with_context(|| {
            format!(
                "node{id}.toml listens on {} (peer) and {} (client), which cannot be dialled, \
                 and no other node file names its address in [[peers]]",
                own.listen.peer, own.listen.client
            )
        })
}

/// `profile` (a client profile's text) with node `id` at `client` appended to its
/// `[[replicas]]`, the rest of the text unchanged. Refuses a profile that lists `id` already.
fn with_replica(profile: &str, id: u64, client: std::net::SocketAddr) -> Result<String> {
    let replicas = |text: &str| -> Result<Vec<u64>> {
        let table: toml::Table = text.parse().context("not TOML")?;
        let Some(replicas) = table.get("replicas") else {
            return Ok(Vec::new());
        };
        let replicas = replicas
            .as_array()
            .context("replicas is not an array of tables")?;
        replicas
            .iter()
            .map(|r| {
                r.get("id")
                    .and_then(toml::Value::as_integer)
                    .and_then(|id| u64::try_from(id).ok())
                    .context("a replica without an integer id")
            })
            .collect()
    };
    if replicas(profile)?.contains(&id) {
        bail!("it lists replica {id} already");
    }
    let separator = if profile.is_empty() || profile.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let text = format!(
        "{profile}{separator}\n[[replicas]]\nid = {id}\naddress = {}\n",
        toml::Value::from(client.to_string())
    );
    // An inline `replicas = [...]` cannot be continued with a table header.
    match replicas(&text) {
        Ok(ids) if ids.last() == Some(&id) => Ok(text),
        _ => bail!("its [[replicas]] cannot be appended to; add node {id} by hand"),
    }
}

/// Replaces `path` with `contents` through a temporary file and a rename, keeping its mode.
fn replace_file(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("toml.tmp");
    let permissions = fs::metadata(path)?.permissions();
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, permissions)?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn config(path: &Path) -> Config {
        Config::from_toml_str(&fs::read_to_string(path).unwrap()).unwrap()
    }

    fn profile(dir: &Path) -> toml::Table {
        fs::read_to_string(dir.join("profile.toml"))
            .unwrap()
            .parse()
            .unwrap()
    }

    fn replica_ids(profile: &toml::Table) -> Vec<i64> {
        profile["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_integer().unwrap())
            .collect()
    }

    fn admin_public_key(dir: &Path) -> String {
        hex::encode(
            read_signing_key(&dir.join("admin.key"))
                .unwrap()
                .verifying_key()
                .to_bytes(),
        )
    }

    #[test]
    fn init_cluster_writes_an_admin_key_and_the_initial_voters() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("op");
        init_cluster(3, &dir, 7400).unwrap();
        #[cfg(unix)]
        for key in [
            "admin.key",
            "ca.key",
            "operator.key",
            "deposit.key",
            "node2.key",
        ] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        let admin = admin_public_key(&dir);
        for id in 1..=3 {
            let config = config(&dir.join(format!("node{id}.toml")));
            assert_eq!(config.cluster.admin_keys, std::slice::from_ref(&admin));
            assert_eq!(config.cluster.initial_voters, Some(vec![1, 2, 3]));
            config.validate().unwrap();
        }
        let profile = profile(&dir);
        let abs = fs::canonicalize(&dir).unwrap();
        assert_eq!(
            profile["admin_key"].as_str().unwrap(),
            abs.join("admin.key").to_str().unwrap()
        );
        assert_eq!(replica_ids(&profile), [1, 2, 3]);
    }

    #[test]
    fn the_development_operator_has_an_admin_key() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("tally-data");
        let (config, profile_path) = dev_operator(&data).unwrap();
        #[cfg(unix)]
        for key in ["admin.key", "ca.key", "operator.key"] {
            assert_eq!(mode(&data.join(key)), 0o600, "{key}");
        }
        assert_eq!(config.cluster.admin_keys, [admin_public_key(&data)]);
        assert_eq!(config.cluster.initial_voters, Some(vec![1]));
        assert_eq!(config.initial_voters(), [1]);
        let profile: toml::Table = fs::read_to_string(profile_path).unwrap().parse().unwrap();
        let admin_key = PathBuf::from(profile["admin_key"].as_str().unwrap());
        assert_eq!(
            admin_key,
            fs::canonicalize(&data).unwrap().join("admin.key")
        );
        // A second start reuses everything.
        let (again, _) = dev_operator(&data).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn add_node_writes_a_non_member_and_leaves_the_others_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("op");
        init_cluster(3, &dir, 7400).unwrap();
        let before: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && !p.ends_with("profile.toml"))
            .map(|p| (p.clone(), fs::read(&p).unwrap()))
            .collect();
        let profile_before = fs::read_to_string(dir.join("profile.toml")).unwrap();

        let added = add_node(&dir, 4, 7400, &CertOptions::default()).unwrap();
        let (client, peer, metrics) = cluster_addresses(7400, 4);
        assert_eq!(added.config, dir.join("node4.toml"));
        assert_eq!((added.client_address, added.peer_address), (client, peer));
        assert_eq!(added.initial_voters, [1, 2, 3]);
        for (path, bytes) in &before {
            assert_eq!(
                &fs::read(path).unwrap(),
                bytes,
                "{} changed",
                path.display()
            );
        }
        #[cfg(unix)]
        assert_eq!(mode(&dir.join("node4.key")), 0o600);

        let node1 = config(&dir.join("node1.toml"));
        let node4 = config(&dir.join("node4.toml"));
        node4.validate().unwrap();
        assert_eq!(node4.node.id, 4);
        assert_eq!(node4.node.data_dir, Path::new("node4"));
        assert_eq!(node4.node.chain_id, node1.node.chain_id);
        assert_eq!(
            (node4.listen.client, node4.listen.peer, node4.listen.metrics),
            (client, peer, metrics)
        );
        let tls = node4.tls.as_ref().unwrap();
        assert_eq!(tls.cert, Path::new("node4.pem"));
        assert_eq!(tls.key, Path::new("node4.key"));
        assert_eq!(node4.operator, node1.operator);
        assert_eq!(node4.archive, node1.archive);
        assert_eq!(node4.cluster.admin_keys, node1.cluster.admin_keys);
        assert_eq!(node4.cluster.initial_voters, Some(vec![1, 2, 3]));
        assert_eq!(node4.initial_voters(), [1, 2, 3]);
        let peers: Vec<_> = node4
            .peers
            .iter()
            .map(|p| (p.id, p.address, p.client_address))
            .collect();
        let expected: Vec<_> = (1..=3)
            .map(|k| {
                let (client, peer, _) = cluster_addresses(7400, k);
                (k, peer, client)
            })
            .collect();
        assert_eq!(peers, expected);

        // The profile keeps its text and gains node 4.
        let text = fs::read_to_string(dir.join("profile.toml")).unwrap();
        assert!(text.starts_with(&profile_before), "{text}");
        let profile = profile(&dir);
        assert_eq!(replica_ids(&profile), [1, 2, 3, 4]);
        assert_eq!(
            profile["replicas"][3]["address"].as_str(),
            Some("127.0.0.1:7404")
        );

        // Existing ids, initial voters, and what would clash are refused; nothing is written.
        let err = format!(
            "{:#}",
            add_node(&dir, 4, 7400, &CertOptions::default()).unwrap_err()
        );
        assert!(err.contains("node4.toml exists"), "{err}");
        let err = format!(
            "{:#}",
            add_node(&dir, 2, 7400, &CertOptions::default()).unwrap_err()
        );
        assert!(err.contains("node2.toml exists"), "{err}");
        fs::rename(dir.join("node3.toml"), tmp.path().join("node3.toml")).unwrap();
        let err = format!(
            "{:#}",
            add_node(&dir, 3, 7400, &CertOptions::default()).unwrap_err()
        );
        assert!(err.contains("initial voters"), "{err}");
        fs::rename(tmp.path().join("node3.toml"), dir.join("node3.toml")).unwrap();
        for bad in [0, 100] {
            assert!(add_node(&dir, bad, 7400, &CertOptions::default()).is_err());
        }
        assert!(add_node(&dir, 5, 65400, &CertOptions::default()).is_err());
        assert!(!dir.join("node5.pem").exists());
        assert_eq!(replica_ids(&self::profile(&dir)), [1, 2, 3, 4]);

        // The next one lists node 4 as a peer too, with the same original voters.
        add_node(&dir, 5, 7400, &CertOptions::default()).unwrap();
        let node5 = config(&dir.join("node5.toml"));
        let ids: Vec<u64> = node5.peers.iter().map(|p| p.id).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(node5.initial_voters(), [1, 2, 3]);
    }

    #[test]
    fn add_node_needs_the_ca_key_and_agreeing_voters() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("op");
        init_cluster(2, &dir, 7400).unwrap();
        let key = fs::read(dir.join("ca.key")).unwrap();
        fs::remove_file(dir.join("ca.key")).unwrap();
        let err = format!(
            "{:#}",
            add_node(&dir, 3, 7400, &CertOptions::default()).unwrap_err()
        );
        assert!(err.contains("ca.key does not exist"), "{err}");
        write_new(
            &dir.join("ca.key"),
            std::str::from_utf8(&key).unwrap(),
            true,
        )
        .unwrap();

        // Node 2 says otherwise: the files disagree.
        let path = dir.join("node2.toml");
        let mut node2 = config(&path);
        node2.cluster.initial_voters = Some(vec![1, 2, 9]);
        fs::write(&path, node2.to_toml_string()).unwrap();
        let err = format!(
            "{:#}",
            add_node(&dir, 3, 7400, &CertOptions::default()).unwrap_err()
        );
        assert!(err.contains("disagree on cluster.initial_voters"), "{err}");

        // A cluster made before the key existed: the ids of the node files.
        for id in [1, 2] {
            let path = dir.join(format!("node{id}.toml"));
            let mut node = config(&path);
            node.cluster = tally_config::ClusterConfig::default();
            fs::write(&path, node.to_toml_string()).unwrap();
        }
        add_node(&dir, 3, 7400, &CertOptions::default()).unwrap();
        let node3 = config(&dir.join("node3.toml"));
        assert_eq!(node3.cluster.initial_voters, Some(vec![1, 2]));
        assert!(node3.cluster.admin_keys.is_empty());
    }

    #[test]
    fn profile_edits_keep_the_text() {
        let text = "chain_id = \"x\"\n\n[[replicas]]\nid = 1\naddress = \"a:1\"\n";
        let grown = with_replica(text, 2, "127.0.0.1:7402".parse().unwrap()).unwrap();
        assert_eq!(
            grown,
            format!("{text}\n[[replicas]]\nid = 2\naddress = \"127.0.0.1:7402\"\n")
        );
        assert!(with_replica(text, 1, "127.0.0.1:7401".parse().unwrap()).is_err());
        let inline = "chain_id = \"x\"\nreplicas = [{ id = 1, address = \"a:1\" }]\n";
        let err = with_replica(inline, 2, "127.0.0.1:7402".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("by hand"), "{err}");
        assert!(with_replica("chain_id = \"x\"\n", 1, "127.0.0.1:7401".parse().unwrap()).is_ok());
    }
}
