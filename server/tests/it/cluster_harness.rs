//! Real multi-process clusters for tests: `init-cluster` files, every replica-to-replica link
//! through a proxy the test controls (to cut and heal partitions), and SIGKILL / restart / wipe.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tally_client::{Client, ClusterClient, ClusterOptions, Profile, ReplicaAddress};
use tally_config::Config;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::harness::Server;

/// A free port on 127.0.0.1 below the ephemeral range, never handed out twice in this process
/// (the tests run in parallel): see `tally_server::bootstrap::free_local_port`.
fn free_port() -> u16 {
    tally_server::bootstrap::free_local_port()
        .expect("a free port on 127.0.0.1")
        .port()
}

/// A free address on 127.0.0.1 (see `free_port`).
pub fn local_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Copies bytes from `r` to `w` until either side closes or `alive` turns false (checked at least
/// every 100 ms, so a cut takes effect on idle connections too).
async fn pump<R, W>(r: &mut R, w: &mut W, alive: &impl Fn() -> bool)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout(Duration::from_millis(100), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
            Err(_) if alive() => continue,
            Err(_) => return,
        };
        if !alive() || w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A one-way TCP proxy for one replica-to-replica link. While cut, it drops every connection.
pub struct LinkProxy {
    cut: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl LinkProxy {
    async fn start(listen: SocketAddr, target: SocketAddr) -> LinkProxy {
        let listener = TcpListener::bind(listen)
            .await
            .expect("binding a link proxy");
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, g) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (c, g) = (c.clone(), g.clone());
                let born = g.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let alive = || !c.load(Ordering::SeqCst) && g.load(Ordering::SeqCst) == born;
                    let a = pump(&mut ri, &mut wo, &alive);
                    let b = pump(&mut ro, &mut wi, &alive);
                    tokio::select! { _ = a => {}, _ = b => {} }
                });
            }
        });
        LinkProxy { cut, generation }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct Cluster {
    /// Owns the operator's files; removed when the cluster is dropped.
    pub _dir: tempfile::TempDir,
    pub profile: Profile,
    pub configs: HashMap<u64, PathBuf>,
    pub servers: HashMap<u64, Server>,
    /// (from, to) → the proxy `from` dials to reach `to`.
    pub links: HashMap<(u64, u64), LinkProxy>,
    pub ids: Vec<u64>,
}

impl Cluster {
    /// Writes an N-replica operator with `init-cluster`, then rewires it onto free ports with a
    /// proxy on every directed replica link. `tweak` adjusts every replica's config.
    pub async fn new(nodes: u64, tweak: impl Fn(&mut Config)) -> Cluster {
        Cluster::build(nodes, false, tweak).await
    }

    /// [`Cluster::new`] of a threshold operator (`init-cluster --threshold`): each replica
    /// holds its share of the operator key, none the key.
    pub async fn threshold(nodes: u64, tweak: impl Fn(&mut Config)) -> Cluster {
        Cluster::build(nodes, true, tweak).await
    }

    /// The directory `init-cluster` wrote the operator's files into.
    pub fn operator_dir(&self) -> PathBuf {
        self._dir.path().join("op")
    }

    async fn build(nodes: u64, threshold: bool, tweak: impl Fn(&mut Config)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("op");
        match threshold {
            true => {
                let certs = tally_server::certs::CertOptions::default();
                tally_server::bootstrap::init_threshold_cluster(nodes, &root, 1000, &certs)
                    .expect("init-cluster --threshold");
            }
            false => {
                tally_server::bootstrap::init_cluster(nodes, &root, 1000).expect("init-cluster");
            }
        }
        let ids: Vec<u64> = (1..=nodes).collect();
        let client: HashMap<u64, SocketAddr> = ids
            .iter()
            .map(|&i| (i, SocketAddr::from(([127, 0, 0, 1], free_port()))))
            .collect();
        let peer: HashMap<u64, SocketAddr> = ids
            .iter()
            .map(|&i| (i, SocketAddr::from(([127, 0, 0, 1], free_port()))))
            .collect();
        let mut links = HashMap::new();
        let mut link_addr = HashMap::new();
        for &from in &ids {
            for &to in &ids {
                if from != to {
                    let at = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    links.insert((from, to), LinkProxy::start(at, peer[&to]).await);
                    link_addr.insert((from, to), at);
                }
            }
        }
        let mut configs = HashMap::new();
        for &id in &ids {
            let path = root.join(format!("node{id}.toml"));
            let mut config =
                Config::from_toml_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config.listen.client = client[&id];
            config.listen.peer = peer[&id];
            config.listen.metrics = "127.0.0.1:0".parse().unwrap();
            for p in config.peers.iter_mut() {
                p.address = link_addr[&(id, p.id)];
                p.client_address = client[&p.id];
            }
            tweak(&mut config);
            std::fs::write(&path, config.to_toml_string()).unwrap();
            configs.insert(id, path);
        }
        let mut profile = Profile::load(root.join("profile.toml")).unwrap();
        profile.replicas = ids
            .iter()
            .map(|&id| ReplicaAddress {
                id,
                address: client[&id].to_string(),
            })
            .collect();
        Cluster {
            _dir: dir,
            profile,
            configs,
            servers: HashMap::new(),
            links,
            ids,
        }
    }

    pub fn start(&mut self, id: u64) {
        let server = Server::start_replica(&self.configs[&id], &self.profile, id);
        self.servers.insert(id, server);
    }

    pub fn start_all(&mut self) {
        for id in self.ids.clone() {
            self.start(id);
        }
    }

    pub fn kill(&mut self, id: u64) {
        if let Some(s) = self.servers.remove(&id) {
            s.kill();
        }
    }

    /// Deletes a (stopped) replica's ledger and raft log.
    pub fn wipe(&self, id: u64) {
        let data = self.data_dir(id);
        std::fs::remove_dir_all(&data).unwrap();
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.configs[&id]
            .parent()
            .unwrap()
            .join(format!("node{id}"))
    }

    /// Cuts (or heals) every link between `id` and the others, both directions.
    pub fn isolate(&self, id: u64, cut: bool) {
        for (&(from, to), proxy) in &self.links {
            if from == id || to == id {
                proxy.set_cut(cut);
            }
        }
    }

    pub fn cluster_client(&self) -> ClusterClient {
        let opts = ClusterOptions {
            total_timeout: Duration::from_secs(30),
            ..ClusterOptions::default()
        };
        ClusterClient::new(&self.profile, opts)
    }

    pub async fn try_client_of(&self, id: u64) -> Result<Client, tally_client::Error> {
        let addr = self
            .profile
            .replicas
            .iter()
            .find(|r| r.id == id)
            .unwrap()
            .address
            .clone();
        Client::connect_to(addr.as_str(), &self.profile).await
    }

    pub async fn client_of(&self, id: u64) -> Client {
        let addr = self
            .profile
            .replicas
            .iter()
            .find(|r| r.id == id)
            .unwrap()
            .address
            .clone();
        Client::connect_to(addr.as_str(), &self.profile)
            .await
            .expect("connect")
    }

    /// Waits until some replica leads and takes writes; returns its id.
    pub async fn leader(&self) -> u64 {
        for _ in 0..400 {
            for &id in self.servers.keys() {
                if let Ok(c) =
                    tokio::time::timeout(Duration::from_millis(500), self.client_of(id)).await
                {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_millis(500), c.status()).await
                    {
                        if s.writable {
                            return id;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no replica became a writable leader within 20 s");
    }
}
