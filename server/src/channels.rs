//! The messages between the server's threads and tasks: what a connection hands the pipeline,
//! what each pipeline thread sends the next, and where answers go. Every channel that carries
//! them is bounded (see `pipeline` for what happens at each limit).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Sender;
use raft::eraftpb::Message as RaftMessage;
use tally_core::batch::BatchBody;
use tally_core::batch::Confirmed;
use tally_core::engine::apply::Committed;
use tally_core::engine::members::MemberChange;
use tally_core::engine::{Refusal, Waiter};
use tally_core::ports::RequestRecord;
use tally_core::replica::ReplicaStatus;
use tally_core::reserve::{Expiry, Reserve};
use tally_core::state::LedgerMeta;
use tally_core::{Rejection, Result as CoreResult};
use tally_wire::{
    Envelope, EnvelopeFailed, ErrorCode, ErrorReply, Hash, Message, PublicKey, ReadMode, Request,
    SignedHeader,
};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::view::ClusterView;

/// An encoded frame on its way to a connection, holding the in-flight permit and the reply
/// bytes reserved for it (`limits.rs`) until it was written.
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub _permit: crate::limits::ReplyPermit,
}

/// Where the answer to one request goes: a client's connection, or a task of this replica
/// (the explorer) that reads the answer as a message.
pub struct ReplyTo {
    sink: Sink,
    /// When the request's frame was read: the start of `tally_confirmation_seconds`.
    pub received: Instant,
    /// Every answer is counted here, so the counters match what clients were sent.
    pub metrics: Arc<Metrics>,
}

enum Sink {
    Connection {
        tx: mpsc::Sender<Outgoing>,
        correlation_id: u64,
        permit: crate::limits::ReplyPermit,
    },
    Internal(tokio::sync::oneshot::Sender<Message>),
}

impl ReplyTo {
    /// The answer goes to a connection as the frame of `correlation_id`, holding `permit`.
    pub fn connection(
        tx: mpsc::Sender<Outgoing>,
        correlation_id: u64,
        permit: crate::limits::ReplyPermit,
        metrics: Arc<Metrics>,
    ) -> ReplyTo {
        ReplyTo {
            sink: Sink::Connection {
                tx,
                correlation_id,
                permit,
            },
            received: Instant::now(),
            metrics,
        }
    }

    /// The answer comes back on the receiver, uncounted (no client sees it).
    pub fn internal(metrics: Arc<Metrics>) -> (ReplyTo, tokio::sync::oneshot::Receiver<Message>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply = ReplyTo {
            sink: Sink::Internal(tx),
            received: Instant::now(),
            metrics,
        };
        (reply, rx)
    }

    pub fn send(self, message: &Message) {
        let (tx, correlation_id, permit) = match self.sink {
            Sink::Connection {
                tx,
                correlation_id,
                permit,
            } => (tx, correlation_id, permit),
            Sink::Internal(tx) => {
                let _ = tx.send(message.clone());
                return;
            }
        };
        let bytes = message.encode_frame(correlation_id);
        // Counted before the client can see the answer, so a scrape after it never lags.
        match message {
            Message::Confirmed(c) if c.replayed => self.metrics.batches.replayed_total.inc(),
            Message::Confirmed(_) => {
                self.metrics.batches.confirmed_total.inc();
                let seconds = self.received.elapsed().as_secs_f64();
                self.metrics.batches.confirmation_seconds.observe(seconds);
            }
            Message::EnvelopeConfirmed(c) if c.replayed => {
                self.metrics.batches.replayed_total.inc()
            }
            Message::EnvelopeConfirmed(c) => {
                let operations = c.receipts.len() as u64;
                self.metrics.batches.confirmed_total.inc_by(operations);
                let seconds = self.received.elapsed().as_secs_f64();
                self.metrics.batches.confirmation_seconds.observe(seconds);
            }
            Message::EnvelopeFailed(f) => self.metrics.rejected(f.code),
            Message::Error(e) => self.metrics.rejected(e.code),
            _ => {}
        }
        // Fails only when the connection is gone; there is nobody left to tell.
        let _ = tx.try_send(Outgoing {
            bytes,
            _permit: permit,
        });
    }

    pub fn error(self, code: ErrorCode, message: impl Into<String>) {
        self.send(&Message::Error(ErrorReply::new(code, message)));
    }

    pub fn busy(self, what: &str, retry_after_ms: u32) {
        let mut reply = ErrorReply::new(ErrorCode::Busy, format!("{what} is full; retry later"));
        reply.retry_after_ms = retry_after_ms;
        self.send(&Message::Error(reply));
    }

    pub fn reject(self, r: Rejection) {
        self.error(r.code, r.message);
    }

    /// Sends a confirmation, `replayed` when it answers a resubmission.
    pub fn confirmed(self, c: Confirmed) {
        match c {
            Confirmed::Request(c) => self.send(&Message::Confirmed(c)),
            Confirmed::Envelope(c) => self.send(&Message::EnvelopeConfirmed(c)),
            Confirmed::Rotation(link) => {
                self.send(&Message::KeyChain(Box::new(tally_wire::KeyChainReply {
                    links: vec![*link],
                })))
            }
        }
    }

    /// Answers an atomic envelope whose operation `index` failed: nothing was applied.
    pub fn fail(self, index: u32, r: Rejection) {
        self.send(&Message::EnvelopeFailed(EnvelopeFailed {
            code: r.code,
            failed_index: index,
            message: r.message,
        }));
    }

    /// Answers an operator with the replicas and their roles.
    pub fn members(self, leader_id: u64, members: Vec<tally_wire::Member>) {
        let answer = tally_wire::MembersReply::new(leader_id, members);
        self.send(&tally_wire::Message::Members(Box::new(answer)));
    }

    /// Answers an engine refusal; `NotWritable` names the leader when one is known.
    pub fn refuse(self, r: Refusal, view: &ClusterView) {
        match r {
            Refusal::NotWritable => self.send(&Message::Error(view.not_writable())),
            Refusal::Busy => self.busy("the replay queue", 100),
            Refusal::Superseded => self.error(r.code(), r.message()),
        }
    }
}

/// A client waiting for a request of a batch.
pub type Waiters = Vec<Waiter<ReplyTo>>;

/// What a client submitted: one request, or an envelope of operations.
pub enum Submission {
    Request(Request),
    Envelope {
        envelope: Arc<Envelope>,
        /// SHA-256 of its wire bytes.
        hash: Hash,
        /// Its share of `limits.envelopes_in_flight_max`, held until it is sequenced.
        _permit: tokio::sync::OwnedSemaphorePermit,
    },
}

/// A request or envelope travelling through the pipeline.
pub struct Job {
    pub submission: Submission,
    /// The signer's nonce hint, if the client sent one (`SubmitHinted`): lets the stateless
    /// stage check the signature in a batch. With it, the connection's switch for hints, which
    /// the stateless stage turns off when a hinted signature turns out bad.
    pub hint: Option<(tally_wire::NonceHint, Arc<AtomicBool>)>,
    pub reply: ReplyTo,
    /// The applied height the snapshot stage checked the request against.
    pub snapshot_height: u64,
}

impl Job {
    /// The request, for a job known to carry one (the stateless stage's batch).
    pub fn request(&self) -> &Request {
        match &self.submission {
            Submission::Request(r) => r,
            Submission::Envelope { .. } => panic!("an envelope where a request was expected"),
        }
    }

    pub fn signer(&self) -> &PublicKey {
        match &self.submission {
            Submission::Request(r) => &r.signer,
            Submission::Envelope { envelope, .. } => &envelope.signer,
        }
    }

    /// The exactly-once keys `(signer, id)` of its operations.
    pub fn keys(&self) -> Vec<(PublicKey, u128)> {
        match &self.submission {
            Submission::Request(r) => vec![(r.signer, r.id)],
            Submission::Envelope { envelope, .. } => envelope
                .ops
                .iter()
                .map(|o| (envelope.signer, o.id))
                .collect(),
        }
    }
}

/// Commands to the storage thread, the one owner of the ledger database. It applies committed
/// batches and serves reads, in the order the commands arrive.
pub enum StorageCmd {
    /// A committed raft entry, in log order.
    Committed(Committed<ReplyTo>),
    /// Bring the ledger to (at least) the state a raft snapshot describes, before anything
    /// queued behind it (committed entries after the snapshot point). The raft thread does not
    /// wait: it keeps voting and answering heartbeats while the ledger is fetched. A failure
    /// stops the node.
    InstallSnapshot { index: u64, descriptor: Vec<u8> },
    /// Stream the whole ledger (one consistent view) to a peer installing a snapshot.
    Dump {
        chunk_bytes_max: usize,
        out: mpsc::Sender<Vec<u8>>,
        done: Sender<CoreResult<LedgerMeta>>,
    },
    /// Snapshot-stage lookups: request records and balances of the accounts named.
    Lookup {
        keys: Vec<(PublicKey, u128)>,
        accounts: Vec<PublicKey>,
        reply: Sender<CoreResult<LookupResult>>,
    },
    LoadAccount {
        key: PublicKey,
        reply: Sender<CoreResult<Option<u64>>>,
    },
    LoadRequest {
        signer: PublicKey,
        id: u128,
        reply: Sender<CoreResult<Option<RequestRecord>>>,
    },
    /// The master's reads for two-phase transfers: one reserve, the first open ones by
    /// deadline, an applied header's time.
    LoadReserve {
        owner: PublicKey,
        id: u128,
        reply: Sender<CoreResult<Option<Reserve>>>,
    },
    LoadExpiries {
        limit: usize,
        reply: Sender<CoreResult<Vec<Expiry>>>,
    },
    HeaderTime {
        height: u64,
        reply: Sender<CoreResult<u64>>,
    },
    /// Send the original confirmation of a request applied (or about to be) at `height`.
    Replay {
        height: u64,
        index: u32,
        request_hash: Hash,
        reply: ReplyTo,
    },
    Balance {
        account: PublicKey,
        mode: ReadMode,
        reply: ReplyTo,
    },
    Headers {
        from_height: u64,
        limit: u16,
        reply: ReplyTo,
    },
    /// The operator's totals and the sum of balances (`GetSupply`).
    Supply { reply: ReplyTo },
    /// The original confirmation of the operation `(signer, id)` (`GetConfirmation`).
    FindConfirmation {
        signer: PublicKey,
        id: u128,
        reply: ReplyTo,
    },
    /// A page of an account's history (`GetHistory`).
    History {
        account: PublicKey,
        from_height: u64,
        from_index: u32,
        limit: u16,
        reply: ReplyTo,
    },
    /// An account's figures, now (`at_height` 0) or as of a height (`GetAccount`).
    Account {
        account: PublicKey,
        at_height: u64,
        reply: ReplyTo,
    },
    /// The confirmation of the operation whose receipt has this leaf hash
    /// (`GetConfirmationByReceipt`).
    FindByReceipt { leaf_hash: Hash, reply: ReplyTo },
    /// The header log's consistency from `from` to `to` (0: the applied height)
    /// (`GetConsistency`).
    Consistency { from: u64, to: u64, reply: ReplyTo },
    /// An account's balance proved against the applied header (`GetBalanceProof`).
    BalanceProof { account: PublicKey, reply: ReplyTo },
    /// Every operator key rotation applied (`GetKeyChain`, PROTOCOL.md §4.14).
    KeyChain { reply: ReplyTo },
    /// The same proof for the witnessing task (`witnesses.rs`), between applied heights.
    LogProof {
        from: u64,
        to: u64,
        reply: tokio::sync::oneshot::Sender<CoreResult<tally_wire::ConsistencyReply>>,
    },
    Status {
        raft: ReplicaStatus,
        /// Whether this replica's master is sequencing (it leads and has caught up).
        writable: bool,
        leader_client_address: String,
        reply: ReplyTo,
    },
    /// The applied batches `from..=to` for the archive writer: (signed header, encoded body),
    /// stopping early (after at least one) past `bytes_max`.
    ReadBatches {
        from: u64,
        to: u64,
        bytes_max: usize,
        reply: tokio::sync::oneshot::Sender<CoreResult<Vec<(SignedHeader, Vec<u8>)>>>,
    },
    /// A threshold operator's signatures of the checkpoints of sizes `from..=to` (PROTOCOL.md
    /// §4.15), for the archive writer; None where none is held. At most
    /// [`CHECKPOINT_SIGNATURES_READ_MAX`] sizes are answered, from `from` on.
    CheckpointSignatures {
        from: u64,
        to: u64,
        reply: tokio::sync::oneshot::Sender<CoreResult<Vec<Option<tally_wire::Signature>>>>,
    },
    /// Stop after everything queued before it.
    Stop,
}

/// Checkpoint signatures one `StorageCmd::CheckpointSignatures` answers at most (64 KiB of
/// signatures; the storage thread reads them one point read each).
pub const CHECKPOINT_SIGNATURES_READ_MAX: u64 = 1024;

impl StorageCmd {
    /// The storage command serving an accounting read (`GetHistory`, `GetAccount`,
    /// `GetConfirmationByReceipt`).
    pub fn accounting(message: Message, reply: ReplyTo) -> StorageCmd {
        match message {
            Message::GetHistory {
                account,
                from_height,
                from_index,
                limit,
            } => StorageCmd::History {
                account,
                from_height,
                from_index,
                limit,
                reply,
            },
            Message::GetAccount { account, at_height } => StorageCmd::Account {
                account,
                at_height,
                reply,
            },
            Message::GetConfirmationByReceipt { leaf_hash } => {
                StorageCmd::FindByReceipt { leaf_hash, reply }
            }
            other => unreachable!("not an accounting read: 0x{:02x}", other.message_type()),
        }
    }

    /// The connection a read command answers, if it is one.
    pub fn into_reply(self) -> Option<ReplyTo> {
        match self {
            StorageCmd::Replay { reply, .. }
            | StorageCmd::Balance { reply, .. }
            | StorageCmd::Headers { reply, .. }
            | StorageCmd::FindConfirmation { reply, .. }
            | StorageCmd::Supply { reply }
            | StorageCmd::History { reply, .. }
            | StorageCmd::Account { reply, .. }
            | StorageCmd::FindByReceipt { reply, .. }
            | StorageCmd::Consistency { reply, .. }
            | StorageCmd::BalanceProof { reply, .. }
            | StorageCmd::KeyChain { reply }
            | StorageCmd::Status { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

pub struct LookupResult {
    pub height: u64,
    pub records: Vec<Option<RequestRecord>>,
    pub balances: Vec<Option<u64>>,
}

/// Inputs of the raft thread. Its queue is bounded; peers' messages are dropped when it is full.
pub enum RaftEvent {
    Peer(RaftMessage),
    Unreachable(u64),
    /// The raft channel that peer `id` opened to this replica closed (its process exited or
    /// the network cut it): `Replication::peer_closed`.
    PeerClosed(u64),
    Propose {
        body: BatchBody,
        waiters: Waiters,
        /// The sequencer's state map after the batch (`Replication::propose`).
        sealed: tally_core::state_map::StateMap,
        epoch: u64,
    },
    /// A read to serve once a linearizable read index is applied.
    Read {
        cmd: StorageCmd,
    },
    Status {
        reply: ReplyTo,
    },
    TransferLeader(u64),
    /// An operator asks who the replicas are (`tally cluster members`).
    Members {
        reply: ReplyTo,
    },
    /// An operator changes the replica set (`tally cluster add|promote|remove`); answered
    /// with the members once the change is applied on this replica, the leader.
    ChangeMembers {
        change: MemberChange,
        reply: ReplyTo,
    },
    /// An admin rotates the operator key (`tally cluster rotate-key`): on to the master if
    /// this replica leads; answered with the rotation's key link once it is applied.
    RotateKey {
        new_key: PublicKey,
        reply: ReplyTo,
    },
    /// The master found its speculative state out of step with what was applied.
    Resync,
    /// A threshold signing message from an authenticated peer (`tally_core::signing`).
    SignPeer {
        from: u64,
        msg: tally_core::signing::SignMsg,
    },
    /// A batch was applied with this header unsigned: the signing stage signs it.
    Unsigned(tally_wire::Header),
    /// The header at `height` is signed on this replica; `checkpoint` is the text of its
    /// header log's checkpoint of that size, signed next by the group of `key`.
    HeaderSigned {
        height: u64,
        checkpoint: Vec<u8>,
        key: tally_wire::PublicKey,
    },
    /// Checkpoints are signed through this height on this replica.
    CheckpointSigned(u64),
    /// Shutting down: commit and apply what was proposed (for a few seconds at most), then stop
    /// the storage thread and this one.
    Drain,
}

impl RaftEvent {
    /// The connection an event answers, when it is a read or a status request.
    pub fn into_cmd_reply(self) -> Option<ReplyTo> {
        match self {
            RaftEvent::Read { cmd } => cmd.into_reply(),
            RaftEvent::Status { reply }
            | RaftEvent::Members { reply }
            | RaftEvent::ChangeMembers { reply, .. }
            | RaftEvent::RotateKey { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// What the master is told about leadership.
pub enum MasterEvent {
    Lead {
        term: u64,
        epoch: u64,
        meta: LedgerMeta,
    },
    Follow,
    /// See [`RaftEvent::RotateKey`].
    Rotate {
        new_key: PublicKey,
        reply: ReplyTo,
    },
}

/// State the apply thread publishes for the raft thread and the master.
pub struct Applied {
    /// Highest raft index whose effects are applied (batches and empty entries alike).
    pub index: AtomicU64,
    /// The ledger summary after the last applied batch.
    pub meta: Mutex<LedgerMeta>,
    /// The summary of the last batch the ledger holds whole (its archive included): the raft
    /// log is compacted up to it, never further (`LedgerStore::compactable_meta`).
    pub compactable: Mutex<LedgerMeta>,
}
