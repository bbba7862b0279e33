//! `tally-server`: run a replica. With no arguments, a development operator in `./tally-data`.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use tally_config::Config;

#[derive(Parser)]
#[command(
    name = "tally-server",
    version,
    about = "A replica of a tally ledger operator"
)]
struct Args {
    /// Operator config (TOML). Without it, a development operator runs in --dev-dir.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate a config file, print every problem found, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Data directory of the development operator.
    #[arg(long, value_name = "DIR", default_value = "tally-data")]
    dev_dir: PathBuf,
    /// Archive to write (overrides `archive.url`, the development operator's too):
    /// s3://bucket/prefix, file:///path or a directory
    #[arg(long, value_name = "URL", global = true)]
    archive: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write everything a local N-replica operator needs: CA, node certificates, operator,
    /// deposit and admin keys, DIR/nodeK.toml for each replica and DIR/profile.toml listing them
    /// all. With --threshold, a threshold operator key instead: DIR/nodeK.share for each
    /// replica, no whole key anywhere. With --add-node, --renew-node or --new-ca, add to an
    /// existing DIR instead (docs/OPERATING.md, "Adding, replacing and removing a replica" and
    /// "Certificates: renewal and CA rotation").
    InitCluster {
        /// Number of replicas (3 or 5 for a fault-tolerant operator).
        #[arg(long, required_unless_present_any = ["add_node", "renew_node", "new_ca", "new_group"])]
        nodes: Option<u64>,
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Node K listens for clients on BASE+K, peers on BASE+100+K, metrics on BASE+200+K.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        #[command(flatten)]
        certs: CertArgs,
        /// Write a new replica ID's certificate (from DIR/ca.pem and DIR/ca.key), key and
        /// DIR/nodeID.toml, with every DIR/nodeK.toml as its peers, and add it to
        /// DIR/profile.toml; the other nodes' files are left as they are. ID must be new.
        #[arg(long, value_name = "ID", conflicts_with_all = ["nodes", "renew_node", "new_ca"])]
        add_node: Option<u64>,
        /// Issue a new certificate and key for node ID from the CA in DIR (see --ca), written
        /// as DIR/nodeID.pem.new and DIR/nodeID.key.new
        #[arg(long, value_name = "ID", conflicts_with_all = ["nodes", "new_ca"])]
        renew_node: Option<u64>,
        /// The CA that --renew-node issues from: DIR/NAME.pem and DIR/NAME.key
        #[arg(
            long,
            value_name = "NAME",
            default_value = "ca",
            requires = "renew_node"
        )]
        ca: String,
        /// Make a new CA for a rotation: DIR/NAME.pem, DIR/NAME.key and DIR/NAME-bundle.pem
        /// (the current ca.pem, then the new CA)
        #[arg(long, value_name = "NAME", conflicts_with = "nodes")]
        new_ca: Option<String>,
        /// Threshold signing (FROST, issue 20): deal the operator key in memory into one share
        /// per replica (DIR/nodeK.share, named by operator.signing_key_share), any majority of
        /// which sign (NODES/2 + 1); no file holds the whole key. Needs --nodes 2 or more; the
        /// archive keeps the threshold's signatures, so restore takes its replicas too.
        #[arg(long, conflicts_with_all = ["add_node", "renew_node", "new_ca"])]
        threshold: bool,
        /// Deal a threshold operator's next signing group to the replicas of DIR (or to
        /// --members), any majority of which sign: DIR/nodeK-<key id>.share each, named by
        /// operator.next_signing_key_share (operator.signing_key_share on a replica added with
        /// --add-node), ahead of `tally cluster rotate-key` to its key (docs/OPERATING.md,
        /// "Threshold signing")
        #[arg(long, conflicts_with_all = ["nodes", "add_node", "renew_node", "new_ca", "threshold"])]
        new_group: bool,
        /// The members of the --new-group, by node id (comma-separated) [default: every
        /// DIR/nodeK.toml]
        #[arg(
            long,
            value_name = "IDS",
            value_delimiter = ',',
            requires = "new_group"
        )]
        members: Vec<u64>,
    },
    /// Build this replica's ledger from the archive alone (its ledger and raft directories
    /// must be empty or absent), verifying every signature, hash link, Merkle root and state
    /// digest; then start the replica as usual. Below the archive's tip (--height) the replica
    /// serves reads only.
    Restore {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Archive to read [default: the config's archive.url]
        #[arg(long, value_name = "URL")]
        from: Option<String>,
        /// Restore up to this height [default: the archive's tip]
        #[arg(long, value_name = "H")]
        height: Option<u64>,
        /// Replay every batch from height 1 instead of starting from the newest snapshot
        #[arg(long)]
        full_replay: bool,
    },
}

/// What node certificates are valid for (init-cluster and --renew-node).
#[derive(clap::Args)]
struct CertArgs {
    /// Also make node certificates valid for `localhost` and 127.0.0.1 (off: clients use the
    /// profile's server name, `ledger.tally`)
    #[arg(long)]
    localhost: bool,
    /// Another DNS name or IP address for every node certificate (repeatable)
    #[arg(long = "san", value_name = "NAME")]
    extra_names: Vec<String>,
    /// Days until node certificates expire
    #[arg(long, default_value_t = 730, value_name = "DAYS")]
    valid_days: u32,
}

impl CertArgs {
    fn options(&self) -> Result<tally_server::certs::CertOptions> {
        tally_server::certs::check_names(&self.extra_names)?;
        Ok(tally_server::certs::CertOptions {
            localhost: self.localhost,
            valid_days: self.valid_days,
            extra_names: self.extra_names.clone(),
        })
    }
}

/// `tally-server init-cluster` in its four forms: a new operator, a new replica for it, a
/// renewed node certificate, a new CA.
fn init_cluster(command: &Command) -> Result<()> {
    let Command::InitCluster {
        nodes,
        dir,
        base_port,
        certs,
        add_node,
        renew_node,
        ca,
        new_ca,
        threshold,
        new_group,
        members,
    } = command
    else {
        unreachable!("init_cluster is called for init-cluster only");
    };
    if *new_group {
        return deal_new_group(dir, members);
    }
    if let Some(id) = add_node {
        let added = tally_server::bootstrap::add_node(dir, *id, *base_port, &certs.options()?)?;
        print_next_steps(dir, &added);
        return Ok(());
    }
    if let Some(id) = renew_node {
        let (cert, key) =
            tally_server::bootstrap::renew_node_cert(dir, *id, ca, &certs.options()?)?;
        println!("node {id} certificate: {}", cert.display());
        println!("node {id} key:         {}", key.display());
        println!("move them over the files tls.cert and tls.key name, then restart node {id}");
        return Ok(());
    }
    if let Some(name) = new_ca {
        for path in tally_server::bootstrap::new_ca(dir, name)? {
            println!("{}", path.display());
        }
        return Ok(());
    }
    let nodes = nodes.expect("clap requires --nodes here");
    let certs = certs.options()?;
    let configs = if *threshold {
        tally_server::bootstrap::init_threshold_cluster(nodes, dir, *base_port, &certs)?
    } else {
        tally_server::bootstrap::init_cluster_with(nodes, dir, *base_port, &certs)?
    };
    for c in &configs {
        println!("tally-server --config {}", c.display());
    }
    if *threshold {
        println!(
            "operator key: shared among the {nodes} replicas ({}), any majority of them sign; \
             no file holds the whole key",
            dir.join("node<K>.share").display()
        );
    }
    println!("client profile: {}", dir.join("profile.toml").display());
    Ok(())
}

/// `init-cluster --new-group`: deals the next group and says what to do with it.
fn deal_new_group(dir: &std::path::Path, members: &[u64]) -> Result<()> {
    let members = (!members.is_empty()).then_some(members);
    let group = tally_server::groups::new_group(dir, members)?;
    for (share, config) in &group.written {
        println!("{} names {}", config.display(), share.display());
    }
    println!(
        "new group key: {} (members {:?}, any {} of them sign)",
        hex::encode(group.group_key),
        group.members,
        group.threshold
    );
    println!(
        "next: restart each member, then  tally cluster rotate-key --new-public-key {}",
        hex::encode(group.group_key)
    );
    Ok(())
}

/// What `init-cluster --add-node` wrote, and the commands that make the new replica a member.
fn print_next_steps(dir: &std::path::Path, added: &tally_server::bootstrap::AddedNode) {
    let id = added.id;
    println!("node {id} config:      {}", added.config.display());
    println!("node {id} certificate: {}", added.cert.display());
    println!("node {id} key:         {}", added.key.display());
    println!(
        "{} lists node {id} at {}",
        dir.join("profile.toml").display(),
        added.client_address
    );
    println!(
        "node {id} starts as a non-member of the cluster created with voters {:?}. Next:",
        added.initial_voters
    );
    if added.threshold {
        println!(
            "  0. deal it a share of a new group (it holds none of the current one):\n               \
             tally-server init-cluster --dir {} --new-group",
            dir.display()
        );
    }
    println!(
        "  1. start it:  tally-server --config {}",
        added.config.display()
    );
    println!(
        "  2. add it:    tally cluster add --id {id} --address {} --client-address {} --learner",
        added.peer_address, added.client_address
    );
    println!("  3. once it has caught up (tally cluster members, tally status):");
    println!("               tally cluster promote --id {id}");
}

/// `--archive URL` over `archive.url`, checked like the config's own key.
fn override_archive(config: &mut Config, url: Option<&String>) -> Result<()> {
    if let Some(url) = url {
        tally_config::ArchiveUrl::parse(url).map_err(|e| anyhow!("--archive {url}: {e}"))?;
        config.archive.url = url.clone();
    }
    Ok(())
}

fn load(path: &PathBuf, archive: Option<&String>) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        Config::from_toml_str(&text).map_err(|e| anyhow!("{}:\n{e}", path.display()))?;
    // `Path::new("operator.toml").parent()` is `""`: relative paths then resolve against ".".
    let base = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    config.resolve_paths(&base);
    override_archive(&mut config, archive)?;
    config
        .validate()
        .map_err(|e| anyhow!("{}:\n{e}", path.display()))?;
    check_deposit_keys(&config).map_err(|e| anyhow!("{}:\n{e}", path.display()))?;
    Ok(config)
}

/// Each deposit key must be a key that can sign (tally-config checks only its shape): with
/// any other 32 bytes no deposit could ever be made.
fn check_deposit_keys(config: &Config) -> Result<()> {
    for (i, key) in config.deposit_keys_bytes().iter().enumerate() {
        if !tally_core::validate::is_account_key(key) {
            anyhow::bail!(
                "operator.deposit_keys[{i}] = \"{}\": not an Ed25519 public key that can sign",
                hex::encode(key)
            );
        }
    }
    Ok(())
}

/// The `tracing` filter `text` (from `source`, named in the error): an unusable filter stops
/// the server rather than logging at some default.
fn log_filter(text: &str, source: &str) -> Result<tracing_subscriber::EnvFilter> {
    let filter = tracing_subscriber::EnvFilter::try_new(text)
        .map_err(|e| anyhow!("{source} = {text:?}: {e}"))?;
    Ok(tally_server::ratelog::quiet_rustls(filter, text))
}

/// `tally-server restore`: a one-shot command that exits 0 once the data directory is ready.
fn restore(
    config: &PathBuf,
    archive: Option<&String>,
    options: &tally_server::restore::RestoreOptions,
) -> Result<()> {
    let config = load(config, archive)?;
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&config.log.level, "log.level")?)
        .with_writer(std::io::stderr)
        .init();
    let r = tally_server::restore::restore(&config, options)?;
    let below = if r.read_only {
        " (below the tip: this replica will serve reads only)"
    } else {
        ""
    };
    let start = match r.snapshot {
        Some(s) => format!("from the snapshot at {s}"),
        None => "from height 1".to_string(),
    };
    println!(
        "tally-server: restored height {} of the archive's {} in {:.1} s ({start}, {} batches \
         replayed){below}",
        r.height, r.archive_height, r.seconds, r.replayed
    );
    Ok(())
}

fn main() -> Result<()> {
    // Fail-stop: a panic on any thread (raft, storage, a connection task) stops the process
    // with the same code as a fatal storage error, instead of leaving a half-working replica
    // that still answers clients. Restarting recovers from disk.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("tally-server: fatal: a thread panicked; stopping the node");
        std::process::exit(70);
    }));
    let args = Args::parse();
    if let Some(command @ Command::InitCluster { .. }) = &args.command {
        return init_cluster(command);
    }
    if let Some(Command::Restore {
        config,
        from,
        height,
        full_replay,
    }) = &args.command
    {
        let options = tally_server::restore::RestoreOptions {
            from: from.clone(),
            height: *height,
            full_replay: *full_replay,
        };
        return restore(config, args.archive.as_ref(), &options);
    }
    if let Some(path) = &args.check_config {
        // Printed plainly (no anyhow backtrace): the problems are the output.
        if let Err(e) = load(path, args.archive.as_ref()) {
            eprintln!("{e:#}");
            std::process::exit(1);
        }
        println!("{}: ok", path.display());
        return Ok(());
    }
    let (config, profile) = match &args.config {
        Some(path) => (load(path, args.archive.as_ref())?, None),
        None => {
            let (mut config, profile) = tally_server::bootstrap::dev_operator(&args.dev_dir)?;
            override_archive(&mut config, args.archive.as_ref())?;
            (config, Some(profile))
        }
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) => log_filter(&filter, "RUST_LOG")?,
        Err(_) => log_filter(&config.log.level, "log.level")?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tally_server::node::run(config, profile.as_deref())
}
