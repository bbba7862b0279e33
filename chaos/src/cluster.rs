//! A live cluster of real `tally-server` processes on 127.0.0.1, rewired through proxies the
//! harness controls.
//!
//! The operator's files come from `init-cluster` (`tally_server::bootstrap::init_cluster`), the
//! same code an operator runs. Every replica then moves to free ports: its peers reach it
//! through one [`Proxy`] per directed link, and harness clients may reach it through a client
//! proxy. Each replica's stdout and stderr go to `DIR/nodeK.log`, appended across restarts.
//!
//! Replicas come and go ([`LiveCluster::add_replica`], [`LiveCluster::retire`]): `ids` are the
//! members the harness judges. An added replica dials the others through link proxies of its
//! own, but they all reach it through one proxy in front of its peer port, the address it was
//! added with (a membership change gives every replica the same address book entry).
//!
//! Every replica archives to the same place: `init-cluster`'s shared `DIR/archive`, or the
//! archive the run names ([`ArchiveSetup`]). An S3 archive is reached through one more proxy,
//! in front of the store's endpoint, which an archive outage cuts.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tally_client::{Client, Profile, ReplicaAddress};
use tally_config::{ArchiveUrl, Config};
use tally_storage::bucket::{Bucket, BucketSettings};
use tally_wire::StatusReply;

use crate::proxy::Proxy;

/// How long a starting replica may take to accept TCP connections on its client port.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica may take to exit after SIGTERM before it is killed.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of one status probe (connect, TLS handshake and the call).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Timing settings written into every replica's config.
#[derive(Debug, Clone)]
pub struct Timing {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub batch_window_ms: u64,
    pub compaction_entries: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 2,
            batch_window_ms: 20,
            compaction_entries: 300,
        }
    }
}

impl Timing {
    /// The shortest time a follower waits before it calls an election.
    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.tick_ms * self.election_ticks as u64)
    }
}

/// Where a live cluster archives: `[archive]` of every replica.
#[derive(Debug, Clone, Default)]
pub struct ArchiveSetup {
    /// `s3://bucket/prefix` (endpoint and credentials from the `AWS_*` variables) or a local
    /// directory; it must hold nothing yet. None: `init-cluster`'s own, `DIR/archive`.
    pub url: Option<String>,
    /// `archive.max_lag_batches` of every replica; None: the server's default.
    pub max_lag_batches: Option<u64>,
    /// A threshold operator (`init-cluster --threshold`).
    pub threshold: bool,
}

/// Where the operator's files live: a temporary directory removed on success, or a directory
/// the user named (always kept).
pub enum RunDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl RunDir {
    pub fn path(&self) -> &Path {
        match self {
            RunDir::Temp(t) => t.path(),
            RunDir::Kept(p) => p,
        }
    }

    /// Keeps the directory after the run (an invariant failed) and returns its path.
    pub fn keep(&mut self) -> PathBuf {
        let path = self.path().to_path_buf();
        if let RunDir::Temp(_) = self {
            let RunDir::Temp(t) = std::mem::replace(self, RunDir::Kept(path.clone())) else {
                unreachable!("matched above")
            };
            let _ = t.keep();
        }
        path
    }
}

/// One replica process.
struct Process {
    child: Child,
    paused: bool,
}

pub struct LiveCluster {
    pub dir: RunDir,
    pub ids: Vec<u64>,
    /// Real client addresses of the replicas, in id order.
    pub profile: Profile,
    pub client_addrs: BTreeMap<u64, SocketAddr>,
    configs: BTreeMap<u64, PathBuf>,
    processes: BTreeMap<u64, Process>,
    /// Real peer addresses of the replicas (what the link proxies forward to).
    peer_addrs: BTreeMap<u64, SocketAddr>,
    /// (from, to) → the proxy `from` dials to reach `to`.
    links: BTreeMap<(u64, u64), Proxy>,
    /// Replica added during the run → the one proxy in front of its peer port, the address it
    /// was added with, which every replica dials (see [`LiveCluster::add_replica`]).
    inbound: BTreeMap<u64, Proxy>,
    /// Replicas removed from the cluster during the run, in order.
    pub removed: Vec<u64>,
    /// The id the next added replica gets: ids are never reused.
    next_id: u64,
    /// Replica id → proxy in front of its client port.
    pub client_proxies: BTreeMap<u64, Proxy>,
    /// The archive every replica writes: an `s3://` URL or an absolute directory.
    pub archive_url: String,
    /// The proxy between the replicas and an S3 archive's endpoint (None for a local
    /// directory, or when the endpoint is not plain HTTP).
    pub archive_proxy: Option<Proxy>,
    /// `archive.max_lag_batches` of every replica.
    pub archive_max_lag_batches: u64,
    server_bin: PathBuf,
    started: Instant,
}

impl Drop for LiveCluster {
    fn drop(&mut self) {
        for p in self.processes.values_mut() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// A free port on 127.0.0.1 below the ephemeral range: replicas are killed and restarted on
/// the same ports (see `tally_server::bootstrap::free_local_port`).
fn free_port() -> Result<SocketAddr> {
    tally_server::bootstrap::free_local_port().context("finding a free port")
}

/// The base port `create` gives `init-cluster` (every port is rewired afterwards; `--add-node`
/// must be given the same one).
const BASE_PORT: u16 = 1000;

fn read_config(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Config::from_toml_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn write_config(path: &Path, config: &Config) -> Result<()> {
    config
        .validate()
        .map_err(|e| anyhow!("the rewired config {} is invalid:\n{e}", path.display()))?;
    std::fs::write(path, config.to_toml_string())
        .with_context(|| format!("writing {}", path.display()))
}

/// A replica made during the run ([`LiveCluster::add_replica`]): running, not yet a member.
#[derive(Debug, Clone)]
pub struct AddedReplica {
    pub id: u64,
    /// What `AdminCommand::Add` names as its peer address: the proxy in front of its peer
    /// port, which every replica dials.
    pub peer_address: SocketAddr,
    /// Its real client address.
    pub client_address: SocketAddr,
}

impl LiveCluster {
    /// Writes an N-replica operator into `dir` (a fresh temporary directory if None; else it
    /// must be empty or absent), rewired onto free ports with a proxy on every directed link and
    /// in front of every client port. Nothing is started yet.
    pub async fn create(
        nodes: u64,
        dir: Option<PathBuf>,
        server_bin: PathBuf,
        timing: &Timing,
        archive: &ArchiveSetup,
    ) -> Result<LiveCluster> {
        let dir = match dir {
            Some(d) => RunDir::Kept(d),
            None => RunDir::Temp(
                tempfile::Builder::new()
                    .prefix("tally-chaos-")
                    .tempdir()
                    .context("creating a temporary directory")?,
            ),
        };
        let root = std::path::absolute(dir.path())?;
        match archive.threshold {
            true => {
                let certs = tally_server::certs::CertOptions::default();
                tally_server::bootstrap::init_threshold_cluster(nodes, &root, BASE_PORT, &certs)
                    .map(|_| ())
            }
            false => tally_server::bootstrap::init_cluster(nodes, &root, BASE_PORT).map(|_| ()),
        }
        .with_context(|| format!("init-cluster in {}", root.display()))?;
        let (archive_url, archive_proxy) = match &archive.url {
            None => (root.join("archive").display().to_string(), None),
            Some(url) => open_archive(url).await?,
        };
        let ids: Vec<u64> = (1..=nodes).collect();
        let mut client_addrs = BTreeMap::new();
        let mut peer_addrs = BTreeMap::new();
        for &id in &ids {
            client_addrs.insert(id, free_port()?);
            peer_addrs.insert(id, free_port()?);
        }
        let mut links = BTreeMap::new();
        for &from in &ids {
            for &to in &ids {
                if from != to {
                    links.insert((from, to), Proxy::start(peer_addrs[&to]).await?);
                }
            }
        }
        let mut client_proxies = BTreeMap::new();
        for &id in &ids {
            client_proxies.insert(id, Proxy::start(client_addrs[&id]).await?);
        }
        let mut archive_max_lag_batches = 0;
        let mut configs = BTreeMap::new();
        for &id in &ids {
            let path = root.join(format!("node{id}.toml"));
            let mut config = read_config(&path)?;
            config.listen.client = client_addrs[&id];
            config.listen.peer = peer_addrs[&id];
            config.listen.metrics = "127.0.0.1:0".parse().expect("an address");
            for p in config.peers.iter_mut() {
                p.address = links[&(id, p.id)].listen;
                p.client_address = client_addrs[&p.id];
            }
            config.raft.tick_ms = timing.tick_ms;
            config.raft.election_ticks = timing.election_ticks;
            config.raft.heartbeat_ticks = timing.heartbeat_ticks;
            config.raft.compaction_entries = timing.compaction_entries;
            config.batch.batch_window_ms = timing.batch_window_ms;
            config.archive.url = archive_url.clone();
            if let Some(proxy) = &archive_proxy {
                config.archive.endpoint = format!("http://{}", proxy.listen);
                config.archive.allow_http = true;
            }
            if let Some(lag) = archive.max_lag_batches {
                config.archive.max_lag_batches = lag;
            }
            archive_max_lag_batches = config.archive.max_lag_batches;
            write_config(&path, &config)?;
            configs.insert(id, path);
        }
        let mut profile = Profile::load(root.join("profile.toml"))?;
        profile.replicas = ids
            .iter()
            .map(|&id| ReplicaAddress {
                id,
                address: client_addrs[&id].to_string(),
            })
            .collect();
        Ok(LiveCluster {
            dir,
            next_id: nodes + 1,
            ids,
            profile,
            client_addrs,
            configs,
            processes: BTreeMap::new(),
            peer_addrs,
            links,
            inbound: BTreeMap::new(),
            removed: Vec::new(),
            client_proxies,
            archive_url,
            archive_proxy,
            archive_max_lag_batches,
            server_bin,
            started: Instant::now(),
        })
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Replica `id`'s config file.
    pub fn config_path(&self, id: u64) -> &Path {
        &self.configs[&id]
    }

    /// The server binary the replicas run.
    pub fn server_bin(&self) -> &Path {
        &self.server_bin
    }

    /// The archive, opened for the harness's own reads: directly, never through the proxy
    /// (for S3 the endpoint comes from `AWS_ENDPOINT_URL`, as the proxy's target did).
    pub fn archive_bucket(&self) -> Result<Bucket> {
        let url = ArchiveUrl::parse(&self.archive_url).map_err(|e| anyhow!("{e}"))?;
        Ok(Bucket::open(&BucketSettings::from_url(url))?)
    }

    /// Cuts (true) or restores (false) the replicas' connections to an S3 archive.
    pub fn set_archive_cut(&self, cut: bool) {
        if let Some(p) = &self.archive_proxy {
            p.set_cut(cut);
        }
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.root().join(format!("node{id}.log"))
    }

    /// The last `per_node` warning and error lines of each replica's log (for a failure
    /// message that explains itself where only the harness's output survives, as in CI).
    pub fn log_warnings(&self, nodes: u64, per_node: usize) -> String {
        let mut out = String::new();
        for id in 1..=nodes {
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("fatal"))
                .collect();
            out.push_str(&format!("node {id}: {} warning(s)\n", lines.len()));
            for line in &lines[lines.len().saturating_sub(per_node)..] {
                out.push_str(&format!(
                    "  {}\n",
                    line.chars().take(400).collect::<String>()
                ));
            }
        }
        out
    }

    /// The replica's data directory (its ledger and raft log).
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.root().join(format!("node{id}"))
    }

    /// Starts replica `id` and waits until its client port accepts connections.
    pub async fn start(&mut self, id: u64) -> Result<()> {
        if self.processes.contains_key(&id) {
            bail!("node {id} is already running");
        }
        let log_path = self.log_path(id);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(
            log,
            "=== tally-chaos: starting node {id} at +{} ms ===",
            self.started.elapsed().as_millis()
        )?;
        let child = Command::new(&self.server_bin)
            .arg("--config")
            .arg(&self.configs[&id])
            .env(
                "RUST_LOG",
                std::env::var("TALLY_CHAOS_SERVER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.server_bin.display()))?;
        self.processes.insert(
            id,
            Process {
                child,
                paused: false,
            },
        );
        let addr = self.client_addrs[&id];
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(p) = self.processes.get_mut(&id) {
                if let Some(status) = p.child.try_wait()? {
                    self.processes.remove(&id);
                    bail!(
                        "node {id} exited while starting ({status}); see {}",
                        log_path.display()
                    );
                }
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} did not listen on {addr} within {START_TIMEOUT:?}; see {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn start_all(&mut self) -> Result<()> {
        for id in self.ids.clone() {
            self.start(id).await?;
        }
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.processes.contains_key(&id)
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.processes.get(&id).is_some_and(|p| p.paused)
    }

    /// Replicas that exited by themselves (a crash: a bug, or a deliberate stop on divergence).
    /// They are forgotten, so that the harness can report and restart them.
    pub fn reap_exited(&mut self) -> Vec<(u64, String)> {
        let mut exited = Vec::new();
        for (&id, p) in self.processes.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                exited.push((id, status.to_string()));
            }
        }
        for (id, _) in &exited {
            self.processes.remove(id);
        }
        exited
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut p) = self.processes.remove(&id) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGTERM and wait for the replica's graceful shutdown (SIGKILL after a timeout).
    pub async fn terminate(&mut self, id: u64) {
        let Some(mut p) = self.processes.remove(&id) else {
            return;
        };
        if p.paused {
            let _ = signal(&p.child, "CONT");
        }
        let _ = signal(&p.child, "TERM");
        let deadline = Instant::now() + TERMINATE_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&mut self, id: u64) -> Result<()> {
        if let Some(p) = self.processes.get_mut(&id) {
            signal(&p.child, "STOP")?;
            p.paused = true;
        }
        Ok(())
    }

    /// SIGUSR1: a leader hands leadership to its best-caught-up follower.
    pub fn transfer_leadership(&mut self, id: u64) -> Result<()> {
        if let Some(p) = self.processes.get_mut(&id) {
            signal(&p.child, "USR1")?;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> Result<()> {
        if let Some(p) = self.processes.get_mut(&id) {
            if p.paused {
                signal(&p.child, "CONT")?;
                p.paused = false;
            }
        }
        Ok(())
    }

    /// Deletes a stopped replica's ledger and raft log.
    pub fn wipe(&self, id: u64) -> Result<()> {
        assert!(!self.is_running(id), "wipe a stopped replica only");
        let data = self.data_dir(id);
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("removing {}", data.display()))?;
        }
        Ok(())
    }

    /// Makes a new replica as an operator does (`tally-server init-cluster --add-node`, with
    /// the next id never used), rewires it onto free ports and starts it: a non-member until
    /// the cluster adds it. Its links to the others go through proxies of their own; the
    /// others all reach it through one proxy, because every replica dials the one address it
    /// is added with. Nothing changes in the others' files.
    pub async fn add_replica(&mut self) -> Result<AddedReplica> {
        let id = self.next_id;
        self.next_id += 1;
        self.init_added(id).await?;
        let client = free_port()?;
        let peer = free_port()?;
        for &to in &self.ids {
            let proxy = Proxy::start(self.peer_addrs[&to]).await?;
            self.links.insert((id, to), proxy);
        }
        let path = self.root().join(format!("node{id}.toml"));
        let mut config = read_config(&path)?;
        config.listen.client = client;
        config.listen.peer = peer;
        config.listen.metrics = "127.0.0.1:0".parse().expect("an address");
        config.peers.retain(|p| self.ids.contains(&p.id));
        for p in config.peers.iter_mut() {
            p.address = self.links[&(id, p.id)].listen;
            p.client_address = self.client_addrs[&p.id];
        }
        write_config(&path, &config)?;
        let inbound = Proxy::start(peer).await?;
        let added = AddedReplica {
            id,
            peer_address: inbound.listen,
            client_address: client,
        };
        self.inbound.insert(id, inbound);
        self.peer_addrs.insert(id, peer);
        self.client_addrs.insert(id, client);
        self.client_proxies.insert(id, Proxy::start(client).await?);
        self.configs.insert(id, path);
        self.ids.push(id);
        self.profile.replicas.push(ReplicaAddress {
            id,
            address: client.to_string(),
        });
        self.start(id).await?;
        Ok(added)
    }

    /// `tally-server init-cluster --dir DIR --add-node ID`: the new replica's certificate and
    /// `nodeID.toml`, from the CA in DIR.
    async fn init_added(&self, id: u64) -> Result<()> {
        let mut command = Command::new(&self.server_bin);
        command
            .arg("init-cluster")
            .arg("--dir")
            .arg(self.root())
            .arg("--add-node")
            .arg(id.to_string())
            .arg("--base-port")
            .arg(BASE_PORT.to_string())
            .stdin(Stdio::null());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await?
            .context("running tally-server init-cluster --add-node")?;
        if !output.status.success() {
            bail!(
                "init-cluster --add-node {id} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` for replica `id` to exit by itself and returns how it exited
    /// (then it is forgotten), or None if it still runs.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.processes.get_mut(&id)?.child.try_wait().ok().flatten();
            if let Some(status) = status {
                self.processes.remove(&id);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Forgets replica `id`, removed from the cluster and stopped: it is no longer judged,
    /// restarted or targeted. Its config moves to `nodeID.toml.removed`, as the runbook
    /// (docs/OPERATING.md) says, so that a later `--add-node` does not list it as a peer.
    pub fn retire(&mut self, id: u64) -> Result<()> {
        assert!(!self.is_running(id), "retire a stopped replica only");
        self.ids.retain(|&i| i != id);
        self.client_addrs.remove(&id);
        self.client_proxies.remove(&id);
        self.links.retain(|&(from, to), _| from != id && to != id);
        self.inbound.remove(&id);
        self.profile.replicas.retain(|r| r.id != id);
        if let Some(path) = self.configs.get_mut(&id) {
            let aside = path.with_extension("toml.removed");
            std::fs::rename(&*path, &aside)
                .with_context(|| format!("moving {} aside", path.display()))?;
            *path = aside;
        }
        self.removed.push(id);
        Ok(())
    }

    /// Whether `from → to` has a proxy of its own (not a link into a replica added during
    /// the run).
    pub fn has_link(&self, from: u64, to: u64) -> bool {
        self.links.contains_key(&(from, to))
    }

    /// Cuts or heals the one-way link `from → to`. A link into a replica added during the run
    /// is not cut alone: every replica reaches it through one proxy (see `isolate`, `split`).
    pub fn set_link(&self, from: u64, to: u64, cut: bool) {
        if let Some(p) = self.links.get(&(from, to)) {
            p.set_cut(cut);
        }
    }

    /// Cuts or heals every link between `id` and the others, both directions.
    pub fn isolate(&self, id: u64, cut: bool) {
        for (&(from, to), p) in &self.links {
            if from == id || to == id {
                p.set_cut(cut);
            }
        }
        if let Some(p) = self.inbound.get(&id) {
            p.set_cut(cut);
        }
    }

    /// Cuts every link between the two sides, both directions. Every link into a replica
    /// added during the run goes through one proxy: that proxy is cut if the replica is on the
    /// smaller side (which then loses its links within the side too), and left alone on the
    /// larger one (which keeps hearing the smaller side).
    pub fn split(&self, side_a: &[u64], side_b: &[u64]) {
        for &a in side_a {
            for &b in side_b {
                self.set_link(a, b, true);
                self.set_link(b, a, true);
            }
        }
        let smaller = if side_a.len() <= side_b.len() {
            side_a
        } else {
            side_b
        };
        for id in smaller {
            if let Some(p) = self.inbound.get(id) {
                p.set_cut(true);
            }
        }
    }

    pub fn cut_links(&self) -> Vec<(u64, u64)> {
        self.links
            .iter()
            .filter(|(_, p)| p.is_cut())
            .map(|(&k, _)| k)
            .collect()
    }

    /// Heals every replica-to-replica link.
    pub fn heal_network(&self) {
        for p in self.links.values().chain(self.inbound.values()) {
            if p.is_cut() {
                p.set_cut(false);
            }
        }
    }

    /// Resumes paused replicas, restarts stopped ones, heals every link (the archive's too) and
    /// lets every client proxy deliver answers again.
    pub async fn heal_all(&mut self) -> Result<()> {
        self.heal_network();
        self.set_archive_cut(false);
        for p in self.client_proxies.values() {
            p.stop_dropping_answers();
        }
        for id in self.ids.clone() {
            self.resume(id)?;
            if !self.is_running(id) {
                self.start(id).await?;
            }
        }
        Ok(())
    }

    /// A connection to replica `id`, with `timeout` for the handshake and every call.
    pub async fn client_of(&self, id: u64, timeout: Duration) -> Result<Client> {
        let addr = self.client_addrs[&id];
        Ok(Client::connect_to_timeout(addr, &self.profile, timeout).await?)
    }

    /// Every running replica's status, probed concurrently. Paused or unreachable ones are None.
    pub async fn statuses(&self) -> BTreeMap<u64, Option<StatusReply>> {
        statuses(&self.profile, &self.client_addrs).await
    }

    /// The replica that takes writes now (the highest term among those that say so).
    pub async fn leader(&self) -> Option<(u64, u64)> {
        leader_of(&self.statuses().await)
    }

    /// Waits until some replica takes writes; returns (id, term).
    pub async fn wait_leader(&self, timeout: Duration) -> Option<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The archive the run names, checked to be empty, and for S3 a proxy in front of its endpoint
/// (`AWS_ENDPOINT_URL`, plain HTTP only: the proxy forwards bytes and cannot carry TLS for
/// another host name). Returns (the URL the replicas get, the proxy).
async fn open_archive(url: &str) -> Result<(String, Option<Proxy>)> {
    let parsed = ArchiveUrl::parse(url).map_err(|e| anyhow!("--archive {url}: {e}"))?;
    let (url, proxy) = match &parsed {
        ArchiveUrl::File(dir) => (std::path::absolute(dir)?.display().to_string(), None),
        ArchiveUrl::S3 { .. } => {
            let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
            let proxy = match plain_http_address(&endpoint) {
                Some(target) => Some(Proxy::start(target).await?),
                None => None,
            };
            (url.to_string(), proxy)
        }
    };
    let bucket = Bucket::open(&BucketSettings::from_url(
        ArchiveUrl::parse(&url).map_err(|e| anyhow!("{e}"))?,
    ))?;
    let held = bucket
        .list("", None)
        .await
        .with_context(|| format!("reading the archive {url}"))?;
    if let Some(first) = held.first() {
        bail!(
            "the archive {url} already holds objects ({first}, ...): give every run an archive \
             of its own (a new prefix or an empty directory)"
        );
    }
    Ok((url, proxy))
}

/// The socket address of a plain-HTTP endpoint such as `http://127.0.0.1:8333`.
fn plain_http_address(endpoint: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    let rest = endpoint.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    with_port.to_socket_addrs().ok()?.next()
}

/// The writable replica with the highest term in a set of status replies.
pub fn leader_of(statuses: &BTreeMap<u64, Option<StatusReply>>) -> Option<(u64, u64)> {
    statuses
        .iter()
        .filter_map(|(&id, s)| s.as_ref().filter(|s| s.writable).map(|s| (id, s.term)))
        .max_by_key(|&(_, term)| term)
}

/// Status of every replica in `addrs`, probed concurrently over fresh connections.
pub async fn statuses(
    profile: &Profile,
    addrs: &BTreeMap<u64, SocketAddr>,
) -> BTreeMap<u64, Option<StatusReply>> {
    let probes: Vec<_> = addrs
        .iter()
        .map(|(&id, &addr)| {
            let profile = profile.clone();
            tokio::spawn(async move {
                let probe = async {
                    let c = Client::connect_to_timeout(addr, &profile, PROBE_TIMEOUT).await?;
                    c.status().await
                };
                let status = tokio::time::timeout(PROBE_TIMEOUT, probe)
                    .await
                    .ok()
                    .and_then(|r| r.ok());
                (id, status)
            })
        })
        .collect();
    let mut out = BTreeMap::new();
    for p in probes {
        if let Ok((id, s)) = p.await {
            out.insert(id, s);
        }
    }
    out
}

fn signal(child: &Child, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {} failed", child.id());
    }
    Ok(())
}

/// Finds the `tally-server` binary: `explicit`, else next to the running executable, else
/// `target/release` or `target/debug` under the current directory.
pub fn find_server_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let name = format!("tally-server{}", std::env::consts::EXE_SUFFIX);
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--server-bin {}: no such file", p.display());
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            tried.push(dir.join(&name));
        }
    }
    for profile in ["release", "debug"] {
        tried.push(PathBuf::from("target").join(profile).join(&name));
    }
    for p in &tried {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "tally-server not found (looked at {}); build it with `cargo build --release --bin \
         tally-server` or pass --server-bin PATH",
        list.join(", ")
    )
}
