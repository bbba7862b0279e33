//! What a remote party may hold of this process: descriptors, connections per address, and bytes
//! of replies not yet written. One place for each of those decisions; `net.rs` and `peer.rs`
//! apply them.
//!
//! - Descriptors: [`raise_descriptor_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at
//!   start; [`size_for_descriptors`] fits the connection limits under it, keeping back
//!   [`descriptors_reserved`]: every LevelDB database that can be open at once, the archive,
//!   the HTTP endpoint and outbound peers.
//! - Addresses: [`AddressLimit`] counts open connections per IPv4 address or IPv6 /64, and
//!   [`HandshakeRate`] limits how fast one opens new ones.
//! - Replies: every request reserves the largest reply it can get ([`reply_bytes_bound`]) from its
//!   connection's budget (waiting: backpressure) and from the server's (not waiting: `busy`);
//!   the reservation travels with the reply ([`ReplyPermit`]) and is returned once the reply was
//!   written to the socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tally_config::LimitsConfig;
use tally_wire::{Message, FRAME_HEADER_BYTES, HEADERS_PER_REPLY_MAX, SIGNED_HEADER_BYTES};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a listener stops accepting after `accept` failed for want of descriptors.
pub const ACCEPT_PAUSE_MS: u64 = 100;
/// Open connections the metrics endpoint (`/metrics`, `/health`, `/ready`) holds at most.
pub const METRICS_CONNECTIONS_MAX: usize = 64;

/// Descriptors one LevelDB database holds besides its table files: its lock (`LOCK`), info log
/// (`LOG`), write-ahead log and manifest, and while it switches to new ones or writes a table,
/// a second log or manifest and the table being written.
pub const DESCRIPTORS_PER_DATABASE_BESIDES_TABLES: u64 = 6;

/// Descriptors the process holds whatever happens: standard streams, the tokio runtime's epoll
/// and wake-up descriptors, the signal handler, the listeners of the client and peer ports,
/// the request filter's file at a clean stop, files read at start, the client listener's
/// [`SPARE_DESCRIPTORS`]. Generous by design.
pub const DESCRIPTORS_OF_THE_PROCESS: u64 = 32;
const _: () = assert!(SPARE_DESCRIPTORS as u64 <= DESCRIPTORS_OF_THE_PROCESS / 4);

/// Descriptors the client listener holds back ([`SpareDescriptors`]) and gives up when
/// `accept` runs out, so that the ledger's own files still open.
pub const SPARE_DESCRIPTORS: usize = 8;

/// What [`descriptors_reserved`] keeps out of the connection limits, term by term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorReserve {
    /// The live databases: the ledger's state and history, each with `TABLE_FILES_OPEN_MAX`
    /// tables.
    pub live_databases: u64,
    /// The databases that can be open beside them: a snapshot install's staged state and
    /// history, each with `STAGED_TABLE_FILES_OPEN_MAX` tables.
    pub staged_databases: u64,
    /// The raft log's files (`RAFT_LOG_FILES_OPEN_MAX`).
    pub raft_log: u64,
    /// The body log's and the sorted runs' files (`ARCHIVE_FILES_OPEN_MAX`).
    pub archive_files: u64,
    /// The archive's objects written at once and a state snapshot's chunks (a file or an HTTP
    /// connection each).
    pub archive: u64,
    /// Connections this replica dials: a raft channel and a snapshot channel to each peer.
    pub outbound_peers: u64,
    /// The metrics endpoint: its listener and its connections.
    pub http: u64,
    pub process: u64,
}

impl DescriptorReserve {
    pub fn total(&self) -> u64 {
        self.live_databases
            + self.staged_databases
            + self.raft_log
            + self.archive_files
            + self.archive
            + self.outbound_peers
            + self.http
            + self.process
    }
}

/// The one place that counts what the server keeps back from the connection limits, for a
/// replica with `peers` other replicas. Every database that can be open at once is counted
/// with its full table cache.
pub fn descriptors_reserved(peers: usize) -> DescriptorReserve {
    let database = |tables: usize| tables as u64 + DESCRIPTORS_PER_DATABASE_BESIDES_TABLES;
    DescriptorReserve {
        live_databases: 2 * database(tally_storage::TABLE_FILES_OPEN_MAX),
        staged_databases: 2 * database(tally_storage::STAGED_TABLE_FILES_OPEN_MAX),
        raft_log: tally_storage::RAFT_LOG_FILES_OPEN_MAX as u64,
        archive_files: tally_storage::ARCHIVE_FILES_OPEN_MAX as u64,
        archive: (tally_storage::archiver::UPLOADS_IN_FLIGHT
            + tally_storage::snapshots::CHUNKS_IN_FLIGHT) as u64,
        outbound_peers: 2 * peers as u64,
        http: METRICS_CONNECTIONS_MAX as u64 + 1,
        process: DESCRIPTORS_OF_THE_PROCESS,
    }
}

/// Descriptors held open (on `/dev/null`) by the client listener. When `accept` fails for want
/// of descriptors (the process limit lowered under the server, or other files using the
/// reserve), connections may hold every other one; the listener then releases these and pauses,
/// so that a LevelDB log rotation or compaction (an IO error there stops the replica) still
/// finds descriptors, and accepts again only once it could take all of them back.
pub struct SpareDescriptors {
    held: Vec<std::fs::File>,
}

impl SpareDescriptors {
    pub fn new() -> SpareDescriptors {
        let mut spares = SpareDescriptors { held: Vec::new() };
        spares.refill();
        spares
    }

    /// Gives every spare back to the process.
    pub fn release(&mut self) {
        self.held.clear();
    }

    /// Takes all [`SPARE_DESCRIPTORS`] back, or (when the process has not that many free)
    /// none: a partial refill would take what the ledger's files need.
    pub fn refill(&mut self) -> bool {
        while self.held.len() < SPARE_DESCRIPTORS {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.held.push(f),
                Err(_) => {
                    self.release();
                    return false;
                }
            }
        }
        true
    }
}

impl Default for SpareDescriptors {
    fn default() -> Self {
        SpareDescriptors::new()
    }
}

/// The largest reply other than a header list: a confirmation with a 16-level proof is under
/// 1 KiB, a status under 1 KiB, an error a short message.
pub const SMALL_REPLY_BYTES_MAX: usize = 4096;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force after.
pub fn raise_descriptor_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if limit.current != limit.maximum {
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!("could not raise the descriptor limit to the hard limit: {e}");
        }
    }
    // `None` is "unlimited".
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The connection limits in force, after fitting them under the descriptor limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionSizing {
    pub connections_max: usize,
    pub connections_per_address_max: usize,
    pub peer_connections_max: usize,
}

/// Fits the configured limits under `descriptors` (the soft `RLIMIT_NOFILE`): the peer port gets
/// at most a quarter of what is left after `reserved` ([`descriptors_reserved`]), clients the
/// rest, and the per-address limit shrinks in proportion with `connections_max`. Never below
/// one each.
pub fn size_for_descriptors(
    descriptors: u64,
    reserved: u64,
    limits: &LimitsConfig,
) -> ConnectionSizing {
    let free = descriptors.saturating_sub(reserved).max(4);
    let peer = u64::from(limits.peer_connections_max).min(free / 4).max(1);
    let clients = u64::from(limits.connections_max).min(free - peer).max(1);
    let per_address = u64::from(limits.connections_per_address_max);
    let per_address = if clients < u64::from(limits.connections_max) {
        (per_address * clients).div_ceil(u64::from(limits.connections_max))
    } else {
        per_address
    };
    let sizing = ConnectionSizing {
        connections_max: clients as usize,
        connections_per_address_max: per_address.clamp(1, clients) as usize,
        peer_connections_max: peer as usize,
    };
    assert!(sizing.connections_per_address_max <= sizing.connections_max);
    sizing
}

/// Raises the descriptor limit and sizes the connection limits under it for a replica with
/// `peers` other replicas, saying so when it had to lower any of them. Call once at start,
/// before the databases open.
pub fn connection_sizing(limits: &LimitsConfig, peers: usize) -> ConnectionSizing {
    let descriptors = raise_descriptor_limit();
    let reserved = descriptors_reserved(peers).total();
    let sizing = size_for_descriptors(descriptors, reserved, limits);
    let configured = ConnectionSizing {
        connections_max: limits.connections_max as usize,
        connections_per_address_max: limits.connections_per_address_max as usize,
        peer_connections_max: limits.peer_connections_max as usize,
    };
    if sizing != configured {
        tracing::warn!(
            descriptors,
            reserved,
            connections_max = sizing.connections_max,
            connections_per_address_max = sizing.connections_per_address_max,
            peer_connections_max = sizing.peer_connections_max,
            "the descriptor limit (RLIMIT_NOFILE) cannot hold the configured connection limits: \
             using lower ones"
        );
    }
    sizing
}

/// How many connections one address may have on the peer port before their certificates were
/// checked: an eighth of `peer_connections_max`, at least two (a replica dials once per
/// channel; loopback test clusters share one address), so that it takes eight addresses to fill
/// the port with handshakes, and authenticated peers always find room to reconnect otherwise.
pub fn peer_handshakes_per_address_max(peer_connections_max: usize) -> usize {
    (peer_connections_max / 8)
        .max(2)
        .min(peer_connections_max.max(1))
}

/// What the per-address limits count by: an IPv4 address (also when mapped into IPv6), or an
/// IPv6 /64 (one host usually holds a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// Rate of new connections per address ([`address_key`]): a token bucket each, holding one
/// second's worth (`per_second` connections at once) and refilled continuously. An address
/// whose bucket is full is forgotten, so the table holds only addresses that connected within
/// the last second or so.
pub struct HandshakeRate {
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// Past this many addresses in the table, full buckets are dropped before one is added.
const RATE_ADDRESSES_PRUNE_AT: usize = 4096;

impl HandshakeRate {
    pub fn new(per_second: u32) -> HandshakeRate {
        assert!(per_second >= 1);
        HandshakeRate {
            per_second: f64::from(per_second),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a new connection from `ip` at `now` is within its address's rate (and if so,
    /// takes its token).
    pub fn try_take(&self, ip: IpAddr, now: std::time::Instant) -> bool {
        let (rate, burst) = (self.per_second, self.per_second);
        let refilled = |b: &Bucket| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            (b.tokens + elapsed * rate).min(burst)
        };
        let mut buckets = self.buckets.lock().expect("rate table");
        if buckets.len() >= RATE_ADDRESSES_PRUNE_AT {
            buckets.retain(|_, b| refilled(b) < burst);
        }
        let bucket = buckets.entry(address_key(ip)).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = refilled(bucket);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        true
    }

    /// Addresses in the table (for tests).
    pub fn addresses(&self) -> usize {
        self.buckets.lock().expect("rate table").len()
    }
}

/// Counts open connections per address: IPv4 addresses one by one, IPv6 by /64 (one host
/// usually holds a whole /64).
pub struct AddressLimit {
    per_address_max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its address's count; given back when dropped.
pub struct AddressSlot {
    table: Arc<AddressLimit>,
    key: IpAddr,
}

impl AddressLimit {
    pub fn new(per_address_max: usize) -> Arc<AddressLimit> {
        assert!(per_address_max >= 1);
        Arc::new(AddressLimit {
            per_address_max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when that address is at its limit.
    pub fn try_enter(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut open = self.open.lock().expect("address table");
        let count = open.entry(key).or_insert(0);
        if *count >= self.per_address_max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: Arc::clone(self),
            key,
        })
    }

    /// Open connections from `ip`'s address (or /64).
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().expect("address table");
        open.get(&address_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("address table");
        let count = open
            .get_mut(&self.key)
            .expect("a slot's address is counted");
        assert!(*count >= 1);
        *count -= 1;
        if *count == 0 {
            open.remove(&self.key);
        }
    }
}

/// The largest encoded frame `request` can be answered with.
pub fn reply_bytes_bound(request: &Message) -> usize {
    match request {
        Message::GetHeaders { limit, .. } => {
            let headers = (*limit).clamp(1, HEADERS_PER_REPLY_MAX) as usize;
            (FRAME_HEADER_BYTES + 2 + headers * SIGNED_HEADER_BYTES).max(SMALL_REPLY_BYTES_MAX)
        }
        // flags, envelope hash, signed header, count, a receipt per operation, a range proof.
        Message::SubmitEnvelope(e) => {
            let proof = 13 + 32 * tally_wire::RANGE_PROOF_HASHES_MAX;
            let receipts = e.ops.len() * tally_wire::RECEIPT_BYTES;
            FRAME_HEADER_BYTES + 1 + 32 + SIGNED_HEADER_BYTES + 4 + receipts + proof
        }
        Message::GetHistory { limit, .. } => {
            let entries = (*limit).clamp(1, tally_wire::HISTORY_ENTRIES_PER_REPLY_MAX) as usize;
            let each = tally_wire::HISTORY_ENTRY_BYTES + SIGNED_HEADER_BYTES;
            FRAME_HEADER_BYTES + tally_wire::HISTORY_FIXED_BYTES + entries * each
        }
        Message::GetConfirmation { .. } | Message::GetConfirmationByReceipt { .. } => {
            FRAME_HEADER_BYTES + tally_wire::OPERATION_CONFIRMATION_BYTES_MAX as usize
        }
        Message::GetConsistency { .. } => {
            FRAME_HEADER_BYTES + tally_wire::CONSISTENCY_REPLY_BYTES_MAX
        }
        Message::GetBalanceProof { .. } => {
            FRAME_HEADER_BYTES + tally_wire::BALANCE_PROOF_REPLY_BYTES_MAX
        }
        Message::GetKeyChain => FRAME_HEADER_BYTES + tally_wire::KEY_CHAIN_REPLY_BYTES_MAX,
        _ => SMALL_REPLY_BYTES_MAX,
    }
}

/// What one reply holds until it was written: its connection's in-flight slot and the bytes it
/// reserved from the connection's and the server's reply budgets.
pub struct ReplyPermit {
    _in_flight: OwnedSemaphorePermit,
    _connection: OwnedSemaphorePermit,
    _server: Option<OwnedSemaphorePermit>,
    reserved_bytes: usize,
}

impl ReplyPermit {
    pub fn reserved_bytes(&self) -> usize {
        self.reserved_bytes
    }
}

/// A connection's share of the reply budgets.
#[derive(Clone)]
pub struct ReplyBudget {
    in_flight: Arc<Semaphore>,
    connection: Arc<Semaphore>,
    server: Arc<Semaphore>,
    in_flight_max: usize,
    connection_bytes_max: usize,
}

/// What [`ReplyBudget::reserve`] got: room for the full reply, or only for a `busy` answer
/// because the server's budget is spent.
pub enum Reserved {
    Full(ReplyPermit),
    BusyOnly(ReplyPermit),
}

impl ReplyBudget {
    pub fn new(
        in_flight_max: usize,
        connection_bytes_max: usize,
        server: Arc<Semaphore>,
    ) -> ReplyBudget {
        assert!(connection_bytes_max >= SMALL_REPLY_BYTES_MAX);
        ReplyBudget {
            in_flight: Arc::new(Semaphore::new(in_flight_max)),
            connection: Arc::new(Semaphore::new(connection_bytes_max)),
            server,
            in_flight_max,
            connection_bytes_max,
        }
    }

    /// Reserves room for a reply of up to `bytes`: waits for an in-flight slot and for the
    /// connection's budget (the reader stops meanwhile), never for the server's. `None` once
    /// the budget was closed.
    pub async fn reserve(&self, bytes: usize) -> Option<Reserved> {
        assert!(
            bytes <= self.connection_bytes_max,
            "a reply larger than the budget"
        );
        let in_flight = self.in_flight.clone().acquire_owned().await.ok()?;
        let n = u32::try_from(bytes).expect("a reply bound fits u32");
        let connection = self.connection.clone().acquire_many_owned(n).await.ok()?;
        let (server, full) = match self.server.clone().try_acquire_many_owned(n) {
            Ok(p) => (Some(p), true),
            // Too little left for this reply: the request is answered `busy`, whose few bytes
            // count against this connection's budget only.
            Err(_) => (None, false),
        };
        let permit = ReplyPermit {
            _in_flight: in_flight,
            _connection: connection,
            _server: server,
            reserved_bytes: bytes,
        };
        Some(if full {
            Reserved::Full(permit)
        } else {
            Reserved::BusyOnly(permit)
        })
    }

    /// Waits until every reply of this connection was written or dropped (or `timeout`).
    pub async fn drained(&self, timeout: std::time::Duration) {
        let all = u32::try_from(self.in_flight_max).expect("in-flight limit fits u32");
        let _ = tokio::time::timeout(timeout, self.in_flight.acquire_many(all)).await;
    }
}

/// Whether an `accept` failed for want of descriptors (or kernel memory), which passes once
/// connections close: the listener pauses instead of spinning or exiting.
pub fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(descriptors: u64, peers: usize, expected: (usize, usize, usize)) {
        let reserved = descriptors_reserved(peers).total();
        let sizing = size_for_descriptors(descriptors, reserved, &LimitsConfig::default());
        let got = (
            sizing.connections_max,
            sizing.connections_per_address_max,
            sizing.peer_connections_max,
        );
        assert_eq!(got, expected, "descriptors {descriptors}, {peers} peers");
    }

    /// Every database that can be open at once, with its whole table cache: the two live
    /// ones (64 tables + 6) and the two staged ones (16 + 6); the raft log's files (3); the
    /// body log's (6) and the sorted runs' (6).
    #[test]
    fn the_reserve_counts_every_database_open_at_once() {
        let single = descriptors_reserved(0);
        assert_eq!(single.live_databases, 2 * (64 + 6));
        assert_eq!(single.staged_databases, 2 * (16 + 6));
        assert_eq!(single.raft_log, 3);
        assert_eq!(single.archive_files, 12);
        assert_eq!(single.archive, 16);
        assert_eq!(single.outbound_peers, 0);
        assert_eq!(single.http, 65);
        assert_eq!(single.total(), 140 + 44 + 3 + 12 + 16 + 65 + 32);
        assert_eq!(single.total(), 312);
        // A replica of five dials four peers, twice each.
        assert_eq!(descriptors_reserved(4).total(), 312 + 8);
    }

    #[test]
    fn sizing_fits_under_the_descriptor_limit() {
        // Plenty: the configured defaults.
        check(1 << 20, 0, (1024, 64, 64));
        check(312 + 1024 + 64, 0, (1024, 64, 64));
        check(312 + 1024 + 63, 0, (1023, 64, 64));
        // A hard limit of 512: 200 left (192 for a replica of five), a quarter to peers, the
        // rest to clients, whose per-address share shrinks with them (64 x 150 / 1024 -> 10).
        check(512, 0, (150, 10, 50));
        check(512, 4, (144, 9, 48));
        check(1024, 0, (648, 41, 64));
        // Absurdly low: still one of each.
        check(10, 0, (3, 1, 1));
    }

    #[test]
    fn handshake_rate_per_address() {
        use std::time::{Duration, Instant};
        let rate = HandshakeRate::new(4);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let taken = |at| (0..10).filter(|_| rate.try_take(a, at)).count();
        assert_eq!(taken(t0), 4, "a burst of one second's worth");
        // Another address has its own bucket; an IPv6 /64 is one address.
        assert!(rate.try_take("10.0.0.2".parse().unwrap(), t0));
        assert!(rate.try_take("2001:db8::1".parse().unwrap(), t0));
        assert_eq!(taken(t0 + Duration::from_millis(250)), 1, "refilled at 4/s");
        assert_eq!(taken(t0 + Duration::from_millis(260)), 0);
        assert_eq!(
            taken(t0 + Duration::from_secs(60)),
            4,
            "never more than the burst"
        );
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let b = HandshakeRate::new(1);
        assert!(b.try_take(v6("2001:db8::1"), t0));
        assert!(!b.try_take(v6("2001:db8::ffff:2"), t0), "same /64");
        assert!(b.try_take(v6("2001:db8:0:1::1"), t0), "another /64");
    }

    #[test]
    fn the_rate_table_forgets_addresses_with_full_buckets() {
        use std::time::{Duration, Instant};
        let rate = HandshakeRate::new(2);
        let t0 = Instant::now();
        for i in 0..RATE_ADDRESSES_PRUNE_AT as u32 {
            assert!(rate.try_take(IpAddr::V4(i.into()), t0));
        }
        assert_eq!(rate.addresses(), RATE_ADDRESSES_PRUNE_AT);
        // A second later every bucket is full again: all are dropped, the new one added.
        let later = t0 + Duration::from_secs(1);
        assert!(rate.try_take("192.0.2.1".parse().unwrap(), later));
        assert_eq!(rate.addresses(), 1);
    }

    #[test]
    fn peer_handshakes_per_address() {
        for (cap, expected) in [(64, 8), (24, 3), (16, 2), (4, 2), (2, 2), (1, 1)] {
            assert_eq!(peer_handshakes_per_address_max(cap), expected, "cap {cap}");
        }
    }

    #[test]
    fn address_slots_count_and_give_back() {
        let table = AddressLimit::new(2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let (s1, s2) = (table.try_enter(a).unwrap(), table.try_enter(a).unwrap());
        assert!(table.try_enter(a).is_none());
        assert!(table.try_enter(b).is_some());
        drop(s1);
        assert_eq!(table.open(a), 1);
        drop(s2);
        assert_eq!(table.open(a), 0);
        // IPv6 by /64; a v4-mapped address is its v4 address.
        let table = AddressLimit::new(1);
        let _x = table.try_enter("2001:db8::1".parse().unwrap()).unwrap();
        assert!(table.try_enter("2001:db8::ffff".parse().unwrap()).is_none());
        assert!(table
            .try_enter("2001:db8:0:1::1".parse().unwrap())
            .is_some());
        let _y = table.try_enter("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert!(table.try_enter("10.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn reply_bounds_cover_the_largest_replies() {
        let all = Message::GetHeaders {
            from_height: 1,
            limit: u16::MAX,
        };
        assert_eq!(reply_bytes_bound(&all), 20 + 2 + 1024 * 256);
        assert!(
            reply_bytes_bound(&all) < 1 << 20,
            "fits the smallest per-connection budget"
        );
        assert_eq!(
            reply_bytes_bound(&Message::GetStatus),
            SMALL_REPLY_BYTES_MAX
        );
    }
}
