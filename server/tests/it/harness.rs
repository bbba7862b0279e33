//! Starts and stops real `tally-server` processes for tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tally_client::{Client, Profile, ReplicaAddress};
use tally_config::Config;

/// A development operator's files in a temporary directory, reconfigured to listen on port 0.
pub struct Operator {
    /// Owns the operator's files; removed when the operator is dropped.
    pub _dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub profile: Profile,
}

impl Operator {
    /// `tweak` adjusts the generated config (limits, timeouts) before the first start.
    pub fn new(tweak: impl FnOnce(&mut Config)) -> Operator {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let (_, profile_path) = tally_server::bootstrap::dev_operator(&data).expect("bootstrap");
        let config_path = data.join("config.toml");
        let mut config =
            Config::from_toml_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        config.listen.client = any;
        config.listen.peer = any;
        config.listen.metrics = any;
        tweak(&mut config);
        std::fs::write(&config_path, config.to_toml_string()).unwrap();
        let profile = Profile::load(&profile_path).expect("profile");
        Operator {
            _dir: dir,
            config_path,
            profile,
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.config_path.parent().unwrap()
    }

    pub fn start(&self) -> Server {
        Server::start(&self.config_path, &self.profile)
    }
}

/// A running server process; killed (SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub profile: Profile,
    pub addr: String,
    /// `ip:port` of the plain-HTTP `/metrics`, `/health`, `/ready` endpoint.
    pub metrics_addr: String,
    /// Kept so the reader thread keeps draining the pipe (a closed pipe would fail the
    /// server's last lines at shutdown).
    pub _stdout: mpsc::Receiver<String>,
}

impl Server {
    fn start(config: &Path, profile: &Profile) -> Server {
        Server::start_replica(config, profile, 1)
    }

    /// Starts replica `id` from its config; its `profile` lists only this replica.
    pub fn start_replica(config: &Path, profile: &Profile, id: u64) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally-server"))
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning tally-server");
        let rx = lines(Box::new(child.stdout.take().unwrap()));
        let (addr, metrics_addr) = wait_started(&rx);
        let mut profile = profile.clone();
        profile.replicas = vec![ReplicaAddress {
            id,
            address: addr.clone(),
        }];
        Server {
            child,
            profile,
            addr,
            metrics_addr,
            _stdout: rx,
        }
    }

    /// A connection to this replica, once it leads and takes writes (a single node elects
    /// itself within a moment of starting).
    pub async fn client(&self) -> Client {
        let client = Client::connect(&self.profile).await.expect("connecting");
        wait_writable(&client).await;
        client
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit by itself (killed if it has not within `timeout`: None).
    pub fn wait_exit(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tally-server did not stop within 10 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `status` until the replica says it takes writes.
pub async fn wait_writable(client: &Client) {
    for _ in 0..200 {
        if client.status().await.is_ok_and(|s| s.writable) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replica did not become writable within 10 s");
}

/// The tokio runtime a test drives its clients on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A child's pipe, line by line, read on a thread of its own.
pub fn lines(pipe: Box<dyn std::io::Read + Send>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads a starting server's stdout until it has printed its client and metrics addresses.
pub fn wait_started(stdout: &mpsc::Receiver<String>) -> (String, String) {
    let (mut addr, mut metrics_addr) = (None, None);
    while addr.is_none() || metrics_addr.is_none() {
        let line = stdout
            .recv_timeout(Duration::from_secs(60))
            .expect("tally-server did not start");
        if let Some(rest) = line.split(" listening for clients on ").nth(1) {
            addr = Some(rest.split_whitespace().next().unwrap().to_string());
        }
        if let Some(rest) = line.split(" metrics on http://").nth(1) {
            metrics_addr = Some(rest.trim_end_matches("/metrics").to_string());
        }
    }
    (addr.unwrap(), metrics_addr.unwrap())
}

/// Runs `tally --profile PROFILE --json ARGS`: (exit code, stdout as JSON, or Null).
pub fn cli(profile: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(crate::envelopes::tally_bin())
        .arg("--profile")
        .arg(profile)
        .arg("--json")
        .args(args)
        .output()
        .expect("tally");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json)
}
