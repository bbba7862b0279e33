//! The cluster as one replica sees it, shared lock-free with connection tasks, the peer
//! transport and the snapshot installer: who leads, this replica's role, whether it takes
//! writes, every replica's addresses (the address book), and what `GetInfo` answers.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::RwLock;

use tally_core::engine::members::AddressBook;
use tally_wire::{ErrorCode, ErrorReply, Retry};

/// What `GetInfo` answers for a replica run with `config` and the operator key `operator`, whose
/// per-address connection limit in force is `connections_per_address_max` (after
/// `limits::connection_sizing`).
pub fn info_reply(
    config: &tally_config::Config,
    operator: tally_wire::PublicKey,
    connections_per_address_max: usize,
) -> tally_wire::InfoReply {
    let limits = &config.limits;
    let ms = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    tally_wire::InfoReply {
        chain_id: config.chain_id_bytes(),
        operator_public_key: operator,
        node_id: config.node.id,
        frame_bytes_max: config.limits.frame_bytes_max,
        reply_payload_bytes_max: tally_wire::REPLY_PAYLOAD_BYTES_MAX,
        requests_in_flight_max: config.limits.requests_in_flight_per_connection_max,
        headers_per_reply_max: tally_wire::HEADERS_PER_REPLY_MAX,
        client_limits: Some(tally_wire::ClientLimits {
            handshake_timeout_ms: ms(limits.handshake_timeout_ms),
            first_request_timeout_ms: ms(limits.first_request_timeout_ms),
            frame_timeout_ms: ms(limits.frame_timeout_ms),
            idle_timeout_ms: ms(limits.idle_timeout_ms),
            write_timeout_ms: ms(limits.write_timeout_ms),
            connections_per_address_max: u32::try_from(connections_per_address_max)
                .unwrap_or(u32::MAX),
        }),
    }
}

/// Cluster state shared with connection tasks (lock-free reads).
pub struct ClusterView {
    pub node_id: u64,
    pub leader_id: AtomicU64,
    pub term: AtomicU64,
    pub role: AtomicU8,
    pub commit_index: AtomicU64,
    /// Set when this replica leads and its master may sequence.
    pub writable: std::sync::atomic::AtomicBool,
    /// Client addresses of every replica, for `not_leader` hints (the address book's).
    client_addresses: RwLock<HashMap<u64, String>>,
    /// Peer addresses of the other replicas (the address book's): whom to dial, whose
    /// connections to accept, where to download a snapshot from.
    peer_addresses: RwLock<BTreeMap<u64, SocketAddr>>,
    /// The answer to `GetInfo` (the ledger and this replica's limits), once the node set it.
    pub info: Option<tally_wire::InfoReply>,
}

impl ClusterView {
    /// The view of replica `node_id`, knowing the replicas in `book`.
    pub fn new(node_id: u64, book: &AddressBook) -> ClusterView {
        let view = ClusterView {
            node_id,
            leader_id: AtomicU64::new(0),
            term: AtomicU64::new(0),
            role: AtomicU8::new(0),
            commit_index: AtomicU64::new(0),
            writable: std::sync::atomic::AtomicBool::new(false),
            client_addresses: RwLock::new(HashMap::new()),
            peer_addresses: RwLock::new(BTreeMap::new()),
            info: None,
        };
        view.set_book(book);
        view
    }

    /// The view, answering `GetInfo` with `info`.
    pub fn with_info(self, info: tally_wire::InfoReply) -> ClusterView {
        ClusterView {
            info: Some(info),
            ..self
        }
    }

    pub fn leader_hint(&self) -> String {
        let leader = self.leader_id.load(Ordering::SeqCst);
        if leader == self.node_id {
            return String::new();
        }
        let addresses = self.client_addresses.read().expect("view lock");
        addresses.get(&leader).cloned().unwrap_or_default()
    }

    /// Takes the replicas' addresses from the address book (an address that does not parse is
    /// left out of the peers: it cannot be dialed).
    pub fn set_book(&self, book: &AddressBook) {
        let mut clients = self.client_addresses.write().expect("view lock");
        let mut peers = self.peer_addresses.write().expect("view lock");
        clients.clear();
        peers.clear();
        for (id, a) in &book.0 {
            clients.insert(*id, a.client.clone());
            if *id == self.node_id {
                continue;
            }
            match a.peer.parse::<SocketAddr>() {
                Ok(addr) => {
                    peers.insert(*id, addr);
                }
                Err(e) => tracing::warn!(peer = id, "peer address {:?}: {e}", a.peer),
            }
        }
    }

    /// The other replicas' peer addresses.
    pub fn peers(&self) -> Vec<(u64, SocketAddr)> {
        let peers = self.peer_addresses.read().expect("view lock");
        peers.iter().map(|(id, a)| (*id, *a)).collect()
    }

    pub fn is_peer(&self, id: u64) -> bool {
        let peers = self.peer_addresses.read().expect("view lock");
        peers.contains_key(&id)
    }

    /// The answer to a write this replica cannot take now.
    pub fn not_writable(&self) -> ErrorReply {
        let leader = self.leader_id.load(Ordering::SeqCst);
        if leader != 0 && leader != self.node_id {
            let mut r =
                ErrorReply::new(ErrorCode::NotLeader, format!("node {leader} is the leader"));
            r.leader_hint = self.leader_hint();
            r.retry = Retry::Elsewhere;
            r
        } else {
            let mut r = ErrorReply::new(
                ErrorCode::Unavailable,
                "no leader is ready yet; retry shortly",
            );
            r.retry_after_ms = 100;
            r
        }
    }
}

/// The newest checkpoint the leader's witnesses cosigned (`witnesses.rs`), with their
/// cosignature lines, for `GetCheckpoint` and the explorer.
#[derive(Default)]
pub struct Witnessed(std::sync::Mutex<Option<String>>);

impl Witnessed {
    pub fn latest(&self) -> Option<String> {
        self.0.lock().expect("witnessed").clone()
    }

    pub fn publish(&self, note: String) {
        *self.0.lock().expect("witnessed") = Some(note);
    }
}
