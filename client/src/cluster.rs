//! A client for a replicated operator: follows the leader, fails over, retries safely.
//!
//! [`ClusterClient`] keeps one [`Client`] connection, to the replica it believes leads, and runs
//! every operation through one retry loop:
//!
//! | answer or failure of one attempt                  | what happens next                      |
//! |---------------------------------------------------|----------------------------------------|
//! | `not_leader` with a valid hint naming another node | switch to the hinted address, retry at once (backoff only after more redirects in a row than there are replicas) |
//! | `not_leader` without hint, `unavailable`, `shutting_down` | move to the next replica, back off, retry |
//! | `busy`, `too_many_in_flight`                       | back off, retry on the same replica    |
//! | connection dropped, call timed out                 | drop the connection, reconnect to the next replica, retry (at once the first time, then with backoff) |
//! | connect refused / TCP or TLS handshake failed      | next replica; connects are paced by a shared backoff that grows with consecutive failures |
//! | any other rejection (`bad_signature`, `insufficient_funds`, `id_conflict`, ...) or a protocol violation | final: returned as it is |
//! | `total_timeout` reached (or the next backoff would end past it) | submit: [`Error::Indeterminate`] if any attempt was sent, else [`Error::GaveUp`]; reads: [`Error::GaveUp`] |
//! | no usable connection and `queue_max` operations already waiting | [`Error::QueueFull`] at once (or [`Error::Indeterminate`] for a submit already sent once) |
//!
//! A backoff honours the reply's `retry_after_ms` when it is non-zero; otherwise it is
//! exponential with jitter, between `backoff_min` and `backoff_max`. A submit resends the same
//! request (same id, same bytes), so a retry after a failover returns the original confirmation,
//! flagged `replayed`, and never applies twice.
//!
//! Concurrency: every method takes `&self`; clone the client (an `Arc` inside) to share it. One
//! task connects at a time, the others wait for it; those waiting form the bounded queue.
//!
//! Caveats:
//! - "Sent" is judged conservatively: once a submit was handed to a connection, giving up is
//!   [`Error::Indeterminate`], even when every answer was a refusal, because a replica that loses
//!   leadership may refuse a request whose log entry can still commit under the next leader.
//! - A hint naming an address outside the profile is followed if it parses as `host:port`; the
//!   profile's replicas are what the client falls back to.
//! - Linearizable reads go wherever the current connection points; a follower answers them with
//!   `not_leader`, which moves the client to the leader.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::Rng;
use tally_wire::{
    AdminCommand, AdminRequest, BalanceReply, Confirmation, ErrorCode, Hash, MembersReply,
    PublicKey, ReadMode, Request, SignedHeader, StatusReply,
};
use tokio::time::Instant;

use crate::{Client, Error, Profile, ReplicaAddress, Result};

/// Timeouts, backoff and the wait-queue bound of a [`ClusterClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// How long one attempt may take: a connection's TCP and TLS handshake, or one call.
    pub call_timeout: Duration,
    /// How long one operation may take over all its attempts, backoffs and waits.
    pub total_timeout: Duration,
    /// The shortest backoff before a retry.
    pub backoff_min: Duration,
    /// The longest backoff before a retry (a server's `retry_after_ms` may ask for more).
    pub backoff_max: Duration,
    /// How many operations may wait while no connection is usable (the one connecting
    /// included). Beyond it an operation fails at once with [`Error::QueueFull`]. At least 1.
    pub queue_max: usize,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            call_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            queue_max: 10_000,
        }
    }
}

/// A future that opens a connection.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Client>> + Send + 'a>>;

/// How a [`ClusterClient`] opens a connection to an address. [`ProfileConnector`] is the real
/// one (TLS with the profile's CA); tests and harnesses plug in others (in-memory streams,
/// proxies) and build the client with [`ClusterClient::with_connector`].
pub trait Connector: Send + Sync + 'static {
    /// Opens a connection to `address` (`host:port`) within `timeout`. The returned client's
    /// own call timeout does not matter: the cluster client sets it.
    fn connect<'a>(&'a self, address: &'a str, timeout: Duration) -> ConnectFuture<'a>;
}

/// Connects with TLS, trusting the profile's CA and checking its server name.
pub struct ProfileConnector {
    profile: Profile,
}

impl ProfileConnector {
    pub fn new(profile: &Profile) -> ProfileConnector {
        ProfileConnector {
            profile: profile.clone(),
        }
    }
}

impl Connector for ProfileConnector {
    fn connect<'a>(&'a self, address: &'a str, timeout: Duration) -> ConnectFuture<'a> {
        Box::pin(Client::connect_to_timeout(address, &self.profile, timeout))
    }
}

/// Counters of a [`ClusterClient`] since it was built, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Operations started (submits and reads; not status probes).
    pub operations: u64,
    /// Calls sent on a connection (first tries and retries).
    pub attempts: u64,
    /// `not_leader` hints followed.
    pub redirects: u64,
    /// Connections opened, the first one included.
    pub connects: u64,
    /// Connections opened to replace one that was lost or abandoned (`connects` minus the
    /// first).
    pub reconnects: u64,
    /// Connection attempts that failed (refused, handshake failed, timed out).
    pub connect_failures: u64,
    /// Backoff sleeps before a retry.
    pub backoffs: u64,
    /// Operations refused or abandoned because the wait queue was full.
    pub queue_full: u64,
    /// Submits that ended in [`Error::Indeterminate`].
    pub indeterminate: u64,
    /// Operations that ended in [`Error::GaveUp`].
    pub gave_up: u64,
}

#[derive(Default)]
struct Counters {
    operations: AtomicU64,
    attempts: AtomicU64,
    redirects: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    backoffs: AtomicU64,
    queue_full: AtomicU64,
    indeterminate: AtomicU64,
    gave_up: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A client for a 3- or 5-replica operator (or a single node): see the module documentation
/// for how it follows the leader and retries. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

struct Inner {
    replicas: Vec<ReplicaAddress>,
    opts: ClusterOptions,
    connector: Arc<dyn Connector>,
    slot: Mutex<Slot>,
    /// Held by the one task that is connecting; the others wait on it (at most `queue_max`).
    connecting: tokio::sync::Mutex<()>,
    /// Operations waiting for a usable connection.
    waiting: AtomicUsize,
    counters: Counters,
}

/// The current connection and where the next one goes.
struct Slot {
    /// The connection to the replica believed to lead, if one is open.
    client: Option<Arc<Client>>,
    /// Where the next connection goes.
    target: String,
    /// Connection attempts that failed in a row; paces the next one.
    connect_failures: u32,
    /// No connection attempt before this instant.
    next_connect_at: Instant,
}

/// Whether an operation changes the ledger: decides what giving up means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
}

/// One operation's progress through the retry loop.
struct Operation<'a> {
    kind: Kind,
    started: Instant,
    deadline: Instant,
    /// Calls handed to a connection.
    attempts: u32,
    /// Backoffs so far (the exponent of the next one).
    retries: u32,
    redirects_in_a_row: usize,
    /// Connections this operation saw die under it.
    lost_connections: u32,
    /// Holds a place in the wait queue while this operation has no usable connection.
    queued: Option<QueueSlot<'a>>,
}

/// A place in the wait queue, given back on drop.
struct QueueSlot<'a> {
    waiting: &'a AtomicUsize,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no connection could be had for the next attempt.
enum NoConnection {
    /// The operation's deadline passes before a connection could be tried.
    Deadline,
    QueueFull,
    /// This connection attempt failed; the next one (to the next replica) may work.
    Retry(Error),
    /// Retrying cannot help (the CA file is missing, ...).
    Final(Error),
}

/// What to do after an attempt failed.
enum Next {
    Final,
    Redirect(String),
    /// Back off, then retry; `elsewhere` moves to the next replica first.
    Backoff {
        elsewhere: bool,
        retry_after_ms: u32,
    },
    /// The connection is gone or stuck: drop it and use the next replica.
    Reconnect,
}

impl ClusterClient {
    /// A client for the profile's replicas, connecting with TLS on first use.
    pub fn new(profile: &Profile, opts: ClusterOptions) -> ClusterClient {
        ClusterClient::with_connector(
            profile.replicas.clone(),
            opts,
            Arc::new(ProfileConnector::new(profile)),
        )
    }

    /// A client that opens its connections with `connector` (tests, proxies).
    pub fn with_connector(
        replicas: Vec<ReplicaAddress>,
        opts: ClusterOptions,
        connector: Arc<dyn Connector>,
    ) -> ClusterClient {
        assert!(opts.queue_max >= 1, "queue_max must be at least 1");
        assert!(
            opts.backoff_min <= opts.backoff_max,
            "backoff_min must not exceed backoff_max"
        );
        let target = replicas
            .first()
            .map(|r| r.address.clone())
            .unwrap_or_default();
        ClusterClient {
            inner: Arc::new(Inner {
                replicas,
                opts,
                connector,
                slot: Mutex::new(Slot {
                    client: None,
                    target,
                    connect_failures: 0,
                    next_connect_at: Instant::now(),
                }),
                connecting: tokio::sync::Mutex::new(()),
                waiting: AtomicUsize::new(0),
                counters: Counters::default(),
            }),
        }
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.inner.opts
    }

    pub fn replicas(&self) -> &[ReplicaAddress] {
        &self.inner.replicas
    }

    /// The address of the open connection (the replica believed to lead), if any.
    pub fn current_address(&self) -> Option<String> {
        let slot = self.inner.slot();
        slot.client.as_ref().map(|c| c.address().to_string())
    }

    /// The counters so far.
    pub fn stats(&self) -> ClusterStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let connects = load(&c.connects);
        ClusterStats {
            operations: load(&c.operations),
            attempts: load(&c.attempts),
            redirects: load(&c.redirects),
            connects,
            reconnects: connects.saturating_sub(1),
            connect_failures: load(&c.connect_failures),
            backoffs: load(&c.backoffs),
            queue_full: load(&c.queue_full),
            indeterminate: load(&c.indeterminate),
            gave_up: load(&c.gave_up),
        }
    }

    /// Submits a signed request to the leader, following redirects and failing over until it is
    /// confirmed, finally refused, or `total_timeout` passes. The confirmation is checked to be
    /// for this request but not verified: use [`tally_core::verify::verify_confirmation`].
    pub async fn submit(&self, request: Request) -> Result<Confirmation> {
        self.inner
            .run(Kind::Write, move |client| {
                let request = request.clone();
                async move { client.submit(request).await }
            })
            .await
    }

    /// [`ClusterClient::submit`] with the request's nonce hint
    /// ([`crate::build_request_hinted`]): every attempt is a `SubmitHinted`, so the leader can
    /// check the signature in a batch. Answers, retries and idempotency are the same.
    pub async fn submit_hinted(
        &self,
        request: Request,
        hint: tally_wire::NonceHint,
    ) -> Result<Confirmation> {
        self.inner
            .run(Kind::Write, move |client| {
                let request = request.clone();
                async move { client.submit_hinted(request, hint).await }
            })
            .await
    }

    /// Submits a signed envelope to the leader, with the retries of [`ClusterClient::submit`]
    /// (a resubmission is answered with the original confirmation: every operation keeps its
    /// id). The confirmation is checked to be for this envelope but not verified.
    pub async fn submit_envelope(
        &self,
        envelope: std::sync::Arc<tally_wire::Envelope>,
    ) -> Result<tally_wire::EnvelopeConfirmation> {
        self.inner
            .run(Kind::Write, move |client| {
                let envelope = (*envelope).clone();
                async move { client.submit_envelope(envelope).await }
            })
            .await
    }

    /// [`crate::Client::find_confirmation`] on the cluster, with the retries of a read.
    pub async fn find_confirmation(
        &self,
        signer: PublicKey,
        id: u128,
    ) -> Result<tally_core::engine::apply::Found> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client.find_confirmation(signer, id).await
            })
            .await
    }

    /// [`crate::Client::find_by_receipt`] on the cluster, with the retries of a read.
    pub async fn find_by_receipt(
        &self,
        leaf_hash: tally_wire::Hash,
    ) -> Result<tally_core::engine::apply::Found> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client.find_by_receipt(leaf_hash).await
            })
            .await
    }

    /// [`crate::Client::history`] on the cluster, with the retries of a read.
    pub async fn history(
        &self,
        account: PublicKey,
        from_height: u64,
        from_index: u32,
        limit: u16,
    ) -> Result<tally_wire::HistoryReply> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client
                    .history(account, from_height, from_index, limit)
                    .await
            })
            .await
    }

    /// [`crate::Client::account`] on the cluster, with the retries of a read.
    pub async fn account(
        &self,
        account: PublicKey,
        at_height: u64,
    ) -> Result<tally_wire::AccountReply> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client.account(account, at_height).await
            })
            .await
    }

    /// [`crate::Client::consistency`] on the cluster, with the retries of a read.
    pub async fn consistency(
        &self,
        from_height: u64,
        to_height: u64,
    ) -> Result<tally_wire::ConsistencyReply> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client.consistency(from_height, to_height).await
            })
            .await
    }

    /// [`crate::Client::balance_proof`] on the cluster, with the retries of a read.
    pub async fn balance_proof(&self, account: PublicKey) -> Result<tally_wire::BalanceProofReply> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client.balance_proof(account).await
            })
            .await
    }

    /// [`crate::Client::key_chain`] on the cluster, with the retries of a read.
    pub async fn key_chain(&self) -> Result<tally_wire::KeyChainReply> {
        self.inner
            .run(
                Kind::Read,
                move |client| async move { client.key_chain().await },
            )
            .await
    }

    /// An admin's operator key rotation (`AdminCommand::RotateKey`) sent to the leader, signed
    /// afresh for each attempt; the rotation's key link, not verified here. Giving up after an
    /// attempt was sent is [`Error::Indeterminate`]: ask `key_chain` whether it took effect.
    pub async fn rotate_key(
        &self,
        chain_id: Hash,
        key: &SigningKey,
        new_key: PublicKey,
    ) -> Result<tally_wire::KeyLink> {
        self.inner
            .run(Kind::Write, move |client| {
                let request = signed_admin(chain_id, key, AdminCommand::RotateKey { new_key });
                async move { client.rotate_key(request).await }
            })
            .await
    }

    /// [`crate::Client::checkpoint`] on the cluster, with the retries of a read.
    pub async fn checkpoint(&self) -> Result<String> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client.checkpoint().await
            })
            .await
    }

    /// [`crate::Client::supply`] on the cluster, with the retries of a read.
    pub async fn supply(&self) -> Result<tally_wire::SupplyReply> {
        self.inner
            .run(
                Kind::Read,
                move |client| async move { client.supply().await },
            )
            .await
    }

    /// Reads an account's balance; a linearizable read is served by the leader.
    pub async fn balance(&self, account: PublicKey, mode: ReadMode) -> Result<BalanceReply> {
        self.inner
            .run(Kind::Read, move |client| async move {
                let reply = client.balance(account, mode).await?;
                // A replica that knows no leader answers every read from its applied state and
                // says so. A linearizable read must not settle for that: treat it as the
                // retryable `unavailable` it is and try again (elsewhere, after a backoff).
                if mode == ReadMode::Linearizable && reply.mode != ReadMode::Linearizable {
                    let mut refusal = tally_wire::ErrorReply::new(
                        tally_wire::ErrorCode::Unavailable,
                        format!(
                            "only a stale answer (height {}) was available",
                            reply.height
                        ),
                    );
                    refusal.retry_after_ms = 100;
                    return Err(Error::Rejected(refusal));
                }
                Ok(reply)
            })
            .await
    }

    /// One page of signed headers from `from_height` on (see [`Client::headers`]).
    pub async fn headers(&self, from_height: u64, limit: u16) -> Result<Vec<SignedHeader>> {
        self.inner
            .run(Kind::Read, move |client| async move {
                client.headers(from_height, limit).await
            })
            .await
    }

    /// What a replica tells about the ledger and its limits (see [`Client::info`]).
    pub async fn info(&self) -> Result<tally_wire::InfoReply> {
        self.inner
            .run(Kind::Read, |client| async move { client.info().await })
            .await
    }

    /// Sends an admin command signed by `key` (an admin key the servers list) for the ledger
    /// `chain_id`, and returns the membership the replica answers with (PROTOCOL.md §3,
    /// `0x07 Admin`). Changes go to the leader (`not_leader` redirects are followed like a
    /// submit's); `Members` goes wherever the connection points, which is the leader once any
    /// operation found it. Every attempt is signed afresh (new time and nonce), since the
    /// server refuses the same bytes twice. Giving up on a change after an attempt was sent is
    /// [`Error::Indeterminate`]: ask `Members` to learn whether it took effect.
    pub async fn admin(
        &self,
        chain_id: Hash,
        key: &SigningKey,
        command: AdminCommand,
    ) -> Result<MembersReply> {
        command.check().map_err(|e| Error::Invalid {
            what: "admin command",
            reason: e.to_string(),
        })?;
        let kind = if command.changes_membership() {
            Kind::Write
        } else {
            Kind::Read
        };
        self.inner
            .run(kind, move |client| {
                let request = signed_admin(chain_id, key, command.clone());
                async move { client.admin(request).await }
            })
            .await
    }

    /// Every replica's status, asked concurrently over fresh connections, in profile order. An
    /// unreachable replica costs one `call_timeout`, not one per replica.
    pub async fn status_all(&self) -> Vec<(ReplicaAddress, Result<StatusReply>)> {
        let probes: Vec<_> = self
            .inner
            .replicas
            .iter()
            .map(|replica| {
                let inner = self.inner.clone();
                let address = replica.address.clone();
                tokio::spawn(async move { inner.status_of(&address).await })
            })
            .collect();
        let mut out = Vec::with_capacity(probes.len());
        for (replica, probe) in self.inner.replicas.iter().zip(probes) {
            let result = match probe.await {
                Ok(result) => result,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            out.push((replica.clone(), result));
        }
        out
    }

    /// One replica's status, over a fresh connection (no retries).
    pub async fn status_of(&self, address: &str) -> Result<StatusReply> {
        self.inner.status_of(address).await
    }
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient")
            .field("replicas", &self.inner.replicas)
            .field("current", &self.current_address())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Inner {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        // Nothing panics while holding the lock.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The retry loop shared by every operation (see the module documentation).
    async fn run<T, F, Fut>(&self, kind: Kind, call: F) -> Result<T>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if self.replicas.is_empty() {
            return Err(Error::Invalid {
                what: "profile",
                reason: "it lists no replicas".into(),
            });
        }
        bump(&self.counters.operations);
        let started = Instant::now();
        let mut op = Operation {
            kind,
            started,
            deadline: started + self.opts.total_timeout,
            attempts: 0,
            retries: 0,
            redirects_in_a_row: 0,
            lost_connections: 0,
            queued: None,
        };
        let mut last = Error::Timeout;
        loop {
            if Instant::now() >= op.deadline {
                return Err(self.give_up(&op, last));
            }
            let client = match self.connection(&mut op).await {
                Ok(client) => client,
                Err(NoConnection::Deadline) => return Err(self.give_up(&op, last)),
                Err(NoConnection::QueueFull) => {
                    bump(&self.counters.queue_full);
                    let full = Error::QueueFull {
                        queue_max: self.opts.queue_max,
                    };
                    return Err(self.give_up(&op, full));
                }
                Err(NoConnection::Retry(e)) => {
                    last = e;
                    continue;
                }
                Err(NoConnection::Final(e)) => return Err(e),
            };

            op.attempts += 1;
            bump(&self.counters.attempts);
            // The operation's own deadline cutting a call short says nothing about the
            // connection, so it stays open for the others.
            let Ok(outcome) = tokio::time::timeout_at(op.deadline, call(client.clone())).await
            else {
                return Err(self.give_up(&op, Error::Timeout));
            };
            let e = match outcome {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let next = next_step(&e, client.address());
            if !matches!(next, Next::Redirect(_)) {
                op.redirects_in_a_row = 0;
            }
            match next {
                Next::Final => return Err(e),
                Next::Redirect(hint) => {
                    bump(&self.counters.redirects);
                    self.redirect(&client, hint);
                    op.redirects_in_a_row += 1;
                    last = e;
                    // Replicas that disagree about the leader (an election under way) could
                    // bounce requests between them: only the first round is free.
                    if op.redirects_in_a_row > self.replicas.len()
                        && !self.back_off(&mut op, 0).await
                    {
                        return Err(self.give_up(&op, last));
                    }
                }
                Next::Backoff {
                    elsewhere,
                    retry_after_ms,
                } => {
                    if elsewhere {
                        self.abandon(&client);
                    }
                    last = e;
                    if !self.back_off(&mut op, retry_after_ms).await {
                        return Err(self.give_up(&op, last));
                    }
                }
                Next::Reconnect => {
                    self.abandon(&client);
                    op.lost_connections += 1;
                    last = e;
                    // The first loss fails over at once; a replica that keeps dropping
                    // connections must not turn this into a busy loop.
                    if op.lost_connections > 1 && !self.back_off(&mut op, 0).await {
                        return Err(self.give_up(&op, last));
                    }
                }
            }
        }
    }

    /// The error an operation ends with when it stops retrying.
    fn give_up(&self, op: &Operation<'_>, last: Error) -> Error {
        let attempts = op.attempts;
        let elapsed_ms = op.started.elapsed().as_millis() as u64;
        if op.kind == Kind::Write && attempts > 0 {
            bump(&self.counters.indeterminate);
            return Error::Indeterminate {
                attempts,
                elapsed_ms,
                last: Box::new(last),
            };
        }
        if matches!(last, Error::QueueFull { .. }) {
            return last;
        }
        bump(&self.counters.gave_up);
        Error::GaveUp {
            attempts,
            elapsed_ms,
            last: Box::new(last),
        }
    }

    /// Sleeps before the next retry: `retry_after_ms` if the server named it, else exponential
    /// backoff with jitter. False, without sleeping, if the deadline would pass first.
    async fn back_off(&self, op: &mut Operation<'_>, retry_after_ms: u32) -> bool {
        let delay = if retry_after_ms > 0 {
            Duration::from_millis(u64::from(retry_after_ms))
        } else {
            self.backoff(op.retries)
        };
        op.retries = op.retries.saturating_add(1);
        let wake = Instant::now() + delay;
        if wake >= op.deadline {
            return false;
        }
        bump(&self.counters.backoffs);
        tokio::time::sleep_until(wake).await;
        true
    }

    /// The `retries`-th exponential backoff: the base doubles from `backoff_min` up to
    /// `backoff_max`, and the delay is drawn from its upper half (never below `backoff_min`).
    fn backoff(&self, retries: u32) -> Duration {
        let (min, max) = (self.opts.backoff_min, self.opts.backoff_max);
        let base = min.saturating_mul(1 << retries.min(20)).min(max);
        let low = (base / 2).max(min);
        if base <= low {
            return base;
        }
        rand::thread_rng().gen_range(low..=base)
    }

    /// The open connection, if it is still alive. A dead one is dropped and the next replica
    /// becomes the target.
    fn live(&self) -> Option<Arc<Client>> {
        let mut slot = self.slot();
        let client = slot.client.clone()?;
        if client.is_connected() {
            return Some(client);
        }
        slot.client = None;
        slot.target = self.next_after(client.address());
        None
    }

    /// A usable connection for the next attempt, opening one if needed. One task connects at a
    /// time; the others wait for it, holding a place in the bounded queue.
    async fn connection<'a>(
        &'a self,
        op: &mut Operation<'a>,
    ) -> std::result::Result<Arc<Client>, NoConnection> {
        if let Some(client) = self.live() {
            op.queued = None;
            return Ok(client);
        }
        if op.queued.is_none() {
            if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.opts.queue_max {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                return Err(NoConnection::QueueFull);
            }
            op.queued = Some(QueueSlot {
                waiting: &self.waiting,
            });
        }
        let _connecting = tokio::time::timeout_at(op.deadline, self.connecting.lock())
            .await
            .map_err(|_| NoConnection::Deadline)?;
        // Whoever held the lock before may have connected already.
        if let Some(client) = self.live() {
            op.queued = None;
            return Ok(client);
        }
        let (target, not_before) = {
            let slot = self.slot();
            (slot.target.clone(), slot.next_connect_at)
        };
        if not_before >= op.deadline {
            return Err(NoConnection::Deadline);
        }
        tokio::time::sleep_until(not_before).await;
        let now = Instant::now();
        if now >= op.deadline {
            return Err(NoConnection::Deadline);
        }
        let timeout = self.opts.call_timeout.min(op.deadline - now);
        // The outer timeout also bounds a connector that ignores its argument.
        let result = tokio::time::timeout(timeout, self.connector.connect(&target, timeout))
            .await
            .unwrap_or(Err(Error::Timeout));
        let mut slot = self.slot();
        match result {
            Ok(client) => {
                let client = Arc::new(client.with_timeout(self.opts.call_timeout));
                slot.client = Some(client.clone());
                slot.connect_failures = 0;
                bump(&self.counters.connects);
                op.queued = None;
                Ok(client)
            }
            Err(e) => {
                bump(&self.counters.connect_failures);
                slot.next_connect_at = Instant::now() + self.backoff(slot.connect_failures);
                slot.connect_failures = slot.connect_failures.saturating_add(1);
                if slot.target == target {
                    slot.target = self.next_after(&target);
                }
                if connect_may_succeed_later(&e) {
                    Err(NoConnection::Retry(e))
                } else {
                    Err(NoConnection::Final(e))
                }
            }
        }
    }

    /// Stops using `client` (dead, stuck, or not the leader) and targets the next replica, unless
    /// another task has already moved on from it.
    fn abandon(&self, client: &Arc<Client>) {
        let mut slot = self.slot();
        if slot.client.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            slot.client = None;
            slot.target = self.next_after(client.address());
        }
    }

    /// Follows a `not_leader` hint from `client`: the next connection goes to `hint`, at once.
    fn redirect(&self, client: &Arc<Client>, hint: String) {
        let mut slot = self.slot();
        if slot.client.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            slot.client = None;
            slot.target = hint;
            slot.next_connect_at = Instant::now();
        }
    }

    /// The replica after `address` in profile order; the first one if `address` is not in the
    /// profile (a hinted address).
    fn next_after(&self, address: &str) -> String {
        let n = self.replicas.len();
        let i = self
            .replicas
            .iter()
            .position(|r| r.address == address)
            .map_or(0, |i| (i + 1) % n);
        self.replicas[i].address.clone()
    }

    async fn status_of(&self, address: &str) -> Result<StatusReply> {
        let timeout = self.opts.call_timeout;
        let client = tokio::time::timeout(timeout, self.connector.connect(address, timeout))
            .await
            .unwrap_or(Err(Error::Timeout))?
            .with_timeout(timeout);
        client.status().await
    }
}

/// An admin request for `command`, issued now with a random nonce, signed by `key`.
pub fn signed_admin(chain_id: Hash, key: &SigningKey, command: AdminCommand) -> AdminRequest {
    let issued_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut request = AdminRequest {
        chain_id,
        issued_unix_ms,
        nonce: rand::random(),
        command,
        admin_key: [0; 32],
        signature: [0; 64],
    };
    tally_core::crypto::sign_admin(key, &mut request);
    request
}

/// How to go on after an attempt on the connection to `address` failed with `e`.
fn next_step(e: &Error, address: &str) -> Next {
    match e {
        Error::Rejected(reply) => match reply.code {
            ErrorCode::NotLeader => {
                let hint = reply.leader_hint.trim();
                if hint != address && valid_address(hint) {
                    Next::Redirect(hint.to_string())
                } else {
                    Next::Backoff {
                        elsewhere: true,
                        retry_after_ms: reply.retry_after_ms,
                    }
                }
            }
            ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::Recovering => {
                Next::Backoff {
                    elsewhere: true,
                    retry_after_ms: reply.retry_after_ms,
                }
            }
            ErrorCode::Busy | ErrorCode::TooManyInFlight | ErrorCode::ArchiveBehind => {
                Next::Backoff {
                    elsewhere: false,
                    retry_after_ms: reply.retry_after_ms,
                }
            }
            _ => Next::Final,
        },
        Error::Disconnected | Error::Timeout => Next::Reconnect,
        _ => Next::Final,
    }
}

/// Whether a failed connection attempt is worth repeating (against the next replica): the
/// network and the peer, yes; a missing CA file or a bad server name, no.
fn connect_may_succeed_later(e: &Error) -> bool {
    matches!(
        e,
        Error::Connect { .. } | Error::Timeout | Error::Disconnected | Error::Tls(_)
    )
}

/// `host:port` with a non-empty host and a non-zero port (an IPv6 host in brackets).
fn valid_address(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_wire::{ErrorReply, Retry};

    #[test]
    fn hints_must_be_addresses() {
        for good in ["127.0.0.1:7400", "node-2.example:1", "[::1]:7400"] {
            assert!(valid_address(good), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1",
            ":7400",
            "host:0",
            "host:99999",
            "a b:1",
            "host:",
        ] {
            assert!(!valid_address(bad), "{bad}");
        }
    }

    #[test]
    fn what_follows_each_failure() {
        let reply = |code: ErrorCode, hint: &str, after: u32| {
            let mut r = ErrorReply::new(code, "x");
            r.leader_hint = hint.into();
            r.retry_after_ms = after;
            Error::Rejected(r)
        };
        let check = |e: Error, expected: &str| {
            let got = match next_step(&e, "a:1") {
                Next::Final => "final".to_string(),
                Next::Redirect(to) => format!("redirect {to}"),
                Next::Backoff {
                    elsewhere,
                    retry_after_ms,
                } => format!("backoff elsewhere={elsewhere} after={retry_after_ms}"),
                Next::Reconnect => "reconnect".to_string(),
            };
            assert_eq!(got, expected, "{e}");
        };
        check(reply(ErrorCode::NotLeader, "b:2", 0), "redirect b:2");
        check(
            reply(ErrorCode::NotLeader, "", 0),
            "backoff elsewhere=true after=0",
        );
        check(
            reply(ErrorCode::NotLeader, "a:1", 0),
            "backoff elsewhere=true after=0",
        );
        check(
            reply(ErrorCode::NotLeader, "garbage", 0),
            "backoff elsewhere=true after=0",
        );
        check(
            reply(ErrorCode::Unavailable, "", 100),
            "backoff elsewhere=true after=100",
        );
        check(
            reply(ErrorCode::ShuttingDown, "", 0),
            "backoff elsewhere=true after=0",
        );
        check(
            reply(ErrorCode::Busy, "", 50),
            "backoff elsewhere=false after=50",
        );
        check(
            reply(ErrorCode::TooManyInFlight, "", 0),
            "backoff elsewhere=false after=0",
        );
        for code in [
            ErrorCode::Unauthorized,
            ErrorCode::StaleRequest,
            ErrorCode::MembershipRefused,
            ErrorCode::BadSignature,
            ErrorCode::InsufficientFunds,
            ErrorCode::IdConflict,
            ErrorCode::UnknownAccount,
            ErrorCode::Internal,
        ] {
            check(reply(code, "", 0), "final");
        }
        check(Error::Disconnected, "reconnect");
        check(Error::Timeout, "reconnect");
        check(Error::Protocol("x".into()), "final");
        assert_eq!(ErrorCode::NotLeader.retry(), Retry::Elsewhere);
    }

    #[test]
    fn backoff_grows_within_bounds() {
        let client = ClusterClient::with_connector(
            vec![],
            ClusterOptions {
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(2000),
                ..ClusterOptions::default()
            },
            Arc::new(ProfileConnectorStub),
        );
        for retries in 0..40 {
            let d = client.inner.backoff(retries);
            assert!(d >= Duration::from_millis(50), "{retries}: {d:?}");
            assert!(d <= Duration::from_millis(2000), "{retries}: {d:?}");
            let base = Duration::from_millis(50)
                .saturating_mul(1 << retries.min(20))
                .min(Duration::from_millis(2000));
            assert!(d * 2 >= base, "{retries}: {d:?} is below half of {base:?}");
        }
        assert_eq!(client.inner.backoff(0), Duration::from_millis(50));
        assert!(client.inner.backoff(30) >= Duration::from_millis(1000));
    }

    struct ProfileConnectorStub;

    impl Connector for ProfileConnectorStub {
        fn connect<'a>(&'a self, _: &'a str, _: Duration) -> ConnectFuture<'a> {
            Box::pin(async { Err(Error::Timeout) })
        }
    }
}
