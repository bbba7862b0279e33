//! Key material and files for operators: the development operator that `tally-server` starts
//! with no arguments, `init-cluster`, and its certificate renewal and CA rotation
//! (certificates themselves: [`crate::certs`]).
//!
//! Everything is generated once and reused on the next start, so restarting the development
//! operator keeps its ledger, keys and certificate.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tally_client::{Profile, ReplicaAddress};
use tally_config::Config;
use tally_core::threshold::{Dealt, Share, SignerId};
use tally_wire::PublicKey;

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
    /// Reads the whole keys `[operator]` names; refuses a replica that holds a key share
    /// instead (`operator.signing_key_share`: read it with [`OperatorSecret::read`]).
    pub fn read(config: &tally_config::Config) -> Result<OperatorKeyFiles> {
        let op_cfg = config.operator.as_ref().context("[operator] is required")?;
        let Some(signing_key) = &op_cfg.signing_key else {
            if op_cfg.signing_key_share.is_none() {
                bail!("operator.signing_key is not set (nor operator.signing_key_share)");
            }
            bail!(
                "operator.signing_key is not set: this replica holds a key share \
                 (operator.signing_key_share), not a whole key"
            );
        };
        let configured = read_signing_key(signing_key)?;
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

/// The `format` of a share file, which [`ShareFile`] writes and requires.
pub const SHARE_FILE_FORMAT: &str = "tally-operator-share-v1";

/// One replica's share of a threshold operator key (FROST, issue 20), as
/// `init-cluster --threshold` writes it to `node<id>.share`, mode 0600. The file is one JSON
/// object:
///
/// ```text
/// {"format":"tally-operator-share-v1","signer":1,"threshold":2,"signers":3,
///  "group_public_key":"<64 hex>","key_package":"<hex>","public_key_package":"<hex>"}
/// ```
///
/// `key_package` is the signer's encoded FROST key package (its secret share, from
/// [`Dealt::shares`]), `public_key_package` the group's public shares ([`Dealt::public`]),
/// which whoever aggregates signature shares needs. Reading checks that every field agrees
/// with the others.
pub struct ShareFile {
    /// This share's signer number: the `node.id` of the replica that holds it (`1..=signers`
    /// for a group `init-cluster --threshold` dealt; the members' ids for one `--new-group`
    /// dealt).
    pub signer: u16,
    /// Signers it takes to sign: `2..=signers`.
    pub threshold: u16,
    /// Signers the key was dealt to.
    pub signers: u16,
    /// The group's public key: an ordinary Ed25519 key, the ledger's operator key.
    pub group_key: PublicKey,
    /// The secret share.
    pub share: Share,
    /// The encoded FROST public key package ([`Dealt::public`]).
    pub public: Vec<u8>,
}

/// A share file's JSON object, in the order its fields are written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareJson {
    format: String,
    signer: u16,
    threshold: u16,
    signers: u16,
    group_public_key: String,
    key_package: String,
    public_key_package: String,
}

impl ShareFile {
    /// Writes signer `signer`'s share of `dealt`, any `threshold` of whose signers sign, to
    /// the new file `path` with mode 0600. The text is checked as [`ShareFile::read`] checks
    /// it before it is written, and returned read.
    pub fn write(
        path: &Path,
        dealt: &Dealt,
        signer: SignerId,
        threshold: u16,
    ) -> Result<ShareFile> {
        let key_package = dealt
            .shares
            .get(&signer)
            .with_context(|| format!("no share was dealt to signer {signer}"))?;
        let json = ShareJson {
            format: SHARE_FILE_FORMAT.to_owned(),
            signer,
            threshold,
            signers: u16::try_from(dealt.shares.len()).context("more than 65535 signers")?,
            group_public_key: hex::encode(dealt.group_key),
            key_package: hex::encode(key_package),
            public_key_package: hex::encode(&dealt.public),
        };
        let text = serde_json::to_string(&json).context("encoding a share file")? + "\n";
        let file = Self::parse(&text, path)?;
        write_new(path, &text, true)?;
        Ok(file)
    }

    /// Reads a share file, refusing one that group or others may access (as
    /// [`tally_client::load_key`] does a key), one of another format, and one whose fields
    /// disagree with each other. Every error names the file.
    pub fn read(path: &Path) -> Result<ShareFile> {
        tally_client::check_private_file(path)?;
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading share file {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// The share file `text`, read from `path` (named in every error).
    fn parse(text: &str, path: &Path) -> Result<ShareFile> {
        let bad = |problem: String| anyhow!("share file {}: {problem}", path.display());
        let json: ShareJson = serde_json::from_str(text)
            .map_err(|e| bad(format!("not a {SHARE_FILE_FORMAT} JSON object ({e})")))?;
        if json.format != SHARE_FILE_FORMAT {
            return Err(bad(format!(
                "format is {:?}, not {SHARE_FILE_FORMAT:?}",
                json.format
            )));
        }
        let (signer, threshold, signers) = (json.signer, json.threshold, json.signers);
        if !(2..=signers).contains(&threshold) || signer == 0 {
            return Err(bad(format!(
                "signer {signer} of {signers}, {threshold} of whom sign: out of range (it \
                 takes 2 <= threshold <= signers and a signer number of 1 or more)"
            )));
        }
        let file = Self::decode(&json, &bad)?;
        let (t, n) = file
            .share
            .check_against(&file.public)
            .map_err(|e| bad(format!("key_package and public_key_package disagree: {e}")))?;
        if (t, n) != (threshold, signers) {
            return Err(bad(format!(
                "threshold {threshold} of {signers} signers, but its key packages say {t} of {n}"
            )));
        }
        Ok(file)
    }

    /// The hex fields of `json`, decoded and checked against the signer and the group key it
    /// names. (`bad` makes an error naming the file.)
    fn decode(json: &ShareJson, bad: &dyn Fn(String) -> anyhow::Error) -> Result<ShareFile> {
        // The messages never include the field's text: key_package is secret.
        let hex_field = |name: &str, text: &str| -> Result<Vec<u8>> {
            hex::decode(text).map_err(|_| bad(format!("{name} is not hex")))
        };
        let group_key: PublicKey = hex_field("group_public_key", &json.group_public_key)?
            .try_into()
            .map_err(|_| bad("group_public_key is not 32 bytes (64 hex)".to_owned()))?;
        let share = Share::decode(&hex_field("key_package", &json.key_package)?)
            .map_err(|e| bad(format!("key_package does not decode ({e})")))?;
        let public = hex_field("public_key_package", &json.public_key_package)?;
        let id = share.id().map_err(|e| bad(format!("key_package: {e}")))?;
        if id != json.signer {
            return Err(bad(format!(
                "signer is {}, but key_package is signer {id}'s",
                json.signer
            )));
        }
        let share_group = share
            .group_key()
            .map_err(|e| bad(format!("key_package: {e}")))?;
        if share_group != group_key {
            return Err(bad(format!(
                "group_public_key {} is not key_package's group key {}",
                hex::encode(group_key),
                hex::encode(share_group)
            )));
        }
        Ok(ShareFile {
            signer: json.signer,
            threshold: json.threshold,
            signers: json.signers,
            group_key,
            share,
            public,
        })
    }
}

/// Everything but the secret.
impl std::fmt::Debug for ShareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareFile")
            .field("signer", &self.signer)
            .field("threshold", &self.threshold)
            .field("signers", &self.signers)
            .field("group_key", &hex::encode(self.group_key))
            .finish_non_exhaustive()
    }
}

/// What this replica signs headers with: the whole operator key (`operator.signing_key`, with
/// the keys around a rotation) or its share of a threshold key (`operator.signing_key_share`,
/// with the next group's ahead of a rotation).
// Read once at start: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum OperatorSecret {
    Whole(OperatorKeyFiles),
    Share(ShareFiles),
}

/// A threshold replica's shares: of the group its config names, of the next group ahead of a
/// rotation (`operator.next_signing_key_share`), and the ledger's genesis key
/// (`genesis_public_key`, or the configured group's key).
pub struct ShareFiles {
    pub configured: ShareFile,
    pub next: Option<ShareFile>,
    pub genesis: PublicKey,
}

impl ShareFiles {
    /// The shares, the configured one first.
    pub fn all(self) -> Vec<ShareFile> {
        std::iter::once(self.configured).chain(self.next).collect()
    }

    /// The group keys of the shares held.
    pub fn group_keys(&self) -> Vec<PublicKey> {
        std::iter::once(&self.configured)
            .chain(&self.next)
            .map(|f| f.group_key)
            .collect()
    }
}

impl OperatorSecret {
    /// Reads the key or the key share `[operator]` names (a validated config names exactly
    /// one). A share must be this replica's own: its signer is `node.id`.
    pub fn read(config: &Config) -> Result<OperatorSecret> {
        let op_cfg = config.operator.as_ref().context("[operator] is required")?;
        let (None, Some(path)) = (&op_cfg.signing_key, &op_cfg.signing_key_share) else {
            return Ok(OperatorSecret::Whole(OperatorKeyFiles::read(config)?));
        };
        let configured = Self::own_share(config, path)?;
        let next = match &op_cfg.next_signing_key_share {
            Some(path) => Some(Self::own_share(config, path)?),
            None => None,
        };
        if next
            .as_ref()
            .is_some_and(|n| n.group_key == configured.group_key)
        {
            bail!("operator.next_signing_key_share is a share of the configured group");
        }
        let genesis = config
            .genesis_public_key_bytes()
            .unwrap_or(configured.group_key);
        Ok(OperatorSecret::Share(ShareFiles {
            configured,
            next,
            genesis,
        }))
    }

    /// The share file at `path`, which must be this replica's own: its signer is `node.id`.
    fn own_share(config: &Config, path: &Path) -> Result<ShareFile> {
        let file = ShareFile::read(path)?;
        if u64::from(file.signer) != config.node.id {
            bail!(
                "share file {} holds signer {}'s share, but this replica is node.id = {}: a \
                 replica must hold its own share (node{}.share from init-cluster)",
                path.display(),
                file.signer,
                config.node.id,
                config.node.id
            );
        }
        Ok(file)
    }

    /// The ledger's operator public key: the threshold group's key, or the genesis key of a
    /// whole key's chain.
    pub fn public_key(&self) -> PublicKey {
        match self {
            OperatorSecret::Whole(files) => files.genesis,
            OperatorSecret::Share(files) => files.genesis,
        }
    }
}

impl std::fmt::Debug for OperatorSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OperatorSecret::Whole(files) => f
                .debug_tuple("Whole")
                .field(&hex::encode(files.genesis))
                .finish(),
            OperatorSecret::Share(files) => f
                .debug_tuple("Share")
                .field(&files.configured)
                .field(&files.next)
                .finish(),
        }
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

/// How an operator signs headers: with one whole key, which every replica holds
/// (`operator.key`), or with a threshold key dealt in memory (FROST, issue 20), of which each
/// replica holds one share (`node<id>.share`) and no file holds the whole.
enum OperatorSigning {
    Whole(SigningKey),
    Threshold {
        dealt: Dealt,
        /// Signers it takes to sign.
        threshold: SignerId,
    },
}

impl OperatorSigning {
    /// A threshold key for `nodes` replicas, any majority of which sign (a raft majority: the
    /// replicas that commit a batch can sign it). The dealer's whole key never leaves
    /// `deal`.
    fn deal(nodes: u64) -> Result<OperatorSigning> {
        let n = SignerId::try_from(nodes).context("too many replicas for a threshold key")?;
        let threshold = n / 2 + 1;
        let dealt = tally_core::threshold::deal(n, threshold, &mut OsRng)
            .context("dealing the threshold operator key")?;
        Ok(OperatorSigning::Threshold { dealt, threshold })
    }

    /// The operator's public key: the whole key's, or the threshold group's.
    fn public_key(&self) -> PublicKey {
        match self {
            OperatorSigning::Whole(key) => key.verifying_key().to_bytes(),
            OperatorSigning::Threshold { dealt, .. } => dealt.group_key,
        }
    }
}

/// What every new operator starts from: a chain id, a CA (`ca.pem`, its key `ca.key`), the
/// operator signing key (`operator.key`, unless it is a threshold key: see
/// [`OperatorFiles::write_share`]), a deposit key (`deposit.key`) and an admin key
/// (`admin.key`, which signs membership changes), written into `dir`. Private keys get mode
/// 0600.
struct OperatorFiles {
    chain_id: [u8; 32],
    ca: Ca,
    signing: OperatorSigning,
    deposit: SigningKey,
    admin: SigningKey,
}

impl OperatorFiles {
    /// An operator with a whole signing key.
    fn create(dir: &Path, ca_name: &str) -> Result<OperatorFiles> {
        let signing = OperatorSigning::Whole(SigningKey::generate(&mut OsRng));
        Self::create_with(dir, ca_name, signing)
    }

    /// An operator that signs as `signing` says.
    fn create_with(dir: &Path, ca_name: &str, signing: OperatorSigning) -> Result<OperatorFiles> {
        create_private_dir(dir)?;
        let files = OperatorFiles {
            chain_id: random_chain_id(),
            ca: Ca::generate(ca_name)?,
            signing,
            deposit: SigningKey::generate(&mut OsRng),
            admin: SigningKey::generate(&mut OsRng),
        };
        write_new(&dir.join("ca.pem"), &files.ca.cert_pem, false)?;
        write_new(&dir.join("ca.key"), &files.ca.key_pem(), true)?;
        if let OperatorSigning::Whole(operator) = &files.signing {
            write_signing_key(&dir.join("operator.key"), operator)?;
        }
        write_signing_key(&dir.join("deposit.key"), &files.deposit)?;
        write_signing_key(&dir.join("admin.key"), &files.admin)?;
        Ok(files)
    }

    /// With a threshold key, writes replica `id`'s share to `dir/node<id>.share` (mode 0600)
    /// and returns its name, relative to `dir`; with a whole key, writes nothing.
    fn write_share(&self, dir: &Path, id: u64) -> Result<Option<PathBuf>> {
        let OperatorSigning::Threshold { dealt, threshold } = &self.signing else {
            return Ok(None);
        };
        let signer = SignerId::try_from(id).context("a replica id beyond the signers")?;
        let name = PathBuf::from(format!("node{id}.share"));
        ShareFile::write(&dir.join(&name), dealt, signer, *threshold)?;
        Ok(Some(name))
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
    operator: PublicKey,
    abs: &Path,
    replicas: Vec<ReplicaAddress>,
) -> Result<()> {
    let profile = Profile {
        chain_id: hex::encode(chain_id),
        operator_public_key: hex::encode(operator),
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
        files.signing.public_key(),
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
    check_new_cluster(nodes, dir)?;
    let signing = OperatorSigning::Whole(SigningKey::generate(&mut OsRng));
    write_cluster(nodes, dir, base_port, certs, signing)
}

/// `tally-server init-cluster --threshold`: [`init_cluster_with`], but the operator key is a
/// threshold key (FROST, issue 20) that any majority of the `nodes` replicas signs with
/// (`nodes / 2 + 1` of them). It is dealt in memory: each replica gets its share,
/// `node<K>.share` (mode 0600, a [`ShareFile`]), named by `operator.signing_key_share`, and
/// no file holds the whole key (there is no `operator.key`). The profile's operator key is the
/// group's. Their archive holds every checkpoint's threshold signature and unsigned snapshot
/// manifests (PROTOCOL.md §15.9, §15.10). Needs at least 2 nodes.
pub fn init_threshold_cluster(
    nodes: u64,
    dir: &Path,
    base_port: u16,
    certs: &CertOptions,
) -> Result<Vec<PathBuf>> {
    check_new_cluster(nodes, dir)?;
    if nodes < 2 {
        bail!(
            "--threshold needs --nodes 2 or more (got {nodes}): a key is shared among \
             replicas, and a single-node operator keeps a plain key"
        );
    }
    write_cluster(nodes, dir, base_port, certs, OperatorSigning::deal(nodes)?)
}

/// Refuses a cluster size out of range, or a `dir` that holds anything already.
fn check_new_cluster(nodes: u64, dir: &Path) -> Result<()> {
    if !(1..=9).contains(&nodes) {
        bail!("--nodes must be between 1 and 9 (got {nodes})");
    }
    if dir.exists() && fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: refusing to overwrite an operator's files",
            dir.display()
        );
    }
    Ok(())
}

/// Writes the files of an `init-cluster` directory of `nodes` replicas whose operator signs
/// as `signing` says. Returns the paths of the replicas' configs.
fn write_cluster(
    nodes: u64,
    dir: &Path,
    base_port: u16,
    certs: &CertOptions,
    signing: OperatorSigning,
) -> Result<Vec<PathBuf>> {
    let files = OperatorFiles::create_with(dir, "tally operator CA", signing)?;
    let ids: Vec<u64> = (1..=nodes).collect();
    let mut paths = Vec::new();
    for &id in &ids {
        let (cert, key) = files.ca.issue(id, certs)?;
        write_new(&dir.join(format!("node{id}.pem")), &cert, false)?;
        write_new(&dir.join(format!("node{id}.key")), &key, true)?;
        let share = files.write_share(dir, id)?;
        let how = match &share {
            Some(share) => format!(
                " --threshold, signing with its key share {}",
                share.display()
            ),
            None => String::new(),
        };
        let config = node_config(&files, &ids, id, base_port, share)?;
        let path = dir.join(format!("node{id}.toml"));
        let text = format!(
            "# tally replica {id} of {nodes}, generated by init-cluster{how}. Paths are relative to this file.\n{}",
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
        files.signing.public_key(),
        &abs,
        replicas,
    )?;
    Ok(paths)
}

/// Replica `id`'s config in an `init-cluster` directory, validated. With `share` (the path of
/// its key share, relative to the directory) it signs with that instead of `operator.key`.
fn node_config(
    files: &OperatorFiles,
    ids: &[u64],
    id: u64,
    base_port: u16,
    share: Option<PathBuf>,
) -> Result<Config> {
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
        op.signing_key = match share {
            Some(_) => None,
            None => Some(PathBuf::from("operator.key")),
        };
        op.signing_key_share = share;
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
    /// A threshold operator's replica: it needs a share (`--new-group`) before it starts.
    pub threshold: bool,
}

/// `init-cluster --add-node ID`: the files of a new replica `id` in an existing `init-cluster`
/// directory `dir`, from the CA there (`ca.pem`, `ca.key`): `node<id>.pem`, `node<id>.key` and
/// `node<id>.toml`, whose `[[peers]]` are every `node<K>.toml` in `dir`. Its other settings
/// (chain id, operator and deposit keys, archive, tuning, admin keys) are the lowest existing
/// node's; its `cluster.initial_voters` are the cluster's original voters, so it starts as a
/// non-member. Appends it to `dir/profile.toml`'s `[[replicas]]`. Other nodes' files are not
/// touched. Everything is checked before anything is written. In a threshold operator's
/// directory the new replica holds no share until `--new-group` deals one to it
/// (`groups.rs`).
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
    let mut config = added_node_config(&existing, id, base_port, &initial_voters)?;
    let threshold = is_threshold(&config);
    if threshold {
        added_member_operator(dir, &existing, id, &mut config)?;
    }
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
        threshold,
    })
}

/// The ledger's genesis key: the one the configs name, or the group key of the lowest node's
/// share (a cluster that never rotated).
pub(crate) fn threshold_genesis_key(dir: &Path, existing: &[(u64, Config)]) -> Result<PublicKey> {
    if let Some(key) = existing
        .iter()
        .find_map(|(_, c)| c.genesis_public_key_bytes())
    {
        return Ok(key);
    }
    let held = existing.iter().find_map(|(_, c)| {
        let path = c.operator.as_ref()?.signing_key_share.as_ref()?;
        Some(dir.join(path)).filter(|p| p.exists())
    });
    let path = held.context("--new-group: no replica of this directory holds a share yet")?;
    Ok(ShareFile::read(&path)?.group_key)
}

/// The `[operator]` of a replica `--add-node` adds to a threshold operator's directory: it
/// holds no share until `--new-group` deals one to it (`node<id>.share` stands for it until
/// then), and names the ledger's genesis key.
pub(crate) fn added_member_operator(
    dir: &Path,
    existing: &[(u64, Config)],
    id: u64,
    config: &mut Config,
) -> Result<()> {
    let genesis = threshold_genesis_key(dir, existing)?;
    let operator = config.operator.as_mut().context("[operator] is required")?;
    operator.signing_key_share = Some(PathBuf::from(format!("node{id}.share")));
    operator.next_signing_key_share = None;
    operator.genesis_public_key = Some(hex::encode(genesis));
    Ok(())
}

/// Whether `config` is a threshold operator's replica's (`operator.signing_key_share`).
fn is_threshold(config: &Config) -> bool {
    let operator = config.operator.as_ref();
    operator.is_some_and(|op| op.signing_key_share.is_some())
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
pub(crate) fn existing_nodes(dir: &Path) -> Result<Vec<(u64, Config)>> {
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
pub(crate) fn replace_file(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("toml.tmp");
    let permissions = fs::metadata(path)?.permissions();
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, permissions)?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// A port on 127.0.0.1 that is free now (bound and released), for harnesses that start local
/// clusters (`tally-bench --nodes`, `tally-chaos`, the server's tests). It is chosen below
/// Linux's ephemeral range (32768-60999): a port released before its replica binds it (or while
/// a replica is down for a restart) can meanwhile become the source port of any outgoing
/// connection in that range (a replica dialing its peers), and the replica then cannot bind
/// it ("Address already in use"). No port is handed out twice in one process, so that two
/// listeners of one cluster never get the same one.
pub fn free_local_port() -> std::io::Result<std::net::SocketAddr> {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().expect("port list");
    for _ in 0..10_000 {
        let port = rand::thread_rng().gen_range(20_000..32_000);
        if given.contains(&port) {
            continue;
        }
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            given.insert(port);
            return listener.local_addr();
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// `dir/node<id>.toml` with its paths resolved against `dir`, as the server loads it.
    pub(crate) fn loaded(dir: &Path, id: u64) -> Config {
        let mut config = config(&dir.join(format!("node{id}.toml")));
        config.resolve_paths(dir);
        config
    }

    /// The operator key the profile in `dir` names.
    fn profile_operator_key(dir: &Path) -> PublicKey {
        let profile = profile(dir);
        let key = hex::decode(profile["operator_public_key"].as_str().unwrap()).unwrap();
        key.try_into().unwrap()
    }

    /// A threshold operator of 3 replicas in `tmp/op`.
    pub(crate) fn threshold_cluster(tmp: &tempfile::TempDir) -> PathBuf {
        let dir = tmp.path().join("op");
        let configs = init_threshold_cluster(3, &dir, 7400, &CertOptions::default()).unwrap();
        assert_eq!(configs.len(), 3);
        dir
    }

    /// `anyhow`'s whole message of the error of `result`.
    pub(crate) fn error<T>(result: Result<T>) -> String {
        format!("{:#}", result.err().expect("an error"))
    }

    #[test]
    fn init_threshold_cluster_writes_shares_and_no_whole_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = threshold_cluster(&tmp);
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let keys: Vec<&String> = names.iter().filter(|n| n.ends_with(".key")).collect();
        assert_eq!(
            keys,
            [
                "admin.key",
                "ca.key",
                "deposit.key",
                "node1.key",
                "node2.key",
                "node3.key"
            ],
            "no operator.key: {names:?}"
        );
        let group = profile_operator_key(&dir);
        for id in 1..=3 {
            let share_path = dir.join(format!("node{id}.share"));
            #[cfg(unix)]
            assert_eq!(mode(&share_path), 0o600);
            let config = loaded(&dir, id);
            config.validate().unwrap();
            let operator = config.operator.as_ref().unwrap();
            assert_eq!(operator.signing_key, None);
            assert_eq!(operator.signing_key_share.as_deref(), Some(&*share_path));
            assert!(
                config.archive.enabled(),
                "the shared archive, as without --threshold"
            );
            let secret = OperatorSecret::read(&config).unwrap();
            assert_eq!(secret.public_key(), group);
            let OperatorSecret::Share(files) = secret else {
                panic!("node {id} reads a whole key");
            };
            assert!(files.next.is_none());
            let file = files.configured;
            assert_eq!(
                (file.signer, file.threshold, file.signers),
                (id as u16, 2, 3)
            );
            assert_eq!(file.group_key, group);
            let whole = error(OperatorKeyFiles::read(&config));
            assert!(
                whole.contains(
                    "this replica holds a key share (operator.signing_key_share), not a whole key"
                ),
                "{whole}"
            );
        }
    }

    #[test]
    fn a_whole_key_cluster_reads_its_whole_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("op");
        init_cluster(2, &dir, 7400).unwrap();
        assert!(!dir.join("node1.share").exists());
        let config = loaded(&dir, 1);
        let secret = OperatorSecret::read(&config).unwrap();
        assert_eq!(secret.public_key(), profile_operator_key(&dir));
        assert!(matches!(secret, OperatorSecret::Whole(_)), "{secret:?}");
    }

    /// Signs `message` with the shares of `signers`: FROST's two rounds, then aggregation.
    fn threshold_sign(signers: &[&ShareFile], message: &[u8]) -> tally_wire::Signature {
        use std::collections::BTreeMap;
        let mut nonces = BTreeMap::new();
        let mut commitments = BTreeMap::new();
        for file in signers {
            let (n, c) = file.share.commit(&mut OsRng).unwrap();
            nonces.insert(file.signer, n);
            commitments.insert(file.signer, c);
        }
        let mut shares = BTreeMap::new();
        for file in signers {
            let n = nonces.remove(&file.signer).unwrap();
            let share = file.share.sign(message, &commitments, n).unwrap();
            shares.insert(file.signer, share);
        }
        tally_core::threshold::aggregate(message, &commitments, &shares, &signers[0].public)
            .unwrap()
    }

    #[test]
    fn any_two_of_three_shares_sign_under_the_group_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = threshold_cluster(&tmp);
        let files: Vec<ShareFile> = (1..=3)
            .map(|id| ShareFile::read(&dir.join(format!("node{id}.share"))).unwrap())
            .collect();
        assert!(files.iter().all(|f| f.public == files[0].public));
        let group = ed25519_dalek::VerifyingKey::from_bytes(&profile_operator_key(&dir)).unwrap();
        let message = b"a header's 192 bytes";
        for [a, b] in [[0, 1], [0, 2], [1, 2]] {
            let signature = threshold_sign(&[&files[a], &files[b]], message);
            let signature = ed25519_dalek::Signature::from_bytes(&signature);
            group.verify_strict(message, &signature).unwrap();
            assert!(group.verify_strict(b"another", &signature).is_err());
        }
    }

    /// `text` with the hex digit at byte `at` replaced by another.
    fn with_digit_changed(text: &str, at: usize) -> String {
        let digit = if &text[at..=at] == "0" { "1" } else { "0" };
        format!("{}{digit}{}", &text[..at], &text[at + 1..])
    }

    /// Where the hex value of the share file field `name` lies in `text`.
    fn hex_value(text: &str, name: &str) -> std::ops::Range<usize> {
        let start = text.find(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
        let end = start + text[start..].find('"').unwrap();
        start..end
    }

    #[test]
    fn a_share_file_with_any_hex_digit_changed_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = threshold_cluster(&tmp);
        let path = dir.join("node1.share");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"format\":\"tally-operator-share-v1\",\"signer\":1,"));
        ShareFile::parse(&text, &path).unwrap();
        for field in ["key_package", "group_public_key"] {
            let range = hex_value(&text, field);
            assert!(range.len() >= 64, "{field}");
            for at in range {
                let changed = with_digit_changed(&text, at);
                let message = error(ShareFile::parse(&changed, &path));
                assert!(message.contains(&*path.to_string_lossy()), "{message}");
            }
        }
        // Through the file, as a replica reads it.
        fs::remove_file(&path).unwrap();
        let at = hex_value(&text, "key_package").start + 100;
        write_new(&path, &with_digit_changed(&text, at), true).unwrap();
        let message = error(ShareFile::read(&path));
        assert!(message.contains("node1.share"), "{message}");
        assert!(OperatorSecret::read(&loaded(&dir, 1)).is_err());
    }

    #[test]
    fn share_file_fields_must_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = threshold_cluster(&tmp);
        let path = dir.join("node1.share");
        let text = fs::read_to_string(&path).unwrap();
        for (from, to, why) in [
            (
                "tally-operator-share-v1",
                "tally-operator-share-v2",
                "format is",
            ),
            (
                "\"signer\":1,",
                "\"signer\":2,",
                "key_package is signer 1's",
            ),
            (
                "\"signer\":1,",
                "\"signer\":4,",
                "key_package is signer 1's",
            ),
            ("\"signer\":1,", "\"signer\":0,", "out of range"),
            ("\"threshold\":2,", "\"threshold\":1,", "out of range"),
            ("\"threshold\":2,", "\"threshold\":4,", "out of range"),
            (
                "\"threshold\":2,",
                "\"threshold\":3,",
                "key packages say 2 of 3",
            ),
            (
                "\"signers\":3,",
                "\"signers\":4,",
                "key packages say 2 of 3",
            ),
            (
                "\"key_package\":\"",
                "\"key_package\":\"x",
                "key_package is not hex",
            ),
            (
                "\"group_public_key\":\"",
                "\"group_public_key\":\"00",
                "not 32 bytes",
            ),
            ("\"format\"", "\"extra\":1,\"format\"", "unknown field"),
            ("{", "[", "JSON object"),
        ] {
            assert!(text.contains(from), "{from}");
            let changed = text.replacen(from, to, 1);
            let message = error(ShareFile::parse(&changed, &path));
            assert!(message.contains(why), "{to}: {message}");
            assert!(message.starts_with(&format!("share file {}: ", path.display())));
        }
    }

    #[test]
    fn a_replica_must_hold_its_own_share() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = threshold_cluster(&tmp);
        let mut config = loaded(&dir, 2);
        config.operator.as_mut().unwrap().signing_key_share = Some(dir.join("node1.share"));
        let message = error(OperatorSecret::read(&config));
        assert!(message.contains("signer 1's share"), "{message}");
        assert!(message.contains("node.id = 2"), "{message}");
        assert!(message.contains("its own share"), "{message}");
    }

    #[cfg(unix)]
    #[test]
    fn a_share_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = threshold_cluster(&tmp);
        let path = dir.join("node3.share");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let message = error(ShareFile::read(&path));
        assert!(message.contains(&*path.to_string_lossy()), "{message}");
        assert!(message.contains("mode 0644"), "{message}");
        assert!(message.contains("chmod 600"), "{message}");
        assert!(OperatorSecret::read(&loaded(&dir, 3)).is_err());
    }

    #[test]
    fn a_threshold_cluster_needs_two_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let one = tmp.path().join("one");
        let message = error(init_threshold_cluster(
            1,
            &one,
            7400,
            &CertOptions::default(),
        ));
        assert!(
            message.contains("a single-node operator keeps a plain key"),
            "{message}"
        );
        assert!(!one.exists(), "nothing written");

        // Two nodes: both must sign.
        let two = tmp.path().join("two");
        init_threshold_cluster(2, &two, 7400, &CertOptions::default()).unwrap();
        let file = ShareFile::read(&two.join("node2.share")).unwrap();
        assert_eq!((file.threshold, file.signers), (2, 2));
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
