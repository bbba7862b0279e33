//! The confirmer thread: builds each applied batch's Merkle tree once and sends every
//! confirmation; with `archive.confirm_after_archive`, only once the archive holds the batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use tally_core::batch::BatchBody;
use tally_core::merkle::ProofTree;
use tally_wire::ErrorCode;

use super::ArchiveGate;
use crate::channels::Waiters;
use crate::metrics::Metrics;

pub(super) struct ConfirmJob {
    pub body: BatchBody,
    /// The body's receipt leaf hashes, as the apply computed them.
    pub leaves: Vec<tally_wire::Hash>,
    pub signed: tally_wire::SignedHeader,
    pub waiters: Waiters,
}

/// How long a confirmation waits for the archive once the node is stopping, before its
/// client is told to retry (with `archive.confirm_after_archive`).
const ARCHIVE_WAIT_AT_STOP: Duration = Duration::from_secs(5);

/// Builds the Merkle tree of each applied batch once and sends every confirmation; with
/// `archive.confirm_after_archive`, only once the archive holds the batch.
pub(super) fn confirmer(
    rx: Receiver<ConfirmJob>,
    metrics: &Metrics,
    wait_for: Option<(Arc<ArchiveGate>, Arc<AtomicBool>)>,
) {
    while let Ok(job) = rx.recv() {
        metrics.confirm.queue_depth.set(rx.len() as i64);
        // A follower's batches have no clients waiting: no tree to build.
        if job.waiters.is_empty() {
            continue;
        }
        let height = job.signed.header.height;
        if let Some((gate, shutdown)) = &wait_for {
            if !wait_for_archive(gate, shutdown, height) {
                for w in job.waiters {
                    w.reply.error(
                        ErrorCode::Unavailable,
                        "the batch is committed but not yet in the archive; retry with the same id",
                    );
                }
                continue;
            }
        }
        let started = Instant::now();
        let tree = ProofTree::new(job.leaves);
        // The header's root was checked against the receipts (by rs_merkle) before the batch
        // was applied; proofs from a tree with another root would not verify.
        assert_eq!(
            tree.root(),
            job.signed.header.merkle_root,
            "the proof tree of batch {} disagrees with its header's Merkle root",
            job.signed.header.height
        );
        let starts = job.body.item_starts();
        for w in job.waiters {
            let confirmed = job.body.confirmed(&tree, &starts, &job.signed, w.index);
            let mut c = confirmed.expect("a waiter's item starts at its index");
            if w.replayed {
                c.set_replayed();
            }
            w.reply.confirmed(c);
        }
        metrics
            .confirm
            .seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Waits until the archive holds `height`; gives up only when the node is stopping.
fn wait_for_archive(gate: &ArchiveGate, shutdown: &AtomicBool, height: u64) -> bool {
    let mut stopping_since: Option<Instant> = None;
    loop {
        if gate.progress.wait_for(height, Duration::from_millis(100)) {
            return true;
        }
        if shutdown.load(Ordering::SeqCst) {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= ARCHIVE_WAIT_AT_STOP {
                return false;
            }
        }
    }
}
