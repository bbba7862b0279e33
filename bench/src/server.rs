//! `--start-server`: a fresh operator in a temporary directory, for one run.
//!
//! One node: the files come from `tally_server::bootstrap::dev_operator`, the same code that
//! sets up `tally-server` with no arguments, with every listen address rewritten to
//! `127.0.0.1:0` so that runs never collide on a port. Several nodes: the files come from
//! `tally_server::bootstrap::init_cluster` (what `tally-server init-cluster` runs), rewired onto
//! free ports, since replicas must know each other's addresses before they start. Either way the
//! client address is read from the line each replica prints ("... listening for clients on
//! ADDR ..."), and the processes are killed when the handle drops.
//!
//! `--cache-accounts N` is written into every replica's config (`cache.accounts_max`) before it
//! starts. [`StartedServer::memory`] reads each replica's resident set (VmRSS) and its peak
//! (VmHWM) from `/proc/<pid>/status` (Linux only; elsewhere there is nothing to report).
//!
//! Caveat: a cluster's free ports are found by binding port 0 and letting go, so another
//! program could take one in between; the replica then fails to start and the run says so.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tally_client::{Profile, ReplicaAddress};
use tally_config::Config;

/// How long a starting replica may take to print its client address.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What a replica prints before its client address.
const LISTENING: &str = " listening for clients on ";
/// Replicas `--start-server` can start (the range `init-cluster` accepts).
pub const NODES_MAX: usize = 9;

/// Running replicas; killed (and their files deleted) when dropped.
pub struct StartedServer {
    children: Vec<Child>,
    /// The node id of each child, in the same order.
    ids: Vec<u64>,
    /// The profile with every replica's actual client address.
    pub profile: Profile,
    /// Every replica's `cache.accounts_max`, as written to its config.
    pub cache_accounts: usize,
    /// The replicas' `archive.url` as written (empty: no archive).
    pub archive: String,
    // Dropped after the children are killed (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Drop for StartedServer {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One replica's memory, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReplicaMemory {
    pub id: u64,
    /// VmRSS: resident now.
    pub rss_bytes: u64,
    /// VmHWM: the most that was ever resident.
    pub peak_rss_bytes: u64,
}

impl StartedServer {
    /// Each running replica's memory now. A replica whose figures cannot be read (it exited,
    /// or this is not Linux) is left out, with a warning on stderr.
    pub fn memory(&mut self) -> Vec<ReplicaMemory> {
        let mut out = Vec::new();
        for (child, &id) in self.children.iter_mut().zip(&self.ids) {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("replica {id} has exited ({status}): no memory figures for it");
                continue;
            }
            let path = format!("/proc/{}/status", child.id());
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_memory(&text).ok_or_else(|| "no VmRSS/VmHWM".into()))
            {
                Ok((rss_bytes, peak_rss_bytes)) => out.push(ReplicaMemory {
                    id,
                    rss_bytes,
                    peak_rss_bytes,
                }),
                Err(e) => eprintln!("replica {id}: cannot read {path}: {e}"),
            }
        }
        out
    }
}

impl StartedServer {
    /// CPU time the replicas have used so far, all threads of all of them, in nanoseconds:
    /// the sum of the first field of `/proc/<pid>/task/<tid>/schedstat`. None if any cannot
    /// be read (a replica exited, or this is not Linux).
    pub fn cpu_ns(&mut self) -> Option<u64> {
        let mut total = 0u64;
        for child in &mut self.children {
            if !matches!(child.try_wait(), Ok(None)) {
                return None;
            }
            total += process_cpu_ns(child.id())?;
        }
        Some(total)
    }
}

/// Nanoseconds on a CPU of every thread of process `pid` (threads that exited are not counted:
/// the replicas' threads live as long as they do).
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// (VmRSS, VmHWM) in bytes from the text of `/proc/<pid>/status` (where they are in kB).
pub fn parse_memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let mut words = line[name.len()..].split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => value.checked_mul(1024),
            _ => None,
        }
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The `tally-server` binary next to the running executable.
pub fn default_server_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the tally-bench executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    Ok(dir.join(format!("tally-server{}", std::env::consts::EXE_SUFFIX)))
}

/// Starts `nodes` fresh replicas of one operator from `binary` (default: next to this
/// executable), each with an account cache of `cache_accounts` (default: the server's).
/// Returns once every replica listens; a cluster may not have elected a leader yet.
pub fn start(
    nodes: usize,
    threshold: bool,
    binary: Option<&Path>,
    cache_accounts: Option<usize>,
    archive: Option<&str>,
) -> Result<StartedServer> {
    if !(1..=NODES_MAX).contains(&nodes) {
        bail!("--nodes must be between 1 and {NODES_MAX}, not {nodes}");
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
        .context("creating a temporary directory for the operator")?;
    if threshold && nodes < 2 {
        bail!("--threshold needs --nodes 2 or more: a single node keeps a plain key");
    }
    let (configs, profile_path) = if nodes == 1 {
        single_node_files(dir.path())?
    } else {
        cluster_files(dir.path(), nodes, threshold)?
    };
    let mut cache = None;
    let mut archive_url = String::new();
    for (_, path) in &configs {
        let mut config = read_config(path)?;
        if let Some(n) = cache_accounts {
            config.cache.accounts_max = n;
        }
        match archive {
            Some("off") => config.archive.url.clear(),
            Some(url) => {
                tally_config::ArchiveUrl::parse(url)
                    .map_err(|e| anyhow!("--archive {url}: {e}"))?;
                config.archive.url = url.to_string();
            }
            None => {}
        }
        write_config(path, &config)?;
        cache = Some(config.cache.accounts_max);
        archive_url = config.archive.url.clone();
    }
    let mut profile = Profile::load(&profile_path)?;
    let mut server = StartedServer {
        children: Vec::new(),
        ids: Vec::new(),
        profile: profile.clone(),
        cache_accounts: cache.ok_or_else(|| anyhow!("no replica config was written"))?,
        archive: archive_url,
        _dir: dir,
    };
    let mut replicas = Vec::new();
    for (id, config_path) in configs {
        // Pushed at once, so that an error below still kills every started replica.
        let (child, address_rx) = spawn(&binary, &config_path)?;
        server.children.push(child);
        server.ids.push(id);
        let child = server.children.last_mut().expect("just pushed");
        let address = wait_for_address(child, &address_rx, &binary, id)?;
        replicas.push(ReplicaAddress { id, address });
    }
    profile.replicas = replicas;
    server.profile = profile;
    Ok(server)
}

/// A development operator's files in `dir/data`, listening on port 0. Returns ([(node id,
/// config path)], profile path).
fn single_node_files(dir: &Path) -> Result<(Vec<(u64, PathBuf)>, PathBuf)> {
    let data = dir.join("data");
    let (_, profile_path) = tally_server::bootstrap::dev_operator(&data)
        .context("setting up a development operator")?;
    let config_path = data.join("config.toml");
    let mut config = read_config(&config_path)?;
    let any: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    config.listen.client = any;
    config.listen.peer = any;
    config.listen.metrics = any;
    write_config(&config_path, &config)?;
    Ok((vec![(config.node.id, config_path)], profile_path))
}

/// An `init-cluster` operator's files in `dir/op`, on free ports. Returns ([(node id, config
/// path)], profile path).
fn cluster_files(
    dir: &Path,
    nodes: usize,
    threshold: bool,
) -> Result<(Vec<(u64, PathBuf)>, PathBuf)> {
    let root = dir.join("op");
    // The base port is a placeholder: every address is rewritten below.
    let certs = tally_server::certs::CertOptions::default();
    let paths = match threshold {
        true => tally_server::bootstrap::init_threshold_cluster(nodes as u64, &root, 7400, &certs),
        false => tally_server::bootstrap::init_cluster(nodes as u64, &root, 7400),
    }
    .context("setting up a cluster (init-cluster)")?;
    let mut configs = Vec::new();
    for path in &paths {
        configs.push(read_config(path)?);
    }
    // Below the ephemeral range and never twice (see `free_local_port`): a port picked with
    // `:0` and released could become a replica's outgoing source port before its own replica
    // bound it (seen in CI: "binding the peer listener ... Address already in use").
    let pick =
        || tally_server::bootstrap::free_local_port().context("finding a free port on 127.0.0.1");
    let mut client = std::collections::HashMap::new();
    let mut peer = std::collections::HashMap::new();
    for config in &configs {
        client.insert(config.node.id, pick()?);
        peer.insert(config.node.id, pick()?);
    }
    let mut out = Vec::new();
    for (path, mut config) in paths.into_iter().zip(configs) {
        let id = config.node.id;
        config.listen.client = client[&id];
        config.listen.peer = peer[&id];
        config.listen.metrics = "127.0.0.1:0".parse().expect("a socket address");
        for p in &mut config.peers {
            p.address = peer[&p.id];
            p.client_address = client[&p.id];
        }
        write_config(&path, &config)?;
        out.push((id, path));
    }
    Ok((out, root.join("profile.toml")))
}

fn read_config(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Config::from_toml_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn write_config(path: &Path, config: &Config) -> Result<()> {
    std::fs::write(path, config.to_toml_string())
        .with_context(|| format!("writing {}", path.display()))
}

/// Starts one replica. Its stdout goes to a thread that hands over the client address, then
/// keeps draining the pipe (a full pipe would block the replica) and passes later lines on to
/// stderr. The thread ends with the process.
fn spawn(binary: &Path, config: &Path) -> Result<(Child, mpsc::Receiver<String>)> {
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(config)
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
    let (address_tx, address_rx) = mpsc::sync_channel::<String>(1);
    let reader = std::thread::Builder::new()
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
        });
    if let Err(e) = reader {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e).context("starting a thread");
    }
    Ok((child, address_rx))
}

/// Waits for the replica's client address, or for it to exit, or for [`START_TIMEOUT`].
fn wait_for_address(
    child: &mut Child,
    address_rx: &mpsc::Receiver<String>,
    binary: &Path,
    id: u64,
) -> Result<String> {
    let started = Instant::now();
    loop {
        match address_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(address) if address.is_empty() => {
                bail!("replica {id} printed an empty client address")
            }
            Ok(address) => return Ok(address),
            Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} (replica {id}) exited ({status}) before listening",
                binary.display()
            );
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "{} (replica {id}) did not print its client address within {} s",
                binary.display(),
                START_TIMEOUT.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_from_proc_status() {
        let status = "Name:\ttally-server\nVmPeak:\t 2000000 kB\nVmHWM:\t  150000 kB\n\
                      VmRSS:\t  120000 kB\nThreads:\t12\n";
        assert_eq!(parse_memory(status), Some((120_000 * 1024, 150_000 * 1024)));
        assert_eq!(parse_memory("VmRSS:\t1 kB\n"), None, "no VmHWM");
        assert_eq!(parse_memory("VmRSS:\tx kB\nVmHWM:\t1 kB\n"), None);
        assert_eq!(
            parse_memory("VmRSS:\t1 MB\nVmHWM:\t1 kB\n"),
            None,
            "unknown unit"
        );
        assert_eq!(parse_memory(""), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_has_memory() {
        let text = std::fs::read_to_string("/proc/self/status").unwrap();
        let (rss, peak) = parse_memory(&text).unwrap();
        assert!(rss > 0 && peak >= rss, "{rss} {peak}");
    }
}

#[cfg(test)]
mod cpu_tests {
    use super::process_cpu_ns;

    /// This test's own process: its CPU time counts this thread's work. (Other tests' threads
    /// run and exit meanwhile, and an exited thread leaves the sum, so the sum is compared with
    /// this thread's own CPU time, not with an earlier sum.)
    #[test]
    fn process_cpu_counts_this_threads_work() {
        let thread_ns = || -> u64 {
            let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("Linux /proc");
            text.split_whitespace().next().unwrap().parse().unwrap()
        };
        let mut x = 1u64;
        while thread_ns() < 30_000_000 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let own = thread_ns();
        let process = process_cpu_ns(std::process::id()).expect("Linux /proc");
        assert!(
            process >= own,
            "process {process} ns < this thread's {own} ns"
        );
    }
}
