//! `--start-server`: a fresh development operator in a temporary directory, for one run.
//!
//! The files come from `tally_server::bootstrap::dev_operator`, the same code that sets up
//! `tally-server` with no arguments; the listen addresses are rewritten to `127.0.0.1:0` so that
//! runs never collide on a port, and the client address is read from the line the server prints
//! ("... listening for clients on ADDR ..."). The process is killed when the handle drops.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tally_client::{Profile, ReplicaAddress};
use tally_config::Config;

/// How long a starting server may take to print its client address.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What the server prints before its client address.
const LISTENING: &str = " listening for clients on ";

/// A running server; killed (and its files deleted) when dropped.
pub struct StartedServer {
    child: Child,
    pub profile: Profile,
    pub address: String,
    // Dropped after the child is killed (fields drop in order, after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Drop for StartedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tally-server` binary next to the running executable.
pub fn default_server_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the tally-bench executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    Ok(dir.join(format!("tally-server{}", std::env::consts::EXE_SUFFIX)))
}

/// Starts `nodes` fresh replicas from `binary` (default: next to this executable).
pub fn start(nodes: usize, binary: Option<&Path>) -> Result<StartedServer> {
    if nodes != 1 {
        bail!("--nodes {nodes}: not supported yet: replication is not built");
    }
    let binary = match binary {
        Some(path) => path.to_path_buf(),
        None => default_server_binary()?,
    };
    if !binary.is_file() {
        bail!(
            "{} not found: --start-server runs the tally-server binary next to tally-bench; \
             build it first with `cargo build --release --bin tally-server` (or without \
             --release for a debug tally-bench)",
            binary.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("tally-bench-")
        .tempdir()
        .context("creating a temporary directory for the server")?;
    let data = dir.path().join("data");
    let (_, profile_path) = tally_server::bootstrap::dev_operator(&data)
        .context("setting up a development operator")?;
    let config_path = data.join("config.toml");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut config =
        Config::from_toml_str(&text).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    let any: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    config.listen.client = any;
    config.listen.peer = any;
    config.listen.metrics = any;
    std::fs::write(&config_path, config.to_toml_string())
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut profile = Profile::load(&profile_path)?;

    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&config_path)
        // Warnings and errors only, unless the user asked for more.
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    // The reader thread hands over the address line, then keeps draining the pipe (a full pipe
    // would block the server) and passes later lines on to stderr. It ends with the process.
    let (address_tx, address_rx) = mpsc::sync_channel::<String>(1);
    std::thread::Builder::new()
        .name("tally-server-stdout".into())
        .spawn(move || {
            let mut address_tx = Some(address_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                match line.split(LISTENING).nth(1) {
                    Some(rest) if address_tx.is_some() => {
                        let address = rest.split_whitespace().next().unwrap_or("").to_string();
                        let _ = address_tx.take().expect("checked").send(address);
                    }
                    _ => eprintln!("{line}"),
                }
            }
        })
        .context("starting a thread")?;

    // Wrapped at once so that an error below kills the process.
    let mut server = StartedServer {
        child,
        profile: profile.clone(),
        address: String::new(),
        _dir: dir,
    };
    let started = Instant::now();
    let address = loop {
        match address_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(address) => break address,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = server.child.try_wait()? {
            bail!("{} exited ({status}) before listening", binary.display());
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "{} did not print its client address within {} s",
                binary.display(),
                START_TIMEOUT.as_secs()
            );
        }
    };
    if address.is_empty() {
        bail!("{} printed an empty client address", binary.display());
    }
    profile.replicas = vec![ReplicaAddress {
        id: config.node.id,
        address: address.clone(),
    }];
    server.profile = profile;
    server.address = address;
    Ok(server)
}
