//! The server's Prometheus metrics: one [`Registry`] and every handle on it, in one struct that
//! the pipeline threads and connection tasks share by `Arc`.
//!
//! Names follow Prometheus conventions: a `tally_` prefix, the unit last (`_seconds`, `_bytes`),
//! `_total` on counters. Every labelled series is created up front (each stage, each close
//! reason, each error code), so a series reads 0 instead of being absent until its first event,
//! and `rate()` sees the first increment. docs/OPERATING.md describes each metric.
//!
//! Updating a handle is an atomic operation; no lock is held across the pipeline. Queue depths
//! are sampled by the threads around each queue (see `pipeline.rs`), not at scrape time, because
//! holding a channel end here would change when the pipeline's channels disconnect.

use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tally_wire::ErrorCode;

/// The pipeline stages, in request order; the `stage` label of the per-stage metrics.
pub const STAGES: [&str; 5] = ["stateless", "snapshot", "master", "storage", "confirm"];

/// The queues that answer `busy` when full; the `queue` label of `tally_busy_total`
/// (`reply_budget`: `limits.reply_bytes_total_max`, spent by replies not yet written).
pub const BUSY_QUEUES: [&str; 4] = ["stateless", "storage", "reply_budget", "envelopes"];
/// The deadlines that close a client connection; the `deadline` label of
/// `tally_connections_timed_out_total` (each is `limits.<deadline>_timeout_ms`).
pub const DEADLINES: [&str; 5] = ["handshake", "first_request", "frame", "idle", "write"];
const LOOKUP_ANSWERS: [&str; 3] = ["filtered", "found", "absent"];
const SIGNATURE_PATHS: [&str; 2] = ["batch", "single"];

pub use tally_core::engine::master::BatchClose;

/// One pipeline stage: how many items wait in its input queue, and how long it spends on one.
pub struct Stage {
    pub queue_depth: IntGauge,
    pub seconds: Histogram,
}

/// The master and the confirmer: batches, the requests in them, the sequencer's account cache.
pub struct BatchMetrics {
    /// From the request's frame being read to its confirmation being handed to the connection.
    pub confirmation_seconds: Histogram,
    /// Requests per sealed batch.
    pub requests: Histogram,
    /// Requests in the batch the master has open (0 when none is open).
    pub open_requests: IntGauge,
    closed_total: IntCounterVec,
    pub confirmed_total: IntCounter,
    pub replayed_total: IntCounter,
    pub account_cache_misses_total: IntCounter,
    pub account_cache_hits_total: IntCounter,
}

/// The storage thread: applying batches, the history database, opening the ledger.
pub struct LedgerMetrics {
    /// Replay of the batch against applied state, Merkle root, header signature
    /// (`tally_core::batch::prepare_apply`).
    pub apply_prepare_seconds: Histogram,
    /// The one atomic synced LevelDB write of a batch.
    pub durable_write_seconds: Histogram,
    /// LevelDB housekeeping (memtable flush, compactions) run while the storage thread is idle.
    pub maintain_seconds: Histogram,
    pub batch_body_bytes: Histogram,
    /// Applied batches whose bodies and request records the local history database
    /// (`<ledger>/archive`) does not hold durably yet.
    pub history_lag_batches: IntGauge,
    /// Duplicate-id lookups by how they were answered: `filtered` (from the in-memory request
    /// filter, no read), `found` and `absent` (read from LevelDB; `absent` with the filter on
    /// are its false positives).
    request_lookups_total: IntCounterVec,
    /// 1 when the request filter was loaded from the file the last clean stop saved, 0 when it
    /// was rebuilt by scanning the request table (or is turned off).
    pub request_filter_loaded: IntGauge,
    /// How long opening the ledger took at start, request filter included.
    pub open_seconds: Gauge,
}

/// Client connections: how many are open, and those closed or answered without being served.
pub struct ConnectionMetrics {
    pub open: IntGauge,
    pub refused_total: IntCounter,
    /// Closed before their TLS handshake: the address passed
    /// `limits.handshakes_per_address_per_second`.
    pub rate_limited_total: IntCounter,
    timed_out_total: IntCounterVec,
    busy_total: IntCounterVec,
    rejected_total: IntCounterVec,
}

/// Request signatures checked by the stateless workers.
pub struct SignatureMetrics {
    /// By path: `batch` (accepted by a batch equation), `single` (strict verification one by
    /// one).
    checks_total: IntCounterVec,
    pub batches_failed_total: IntCounter,
    /// Signatures in each batch equation a stateless worker tried: small batches cost more per
    /// signature (the multiscalar multiplication amortizes over its points).
    batch_size: Histogram,
}

/// Raft state, set by the raft thread from its replica's status (a single node is a raft group
/// of one voter, and its leader).
pub struct RaftMetrics {
    pub term: IntGauge,
    pub role: IntGauge,
    pub leader_id: IntGauge,
    pub commit_index: IntGauge,
    pub applied_index: IntGauge,
    pub proposals_in_flight: IntGauge,
    pub elections_total: IntCounter,
    /// One pass over raft-rs's Ready: the synced raft-log write, messages, committed entries.
    pub ready_seconds: Histogram,
    /// Threshold signing (a threshold operator's replicas only): heights whose header, and
    /// whose checkpoint, signatures this replica applied.
    pub threshold_headers_signed: IntGauge,
    pub threshold_checkpoints_signed: IntGauge,
    /// Rounds this replica coordinated, by outcome; shares it signed.
    pub threshold_rounds: IntCounterVec,
    pub threshold_shares: IntCounter,
}

/// The archive writer (`tally_storage::archiver`), copied from its progress once a second.
pub struct ArchiveMetrics {
    pub height: IntGauge,
    pub lag_batches: IntGauge,
    pub upload_errors: IntCounter,
    pub uploaded_bytes: IntCounter,
    pub uploaded_batches: IntCounter,
    pub snapshots: IntCounter,
    pub fenced: IntGauge,
}

pub struct Metrics {
    pub registry: Registry,
    pub stateless: Stage,
    pub snapshot: Stage,
    pub master: Stage,
    pub storage: Stage,
    pub confirm: Stage,
    pub batches: BatchMetrics,
    pub ledger: LedgerMetrics,
    pub connections: ConnectionMetrics,
    pub signatures: SignatureMetrics,
    pub raft: RaftMetrics,
    /// The archive in object storage (`[archive]`).
    pub archive: ArchiveMetrics,
    pub applied_height: IntGauge,
    /// 1 when the node can serve (see `/ready`), else 0.
    ready: IntGauge,
}

/// 10 µs to about 10.5 s in powers of two: a signature check and a slow fsync both fit.
fn seconds_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_01, 2.0, 21).expect("valid buckets")
}

fn exponential_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).expect("valid buckets")
}

/// Confirmation latency is dominated by the batch window (100 ms by default): finer buckets
/// around it, so that p50/p99 interpolate well.
const CONFIRMATION_BUCKETS: [f64; 24] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.11, 0.125, 0.15, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];

/// Registers each metric it creates on one registry. Names and help texts are a contract with
/// dashboards and alerts (docs/OPERATING.md): change them only together.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique and valid");
        c
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid gauge"))
    }

    fn float_gauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::new(name, help).expect("valid gauge"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid counter"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        self.add(Histogram::with_opts(opts).expect("valid histogram"))
    }

    /// A counter with one label, each of `values` created at 0.
    fn counter_vec(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter");
        for v in values {
            c.with_label_values(&[*v]);
        }
        self.add(c)
    }
}

impl Stage {
    /// Every stage of [`STAGES`], in that order, on the two `stage`-labelled metrics.
    fn all(r: &Reg) -> [Stage; 5] {
        let depth = IntGaugeVec::new(
            Opts::new(
                "tally_queue_depth",
                "Items waiting in a pipeline stage's input queue, sampled by the threads at it.",
            ),
            &["stage"],
        )
        .expect("valid gauge");
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "tally_stage_seconds",
                "Time a pipeline stage spends on one unit of work (see docs/OPERATING.md).",
            )
            .buckets(seconds_buckets()),
            &["stage"],
        )
        .expect("valid histogram");
        let (depth, seconds) = (r.add(depth), r.add(seconds));
        STAGES.map(|name| Stage {
            queue_depth: depth.with_label_values(&[name]),
            seconds: seconds.with_label_values(&[name]),
        })
    }
}

impl BatchMetrics {
    fn new(r: &Reg) -> BatchMetrics {
        BatchMetrics {
            confirmation_seconds: r.histogram(
                "tally_confirmation_seconds",
                "From a request's frame being read to its confirmation being handed to the connection (new requests, not replays).",
                CONFIRMATION_BUCKETS.to_vec(),
            ),
            requests: r.histogram(
                "tally_batch_requests",
                "Requests per sealed batch.",
                exponential_buckets(1.0, 2.0, 17),
            ),
            open_requests: r.gauge(
                "tally_open_batch_requests",
                "Requests in the batch the master has open, not yet sealed.",
            ),
            closed_total: r.counter_vec(
                "tally_batches_total",
                "Batches sealed, by why they were closed.",
                "reason",
                &BatchClose::ALL.map(BatchClose::name),
            ),
            confirmed_total: r.counter(
                "tally_requests_confirmed_total",
                "Confirmations sent for newly applied requests.",
            ),
            replayed_total: r.counter(
                "tally_requests_replayed_total",
                "Original confirmations sent again for resubmitted requests.",
            ),
            account_cache_misses_total: r.counter(
                "tally_account_cache_misses_total",
                "Accounts the sequencer had to load from storage.",
            ),
            account_cache_hits_total: r.counter(
                "tally_account_cache_hits_total",
                "Account lookups the sequencer served from its bounded cache.",
            ),
        }
    }
}

impl LedgerMetrics {
    fn new(r: &Reg) -> LedgerMetrics {
        LedgerMetrics {
            apply_prepare_seconds: r.histogram(
                "tally_apply_prepare_seconds",
                "Replaying a committed batch, checking its root and digest, and signing its header.",
                seconds_buckets(),
            ),
            durable_write_seconds: r.histogram(
                "tally_durable_write_seconds",
                "The atomic synced LevelDB write of one batch.",
                seconds_buckets(),
            ),
            maintain_seconds: r.histogram(
                "tally_storage_maintain_seconds",
                "LevelDB memtable flushes and compactions run while the storage thread is idle.",
                seconds_buckets(),
            ),
            batch_body_bytes: r.histogram(
                "tally_batch_body_bytes",
                "Size of an applied batch body as stored.",
                exponential_buckets(256.0, 4.0, 12),
            ),
            history_lag_batches: r.gauge(
                "tally_history_lag_batches",
                "Applied batches whose bodies and request records the local history database (written behind the confirmation path) does not hold durably yet.",
            ),
            request_lookups_total: r.counter_vec(
                "tally_request_lookups_total",
                "Duplicate-id lookups by answer: filtered (in-memory filter, no read), found, absent.",
                "answer",
                &LOOKUP_ANSWERS,
            ),
            request_filter_loaded: r.gauge(
                "tally_request_filter_loaded",
                "1 if the request filter was loaded from the file saved at the last clean stop, 0 if rebuilt by scanning the request table or off.",
            ),
            open_seconds: r.float_gauge(
                "tally_ledger_open_seconds",
                "Time opening the ledger took at start, request filter included.",
            ),
        }
    }
}

impl ConnectionMetrics {
    fn new(r: &Reg) -> ConnectionMetrics {
        let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
        ConnectionMetrics {
            open: r.gauge("tally_connections_open", "Open client connections."),
            refused_total: r.counter(
                "tally_connections_refused_total",
                "Client connections closed at once because limits.connections_max were open.",
            ),
            rate_limited_total: r.counter(
                "tally_connections_rate_limited_total",
                "Client connections closed before their TLS handshake because their address \
                 passed limits.handshakes_per_address_per_second.",
            ),
            timed_out_total: r.counter_vec(
                "tally_connections_timed_out_total",
                "Client connections closed because a deadline passed, by deadline.",
                "deadline",
                &DEADLINES,
            ),
            busy_total: r.counter_vec(
                "tally_busy_total",
                "Requests answered busy because a queue was full, by queue.",
                "queue",
                &BUSY_QUEUES,
            ),
            rejected_total: r.counter_vec(
                "tally_requests_rejected_total",
                "Client messages answered with an error, by error code.",
                "code",
                &codes,
            ),
        }
    }
}

impl SignatureMetrics {
    fn new(r: &Reg) -> SignatureMetrics {
        SignatureMetrics {
            checks_total: r.counter_vec(
                "tally_signature_checks_total",
                "Request signatures checked, by path: batch (hinted, one batch equation), single (strict, one by one).",
                "path",
                &SIGNATURE_PATHS,
            ),
            batches_failed_total: r.counter(
                "tally_signature_batches_failed_total",
                "Batch equations that failed; their signatures were checked again one by one.",
            ),
            batch_size: r.histogram(
                "tally_signature_batch_size",
                "Signatures in each batch equation tried by a stateless worker.",
                exponential_buckets(4.0, 2.0, 9),
            ),
        }
    }
}

impl RaftMetrics {
    fn new(r: &Reg) -> RaftMetrics {
        RaftMetrics {
            term: r.gauge("tally_raft_term", "Current Raft term."),
            role: r.gauge(
                "tally_raft_role",
                "Raft role: 0 follower, 1 candidate, 2 leader, 3 pre-candidate.",
            ),
            leader_id: r.gauge("tally_raft_leader_id", "Id of the known leader, 0 if none."),
            commit_index: r.gauge("tally_raft_commit_index", "Raft commit index."),
            applied_index: r.gauge("tally_raft_applied_index", "Raft applied index."),
            proposals_in_flight: r.gauge(
                "tally_raft_proposals_in_flight",
                "Batches proposed and not yet committed.",
            ),
            elections_total: r.counter(
                "tally_raft_elections_total",
                "Elections this replica started.",
            ),
            ready_seconds: r.histogram(
                "tally_raft_ready_seconds",
                "One pass over a raft Ready: the synced raft-log write (and any compaction \
                 it runs), messages sent, committed entries handed on.",
                seconds_buckets(),
            ),
            threshold_headers_signed: r.gauge(
                "tally_threshold_headers_signed_height",
                "Threshold operator: the height through which this replica applied header \
                 signatures.",
            ),
            threshold_checkpoints_signed: r.gauge(
                "tally_threshold_checkpoints_signed_height",
                "Threshold operator: the height through which this replica applied checkpoint \
                 signatures (its batches up to there are confirmed).",
            ),
            threshold_rounds: r.counter_vec(
                "tally_threshold_rounds_total",
                "Threshold signing rounds this replica coordinated as leader, by outcome \
                 (started, signed, failed: timed out or did not aggregate).",
                "outcome",
                &["started", "signed", "failed"],
            ),
            threshold_shares: r.counter(
                "tally_threshold_shares_total",
                "Threshold signature shares this replica signed.",
            ),
        }
    }
}

impl ArchiveMetrics {
    fn new(r: &Reg) -> ArchiveMetrics {
        ArchiveMetrics {
            height: r.gauge(
                "tally_archive_height",
                "Height the archive in object storage holds (its checkpoint's tree size), as this replica last read or wrote it.",
            ),
            lag_batches: r.gauge(
                "tally_archive_lag_batches",
                "Applied batches the archive in object storage does not hold yet; new requests are refused (archive_behind) at archive.max_lag_batches.",
            ),
            upload_errors: r.counter(
                "tally_archive_upload_errors_total",
                "Archive rounds that failed on a store error (each retried with backoff).",
            ),
            uploaded_bytes: r.counter(
                "tally_archive_uploaded_bytes_total",
                "Bytes written to the archive: batch objects, tiles, checkpoints.",
            ),
            uploaded_batches: r.counter(
                "tally_archive_uploaded_batches_total",
                "Batch objects written to the archive by this replica.",
            ),
            snapshots: r.counter(
                "tally_archive_snapshots_total",
                "State snapshots (full or differential) this replica wrote to the archive.",
            ),
            fenced: r.gauge(
                "tally_archive_fenced",
                "1 when this replica's archive writer stopped for good: the archive belongs to another ledger or holds another history (see the log).",
            ),
        }
    }
}

impl Metrics {
    /// A registry with every tally metric registered and every labelled series created.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = Reg(&registry);
        let [stateless, snapshot, master, storage, confirm] = Stage::all(&r);
        Metrics {
            stateless,
            snapshot,
            master,
            storage,
            confirm,
            batches: BatchMetrics::new(&r),
            ledger: LedgerMetrics::new(&r),
            connections: ConnectionMetrics::new(&r),
            signatures: SignatureMetrics::new(&r),
            raft: RaftMetrics::new(&r),
            archive: ArchiveMetrics::new(&r),
            applied_height: r.gauge(
                "tally_applied_height",
                "Height of the latest batch applied to this replica's storage.",
            ),
            ready: r.gauge(
                "tally_ready",
                "1 when this replica can serve (as /ready answers), else 0.",
            ),
            registry,
        }
    }

    /// Adds what the storage reports beyond `last` (its running totals) to the lookup counters.
    pub fn request_lookups(&self, last: &mut (u64, u64, u64), now: (u64, u64, u64)) {
        let deltas = [
            now.0.saturating_sub(last.0),
            now.1.saturating_sub(last.1),
            now.2.saturating_sub(last.2),
        ];
        for (answer, d) in LOOKUP_ANSWERS.iter().zip(deltas) {
            if d > 0 {
                self.ledger
                    .request_lookups_total
                    .with_label_values(&[answer])
                    .inc_by(d);
            }
        }
        *last = now;
    }

    pub fn batch_closed(&self, reason: BatchClose) {
        self.batches
            .closed_total
            .with_label_values(&[reason.name()])
            .inc();
    }

    pub fn rejected(&self, code: ErrorCode) {
        self.connections
            .rejected_total
            .with_label_values(&[code.name()])
            .inc();
    }

    pub fn signature_checks(&self, stats: &tally_core::crypto::VerifyStats) {
        let s = &self.signatures;
        let c = &s.checks_total;
        c.with_label_values(&["batch"]).inc_by(stats.batched as u64);
        c.with_label_values(&["single"]).inc_by(stats.single as u64);
        s.batches_failed_total.inc_by(stats.batches_failed as u64);
        if stats.batch_size > 0 {
            s.batch_size.observe(stats.batch_size as f64);
        }
    }

    /// `queue` is one of [`BUSY_QUEUES`].
    pub fn busy(&self, queue: &str) {
        debug_assert!(BUSY_QUEUES.contains(&queue), "{queue}");
        self.connections
            .busy_total
            .with_label_values(&[queue])
            .inc();
    }

    /// A client connection closed because `deadline` (one of [`DEADLINES`]) passed.
    pub fn timed_out(&self, deadline: &str) {
        debug_assert!(DEADLINES.contains(&deadline), "{deadline}");
        self.connections
            .timed_out_total
            .with_label_values(&[deadline])
            .inc();
    }

    /// Readiness as `/ready` reports it: once a leader is known and this replica has applied
    /// everything it knows to be committed (a single node: once it has elected itself).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready as i64);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("encoding metrics as text")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_from_the_start() {
        let m = Metrics::new();
        let text = m.encode();
        for needle in [
            "tally_queue_depth{stage=\"confirm\"} 0",
            "tally_stage_seconds_count{stage=\"stateless\"} 0",
            "tally_batches_total{reason=\"shutdown\"} 0",
            "tally_requests_rejected_total{code=\"insufficient_funds\"} 0",
            "tally_busy_total{queue=\"storage\"} 0",
            "tally_raft_role 0",
            "tally_ready 0",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
        m.rejected(ErrorCode::Busy);
        m.batch_closed(BatchClose::Full);
        m.set_ready(true);
        let text = m.encode();
        assert!(text.contains("tally_requests_rejected_total{code=\"busy\"} 1"));
        assert!(text.contains("tally_batches_total{reason=\"full\"} 1"));
        assert!(m.is_ready());
    }
}
