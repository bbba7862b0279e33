//! What an error means for a replica is decided in one place, `Error::disposition`: a
//! deterministic error is answered to the client it concerns, any other stops the replica. The
//! engine's stages follow it: the master and the applier answer a deterministic error and return
//! an environmental one (the runtime then stops), and a committed batch that fails to apply
//! answers no one.

use tally_core::engine::apply::{Applier, ApplierConfig, ApplyOut, Committed};
use tally_core::engine::master::{Master, MasterConfig, MasterOut, Poll};
use tally_core::engine::Waiter;
use tally_core::ports::{LedgerRead, LedgerStore, MemStore, RequestRecord};
use tally_core::state::LedgerMeta;
use tally_core::{Disposition, Error};
use tally_wire::{ErrorCode, PublicKey, SignedHeader, WireError};

use crate::common::{config, deposit, operator, transfer, Node};

fn check(e: Error, expected: Disposition) {
    assert_eq!(e.disposition(), expected, "{e}");
    let deterministic = matches!(expected, Disposition::Reply(_));
    assert_eq!(e.is_deterministic(), deterministic, "{e}");
}

#[test]
fn each_error_has_its_disposition() {
    use Disposition::{Reply, Stop};
    check(Error::io("writing a batch", "disk full"), Stop);
    check(Error::corrupt("table account: 5 bytes"), Stop);
    check(Error::missing("the header of batch 3"), Stop);
    check(Error::stopped("the storage thread"), Stop);
    check(Error::Config("raft config: election tick".into()), Stop);
    check(Error::Diverged("batch 3: state digest".into()), Stop);
    check(
        Error::Verify("bad proof".into()),
        Reply(ErrorCode::MalformedRequest),
    );
    let truncated = WireError::Truncated { field: "amount" };
    check(Error::Wire(truncated), Reply(ErrorCode::MalformedMessage));
    let too_large = WireError::FrameTooLarge { length: 9, max: 1 };
    check(Error::Wire(too_large), Reply(ErrorCode::FrameTooLarge));
}

#[test]
fn messages_name_the_failure() {
    let cases = [
        (
            Error::io("writing a batch", "disk full"),
            "storage failed: writing a batch: disk full",
        ),
        (
            Error::corrupt("table account: 5 bytes"),
            "storage is corrupt: table account: 5 bytes",
        ),
        (
            Error::missing("the header of batch 3"),
            "storage is missing the header of batch 3",
        ),
        (
            Error::stopped("the storage thread"),
            "the storage thread has stopped",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(e.to_string(), text);
    }
}

/// A [`MemStore`] whose reads, or writes, fail with a given error.
#[derive(Default)]
struct Failing {
    inner: MemStore,
    reads: Option<Error>,
    writes: Option<Error>,
}

impl Failing {
    fn read(&self) -> Result<(), Error> {
        self.reads.clone().map_or(Ok(()), Err)
    }
}

impl LedgerRead for Failing {
    fn account(&mut self, key: &PublicKey) -> Result<Option<u64>, Error> {
        self.read()?;
        self.inner.account(key)
    }
    fn request(&mut self, signer: &PublicKey, id: u128) -> Result<Option<RequestRecord>, Error> {
        self.read()?;
        self.inner.request(signer, id)
    }
    fn reserve(
        &mut self,
        owner: &PublicKey,
        id: u128,
    ) -> Result<Option<tally_core::reserve::Reserve>, Error> {
        self.read()?;
        self.inner.reserve(owner, id)
    }
    fn expiries(&mut self, limit: usize) -> Result<Vec<tally_core::reserve::Expiry>, Error> {
        self.read()?;
        self.inner.expiries(limit)
    }
    fn header_time(&mut self, height: u64) -> Result<u64, Error> {
        self.read()?;
        self.inner.header_time(height)
    }
}

impl LedgerStore for Failing {
    fn pending(&mut self, key: &PublicKey) -> Result<(u64, u64), Error> {
        self.inner.pending(key)
    }
    fn meta(&mut self) -> Result<LedgerMeta, Error> {
        self.inner.meta()
    }
    fn apply(&mut self, write: &tally_core::batch::BatchWrite) -> Result<(), Error> {
        self.writes.clone().map_or(Ok(()), Err)?;
        self.inner.apply(write)
    }
    fn header(&mut self, height: u64) -> Result<Option<SignedHeader>, Error> {
        self.read()?;
        self.inner.header(height)
    }
    fn body(&mut self, height: u64) -> Result<Option<Vec<u8>>, Error> {
        self.read()?;
        self.inner.body(height)
    }
    fn applied_header(&mut self, height: u64) -> Result<Option<tally_wire::Header>, Error> {
        self.read()?;
        self.inner.applied_header(height)
    }
    fn signed_through(&mut self) -> Result<u64, Error> {
        self.inner.signed_through()
    }
    fn sign_header(&mut self, h: u64, s: tally_wire::Signature) -> Result<SignedHeader, Error> {
        self.writes.clone().map_or(Ok(()), Err)?;
        self.inner.sign_header(h, s)
    }
    fn checkpointed_through(&mut self) -> Result<u64, Error> {
        self.inner.checkpointed_through()
    }
    fn sign_checkpoint(&mut self, size: u64, s: tally_wire::Signature) -> Result<(), Error> {
        self.writes.clone().map_or(Ok(()), Err)?;
        self.inner.sign_checkpoint(size, s)
    }
    fn checkpoint_signature(&mut self, size: u64) -> Result<Option<tally_wire::Signature>, Error> {
        self.read()?;
        self.inner.checkpoint_signature(size)
    }
    fn header_log_node(&mut self, level: u8, index: u64) -> Result<tally_wire::Hash, Error> {
        self.read()?;
        self.inner.header_log_node(level, index)
    }
    fn balance_total(&mut self) -> Result<u128, Error> {
        self.read()?;
        self.inner.balance_total()
    }
}

const POLL: Poll = Poll {
    now_ms: 0,
    unix_ms: 0,
    applied_height: 0,
    upstream_empty: true,
    stopping: false,
};

/// Submits a transfer to a leading master whose reads fail with `e`.
fn submit_failing(e: Error) -> (Result<(), Error>, Vec<MasterOut<u32>>) {
    let mut master = Master::new(MasterConfig {
        sequencer: config(&operator()),
        window_ms: 100,
        close_idle: false,
        in_flight_max: 1,
    });
    let mut out = Vec::new();
    master.lead(1, 1, LedgerMeta::genesis(), &mut out);
    let mut store = Failing {
        reads: Some(e),
        ..Failing::default()
    };
    let result = master.submit(transfer(1, 1, 2, 5), 0, 7, &POLL, &mut store, &mut out);
    (result, out)
}

#[test]
fn the_master_stops_on_a_failed_read() {
    let (result, out) = submit_failing(Error::io("reading an account", "EIO"));
    assert!(matches!(result, Err(Error::Io { .. })), "{result:?}");
    assert!(out.is_empty(), "nobody is answered: {out:?}");
}

#[test]
fn the_master_answers_a_deterministic_error() {
    let (result, out) = submit_failing(Error::Verify("bad proof".into()));
    result.expect("a deterministic error does not stop the master");
    match &out[..] {
        [MasterOut::Reject(7, r)] => assert_eq!(r.code, ErrorCode::MalformedRequest),
        other => panic!("expected the client's rejection, got {other:?}"),
    }
}

/// A node with one sealed batch (two deposits), and an applier at genesis.
fn sealed() -> (tally_core::batch::BatchBody, Applier<u32>) {
    let mut node = Node::new();
    node.submit(deposit(1, 1, 100));
    node.submit(deposit(2, 2, 50));
    node.seal();
    let body = node.pending.pop_front().expect("sealed");
    let cfg = ApplierConfig {
        parked_max: 8,
        accounts_cached_max: 8,
    };
    let keys = tally_core::key_chain::SigningKeys::single(operator());
    (body, Applier::new(cfg, keys, LedgerMeta::genesis()))
}

fn committed(body: tally_core::batch::BatchBody) -> Committed<u32> {
    Committed::Batch {
        encoded: body.encode(),
        sealed: None,
        body,
        waiters: vec![Waiter {
            index: 0,
            reply: 7,
            replayed: false,
        }],
        raft_index: 1,
    }
}

#[test]
fn a_failed_write_of_a_committed_batch_stops_the_replica() {
    let (body, mut applier) = sealed();
    let mut store = Failing {
        writes: Some(Error::io("writing a batch", "ENOSPC")),
        ..Failing::default()
    };
    let mut out = Vec::new();
    let result = applier.committed(&mut store, committed(body), &mut out);
    assert!(matches!(result, Err(Error::Io { .. })), "{result:?}");
    assert!(out.is_empty(), "nobody is answered: {out:?}");
    assert_eq!(applier.meta().height, 0, "nothing applied");
}

#[test]
fn a_diverging_committed_batch_stops_the_replica_and_answers_no_one() {
    let (mut body, mut applier) = sealed();
    body.header.state_digest[0] ^= 1;
    let mut store = Failing::default();
    let mut out = Vec::new();
    let result = applier.committed(&mut store, committed(body), &mut out);
    assert!(matches!(result, Err(Error::Diverged(_))), "{result:?}");
    assert!(out.is_empty(), "nobody is answered: {out:?}");
    assert!(store.inner.headers.is_empty(), "nothing written");
}

/// Applies the sealed batch, then has a resubmission of its first request read the stored batch
/// with `tamper` applied to the store.
fn replay_with(tamper: impl FnOnce(&mut Failing)) -> (Result<(), Error>, Vec<ApplyOut<u32>>) {
    let (body, mut applier) = sealed();
    let rh = body.entry(0).receipt.request_hash;
    let mut store = Failing::default();
    let mut out = Vec::new();
    applier
        .committed(&mut store, committed(body), &mut out)
        .expect("applies");
    assert!(matches!(&out[..], [ApplyOut::Confirm { .. }]), "{out:?}");
    out.clear();
    tamper(&mut store);
    let result = applier.replay(&mut store, 1, 0, rh, 9, &mut out);
    (result, out)
}

#[test]
fn a_resubmission_is_confirmed_from_the_stored_batch() {
    let (result, out) = replay_with(|_| {});
    result.expect("replays");
    assert!(matches!(&out[..], [ApplyOut::Replayed(9, _)]), "{out:?}");
}

#[test]
fn a_failed_read_of_a_stored_batch_stops_the_replica() {
    let (result, out) = replay_with(|s| s.reads = Some(Error::io("reading a body", "EIO")));
    assert!(matches!(result, Err(Error::Io { .. })), "{result:?}");
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn a_stored_batch_that_does_not_decode_is_corrupt_storage() {
    let (result, out) = replay_with(|s| {
        s.inner.bodies.insert(1, vec![1, 2, 3]);
    });
    assert!(matches!(result, Err(Error::Corrupt { .. })), "{result:?}");
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn a_deterministic_error_answering_a_resubmission_is_the_clients_answer() {
    let truncated = WireError::Truncated { field: "body" };
    let (result, out) = replay_with(|s| s.reads = Some(Error::Wire(truncated)));
    result.expect("a deterministic error does not stop the applier");
    match &out[..] {
        [ApplyOut::Reject(9, r)] => assert_eq!(r.code, ErrorCode::MalformedMessage),
        other => panic!("expected the client's rejection, got {other:?}"),
    }
}
