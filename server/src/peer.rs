//! The replication transport: raft messages between replicas over mutual TLS.
//!
//! Every replica dials every other one and uses that connection only to send; it receives on
//! the connections the others dial to it. A dialing replica first sends a hello (magic `TLYP`,
//! version, its node id, the chain id); the accepting side checks that the client certificate,
//! issued by the operator's CA, is valid for `node-<id>.tally` of the id the hello claims, and
//! that the chain id is its own, before a single raft byte is decoded. Then each message is a
//! u32 little-endian length, a kind byte ([`FRAME_RAFT`]: a protobuf-encoded
//! `raft::eraftpb::Message`; [`FRAME_SIGN`]: a threshold signing message,
//! `tally_core::signing::SignMsg`) and the message, capped at `raft.max_message_bytes`. raft-rs decodes with protobuf 2.x (RUSTSEC-2024-0437), so only
//! authenticated, size-checked bytes ever reach the decoder.
//!
//! Limits: each outbound peer has a queue of `PEER_QUEUE_MAX` messages; when it is full a message
//! is dropped, which raft tolerates (it retransmits). Inbound messages go to the raft thread with
//! `try_send` and are dropped when its queue is full, for the same reason. The peer port holds at
//! most `limits.peer_connections_max` connections, authenticated or not, of which one address may
//! have an eighth (at least two) before their certificates were checked; the TLS handshake and
//! the hello share one deadline,
//! `limits.handshake_timeout_ms`. A refused or failed inbound connection (anyone on the network
//! can make one) logs at most one line per [`RATE_LOG_INTERVAL_MS`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::Sender;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tally_core::replica::decode_message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::certs::node_name;
use crate::channels::RaftEvent;
use crate::limits::{
    is_out_of_descriptors, peer_handshakes_per_address_max, AddressLimit, AddressSlot,
};
use crate::rate_log;
use crate::ratelog::{RateLog, RATE_LOG_INTERVAL_MS};
use crate::tls::{load_certs, load_key};

pub const HELLO_MAGIC: [u8; 4] = *b"TLYP";
/// 2: every frame starts with its kind byte.
pub const HELLO_VERSION: u8 = 2;
pub const HELLO_BYTES: usize = 4 + 1 + 8 + 32 + 1;
/// Hello channel kinds: a stream of raft messages, or one ledger snapshot download.
pub const CHANNEL_RAFT: u8 = 0;
pub const CHANNEL_SNAPSHOT: u8 = 1;
/// Frame kinds on a raft channel.
pub const FRAME_RAFT: u8 = 0;
pub const FRAME_SIGN: u8 = 1;
/// A frame: its kind and its message.
pub type Frame = (u8, Vec<u8>);
/// Messages waiting for one peer's connection.
pub const PEER_QUEUE_MAX: usize = 4096;

static INBOUND_LOG: RateLog = RateLog::new(RATE_LOG_INTERVAL_MS);
static REFUSED_LOG: RateLog = RateLog::new(RATE_LOG_INTERVAL_MS);

/// TLS configurations for the peer listener (client certificates required) and for dialing.
pub fn peer_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).context("adding the CA certificate")?;
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .context("building the peer certificate verifier")?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("peer TLS certificate and key")?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .context("peer TLS client certificate and key")?;
    Ok((Arc::new(server), Arc::new(client)))
}

pub fn hello(node_id: u64, chain_id: &[u8; 32], channel: u8) -> [u8; HELLO_BYTES] {
    let mut h = [0u8; HELLO_BYTES];
    h[0..4].copy_from_slice(&HELLO_MAGIC);
    h[4] = HELLO_VERSION;
    h[5..13].copy_from_slice(&node_id.to_le_bytes());
    h[13..45].copy_from_slice(chain_id);
    h[45] = channel;
    h
}

/// The sending side of the transport, held by the raft thread: one dialing task and queue per
/// other replica in the address book, started and stopped as the book changes.
pub struct PeerSenders {
    senders: std::collections::HashMap<u64, (std::net::SocketAddr, mpsc::Sender<Frame>)>,
    dialer: Dialer,
}

/// What starting a dialing task takes.
struct Dialer {
    settings: Arc<PeerSettings>,
    client: Arc<ClientConfig>,
    events: Sender<RaftEvent>,
    shutdown: watch::Receiver<bool>,
    runtime: tokio::runtime::Handle,
}

impl PeerSenders {
    /// Queues an encoded message of kind `kind` for `to`; false when it was dropped (queue
    /// full or unknown).
    pub fn send(&self, to: u64, kind: u8, bytes: Vec<u8>) -> bool {
        self.senders
            .get(&to)
            .is_some_and(|(_, tx)| tx.try_send((kind, bytes)).is_ok())
    }

    /// The replicas this one dials.
    pub fn ids(&self) -> Vec<u64> {
        self.senders.keys().copied().collect()
    }

    /// Dials exactly `peers`: a new replica (or a new address) gets a task, a replica no longer
    /// named loses its queue, which ends its task.
    pub fn sync(&mut self, peers: &[(u64, std::net::SocketAddr)]) {
        self.senders
            .retain(|id, (addr, _)| peers.iter().any(|(p, a)| p == id && a == addr));
        for &(id, addr) in peers {
            if !self.senders.contains_key(&id) {
                let tx = self.dialer.start(id, addr);
                self.senders.insert(id, (addr, tx));
            }
        }
    }
}

impl Dialer {
    fn start(&self, id: u64, addr: std::net::SocketAddr) -> mpsc::Sender<Frame> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let s = &self.settings;
        let dial = Dial {
            id,
            addr,
            hello: hello(s.node_id, &s.chain_id, CHANNEL_RAFT),
            write_timeout: s.write_timeout,
        };
        self.runtime.spawn(dial_loop(
            dial,
            rx,
            TlsConnector::from(self.client.clone()),
            self.events.clone(),
            self.shutdown.clone(),
        ));
        tx
    }
}

pub struct PeerSettings {
    pub node_id: u64,
    pub chain_id: [u8; 32],
    /// Who the other replicas are (the address book, kept current by the raft thread).
    pub view: Arc<crate::view::ClusterView>,
    pub max_message_bytes: u64,
    pub snapshot_chunk_bytes: u32,
    /// Where snapshot downloads get the ledger dump from (the storage thread).
    pub storage: Sender<crate::channels::StorageCmd>,
    /// Open inbound connections on the peer port (`limits.peer_connections_max`, fitted to the
    /// descriptor limit).
    pub connections_max: usize,
    /// For the TLS handshake and the hello together (`limits.handshake_timeout_ms`).
    pub handshake_timeout: Duration,
    /// For each write to a peer: a batch of raft messages, a snapshot chunk
    /// (`limits.write_timeout_ms`).
    pub write_timeout: Duration,
}

/// Starts one dialing task per peer the view names, on the current runtime.
pub fn start_outbound(
    settings: Arc<PeerSettings>,
    client: Arc<ClientConfig>,
    events: Sender<RaftEvent>,
    shutdown: watch::Receiver<bool>,
) -> PeerSenders {
    let peers = settings.view.peers();
    let dialer = Dialer {
        settings,
        client,
        events,
        shutdown,
        runtime: tokio::runtime::Handle::current(),
    };
    let mut senders = PeerSenders {
        senders: std::collections::HashMap::new(),
        dialer,
    };
    senders.sync(&peers);
    senders
}

/// Bytes a peer connection's writer gathers before handing them to TLS (each flush sends sooner).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// One outbound peer: whom to dial, what to say first, how long a write may take.
struct Dial {
    id: u64,
    addr: std::net::SocketAddr,
    hello: [u8; HELLO_BYTES],
    write_timeout: Duration,
}

async fn dial_loop(
    dial: Dial,
    mut rx: mpsc::Receiver<Frame>,
    connector: TlsConnector,
    events: Sender<RaftEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let id = dial.id;
    let mut backoff = Duration::from_millis(50);
    loop {
        let tls = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            r = connect(&dial, &connector) => match r {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(peer = id, "dialing failed: {e}");
                    let _ = events.try_send(RaftEvent::Unreachable(id));
                    // Drop what queued up meanwhile: raft will resend what still matters.
                    while rx.try_recv().is_ok() {}
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let connected_at = tokio::time::Instant::now();
        tracing::info!(peer = id, addr = %dial.addr, "connected to peer");
        let link = (&mut rx, &events, &mut shutdown);
        if serve_dialed(tls, &dial, link).await == Served::Shutdown {
            return;
        }
        // A peer that closes a connection at once (it refuses us) is not dialed in a loop.
        match connected_at.elapsed() >= Duration::from_secs(1) {
            true => backoff = Duration::from_millis(50),
            false => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
            }
        }
    }
}

/// Dials the peer and says hello.
async fn connect(
    dial: &Dial,
    connector: &TlsConnector,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(dial.addr)).await??;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(node_name(dial.id))?;
    let mut tls =
        tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await??;
    tls.write_all(&dial.hello).await?;
    tls.flush().await?;
    Ok(tls)
}

#[derive(PartialEq, Eq)]
enum Served {
    /// The connection ended (closed by the peer, or a write failed or timed out).
    Ended,
    Shutdown,
}

/// Sends the queued raft messages on a dialed connection until it ends or the node stops.
async fn serve_dialed(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    dial: &Dial,
    (rx, events, shutdown): DialLink<'_>,
) -> Served {
    let id = dial.id;
    // The peer sends nothing on this connection; reading it only watches for its end, so
    // that a peer that died (the kernel closes its sockets) is dialed again at once rather
    // than when the next message finds the socket dead: a follower writes to another only
    // to ask for its vote, and that vote would be lost.
    let (mut watch_closed, tls) = tokio::io::split(tls);
    // tokio-rustls seals and sends a record on every write: buffered, a frame's length
    // prefix and the small messages queued together share records and syscalls.
    let mut tls = tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, tls);
    loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.changed() => return Served::Shutdown,
            _ = until_closed(&mut watch_closed) => {
                tracing::info!(peer = id, "peer connection closed");
                let _ = events.try_send(RaftEvent::Unreachable(id));
                return Served::Ended;
            }
            m = rx.recv() => match m { Some(m) => m, None => return Served::Shutdown },
        };
        // A peer that does not read is dropped after write_timeout_ms and dialed again;
        // what it missed, raft resends.
        let sent = tokio::time::timeout(dial.write_timeout, send_queued(&mut tls, msg, rx));
        if !matches!(sent.await, Ok(Ok(()))) {
            tracing::info!(peer = id, "peer connection lost");
            let _ = events.try_send(RaftEvent::Unreachable(id));
            return Served::Ended;
        }
    }
}

/// What a dialed connection serves: the peer's queue, the raft thread's events, the stop.
type DialLink<'a> = (
    &'a mut mpsc::Receiver<Frame>,
    &'a Sender<RaftEvent>,
    &'a mut watch::Receiver<bool>,
);

/// The longest pause between two dials of a peer that cannot be reached (a restarted peer is
/// dialed again within this long of listening).
const DIAL_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Returns once the connection ends (its end, or an error); discards anything it reads.
async fn until_closed<R: tokio::io::AsyncRead + Unpin>(r: &mut R) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Writes `first` and whatever else is queued, then flushes: one TLS flush for a burst.
async fn send_queued<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    first: Frame,
    rx: &mut mpsc::Receiver<Frame>,
) -> std::io::Result<()> {
    write_kind_frame(w, &first).await?;
    while let Ok(m) = rx.try_recv() {
        write_kind_frame(w, &m).await?;
    }
    w.flush().await
}

/// A raft channel's frame: length (of the kind byte and the message), kind, message.
async fn write_kind_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    (kind, bytes): &Frame,
) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u32 + 1).to_le_bytes()).await?;
    w.write_all(&[*kind]).await?;
    w.write_all(bytes).await
}

/// A snapshot channel's frame: length, bytes.
async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    w.write_all(bytes).await
}

/// Accepts peer connections and feeds their messages to the raft thread.
pub async fn serve_inbound(
    listener: TcpListener,
    server: Arc<ServerConfig>,
    settings: Arc<PeerSettings>,
    events: Sender<RaftEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(server);
    let open = Arc::new(tokio::sync::Semaphore::new(settings.connections_max));
    let handshaking = AddressLimit::new(peer_handshakes_per_address_max(settings.connections_max));
    loop {
        let (tcp, remote) = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    rate_log!(REFUSED_LOG, warn, "peer port: accept failed: {e}");
                    if is_out_of_descriptors(&e) {
                        let pause = crate::limits::ACCEPT_PAUSE_MS;
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    continue;
                }
            },
        };
        let Some(slot) = handshaking.try_enter(remote.ip()) else {
            rate_log!(REFUSED_LOG, info, %remote, "peer port: connection refused: too many handshakes from one address");
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            rate_log!(REFUSED_LOG, info, %remote, "peer port: connection refused: limits.peer_connections_max reached");
            continue;
        };
        let (acceptor, settings, events, shutdown) = (
            acceptor.clone(),
            settings.clone(),
            events.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = inbound(tcp, slot, acceptor, &settings, events, shutdown).await {
                rate_log!(INBOUND_LOG, warn, %remote, "peer connection refused or closed: {e:#}");
            }
            drop(permit);
        });
    }
}

/// Serves one inbound peer connection; `handshaking` counts it against its address until the
/// peer proved who it is.
async fn inbound(
    tcp: TcpStream,
    handshaking: AddressSlot,
    acceptor: TlsAcceptor,
    settings: &PeerSettings,
    events: Sender<RaftEvent>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    tcp.set_nodelay(true)?;
    // One deadline for the handshake and the hello: nothing about this connection is known yet.
    let mut h = [0u8; HELLO_BYTES];
    let greet = async {
        let mut tls = acceptor.accept(tcp).await?;
        tls.read_exact(&mut h).await?;
        std::io::Result::Ok(tls)
    };
    let mut tls = tokio::time::timeout(settings.handshake_timeout, greet)
        .await
        .map_err(|_| anyhow!("no TLS handshake and hello within limits.handshake_timeout_ms"))??;
    if h[0..4] != HELLO_MAGIC || h[4] != HELLO_VERSION {
        bail!("not a tally peer hello");
    }
    let claimed = u64::from_le_bytes(h[5..13].try_into().expect("8 bytes"));
    if h[13..45] != settings.chain_id {
        bail!("peer {claimed} belongs to another chain");
    }
    if !settings.view.is_peer(claimed) {
        bail!("node {claimed} is not a peer of this replica");
    }
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or_else(|| anyhow!("no client certificate"))?;
    check_cert_names(&certs[0], claimed)?;
    drop(handshaking);
    match h[45] {
        CHANNEL_RAFT => {}
        CHANNEL_SNAPSHOT => return serve_snapshot(tls, settings, claimed).await,
        other => bail!("peer {claimed} asked for unknown channel {other}"),
    }
    let read = read_raft_frames(&mut tls, claimed, settings, &events, &mut shutdown).await;
    if !*shutdown.borrow() {
        // Queue full: raft's own election timeout still notices a dead leader.
        let _ = events.try_send(RaftEvent::PeerClosed(claimed));
    }
    read
}

/// Feeds an authenticated peer's raft channel to the raft thread until it closes (Ok), sends
/// what is not a frame (Err), or the node stops.
async fn read_raft_frames<S: AsyncReadExt + Unpin>(
    tls: &mut S,
    claimed: u64,
    settings: &PeerSettings,
    events: &Sender<RaftEvent>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let mut len = [0u8; 4];
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            r = tls.read_exact(&mut len) => { if r.is_err() { return Ok(()); } }
        }
        let len = u32::from_le_bytes(len) as u64;
        if len == 0 || len > settings.max_message_bytes {
            bail!("peer {claimed} sent a {len}-byte frame, not in 1..=raft.max_message_bytes");
        }
        let mut buf = vec![0u8; len as usize];
        tokio::time::timeout(Duration::from_secs(30), tls.read_exact(&mut buf)).await??;
        // Full queue: drop; raft retransmits, and the signing stage asks again.
        let _ = events.try_send(peer_event(claimed, buf[0], &buf[1..])?);
    }
}

/// What an authenticated peer's frame becomes; an error closes its connection.
fn peer_event(claimed: u64, kind: u8, bytes: &[u8]) -> Result<RaftEvent> {
    match kind {
        FRAME_RAFT => {
            let msg = decode_message(bytes)?;
            if msg.from != claimed {
                bail!(
                    "peer {claimed} sent a message claiming to be from {}",
                    msg.from
                );
            }
            Ok(RaftEvent::Peer(msg))
        }
        FRAME_SIGN => {
            let msg = tally_core::signing::SignMsg::decode(bytes)?;
            Ok(RaftEvent::SignPeer { from: claimed, msg })
        }
        other => bail!("peer {claimed} sent a frame of unknown kind {other}"),
    }
}

/// Refuses a certificate that is not valid for the node id the peer claims.
pub fn check_cert_names(cert: &CertificateDer<'_>, claimed: u64) -> Result<()> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| anyhow!("bad peer certificate: {e:?}"))?;
    let name = ServerName::try_from(node_name(claimed))?;
    ee.verify_is_valid_for_subject_name(&name).map_err(|_| {
        anyhow!(
            "the peer's certificate is not for node {claimed} (expected {})",
            node_name(claimed)
        )
    })
}

/// Streams this replica's ledger to a peer that was sent a raft snapshot: frames of a u32 LE
/// length and a chunk of the dump (see `tally_storage::transfer`), then a zero length.
async fn serve_snapshot<S: AsyncWriteExt + Unpin>(
    mut tls: S,
    settings: &PeerSettings,
    peer: u64,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let dump = crate::channels::StorageCmd::Dump {
        chunk_bytes_max: settings.snapshot_chunk_bytes as usize,
        out: tx,
        done: done_tx,
    };
    // The storage queue is bounded and its send blocks when full: never on a tokio worker.
    let storage = settings.storage.clone();
    let sent = tokio::task::spawn_blocking(move || storage.send(dump).is_ok()).await?;
    if !sent {
        bail!("the storage thread has stopped");
    }
    let mut bytes = 0u64;
    // The storage thread waits on this stream's queue: a peer that stops reading must not hold
    // it past write_timeout_ms.
    let late = || anyhow!("peer {peer} took no snapshot chunk within limits.write_timeout_ms");
    while let Some(chunk) = rx.recv().await {
        bytes += chunk.len() as u64;
        let write = write_frame(&mut tls, &chunk);
        tokio::time::timeout(settings.write_timeout, write)
            .await
            .map_err(|_| late())??;
    }
    let meta = tokio::task::spawn_blocking(move || done_rx.recv())
        .await?
        .map_err(|_| anyhow!("the storage thread stopped during the dump"))??;
    write_frame(&mut tls, &[]).await?;
    tls.flush().await?;
    tracing::info!(peer, bytes, height = meta.height, "sent a ledger snapshot");
    Ok(())
}

/// Downloads a peer's ledger dump, handing each chunk to `push`. Runs on the caller's runtime.
pub async fn fetch_snapshot(
    addr: std::net::SocketAddr,
    peer: u64,
    node_id: u64,
    chain_id: [u8; 32],
    chunk_bytes_max: u32,
    client: Arc<ClientConfig>,
    mut push: impl FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let name = ServerName::try_from(node_name(peer))?;
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        TlsConnector::from(client).connect(name, tcp),
    )
    .await??;
    tls.write_all(&hello(node_id, &chain_id, CHANNEL_SNAPSHOT))
        .await?;
    tls.flush().await?;
    let mut total = 0u64;
    loop {
        let mut len = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(60), tls.read_exact(&mut len)).await??;
        let len = u32::from_le_bytes(len);
        if len == 0 {
            return Ok(total);
        }
        if len > chunk_bytes_max {
            bail!("peer {peer} sent a {len}-byte snapshot chunk, over raft.snapshot_chunk_bytes");
        }
        let mut buf = vec![0u8; len as usize];
        tokio::time::timeout(Duration::from_secs(60), tls.read_exact(&mut buf)).await??;
        total += len as u64;
        push(&buf)?;
    }
}
