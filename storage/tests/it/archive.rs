//! The archive against a local directory and, when `TALLY_TEST_S3` is set (CI starts
//! SeaweedFS, `.ci/s3.sh`), a real S3 server: the bucket's create-only and conditional writes,
//! the writer (resume, racing writers, fencing), and the audit naming bad objects.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use tally_config::ArchiveUrl;
use tally_core::archive::{batch_key, signature_bundle_key, CHECKPOINT_KEY};
use tally_core::ports::LedgerStore;
use tally_core::tlog::{leaf_hash, origin_for, root_of, Checkpoint};
use tally_storage::archive_read::{audit, read_log, read_signature_bundles, AuditReport};
use tally_storage::archiver::{ArchiveProgress, Archiver, BatchSource};
use tally_storage::bucket::{Bucket, BucketSettings, PutNew};
use tally_storage::snapshots;
use tally_storage::{LedgerDb, StoreOptions};
use tally_wire::{Signature, SignedHeader};

use crate::support::{operator, Chain, CHAIN_ID};

/// The S3 bucket `.ci/s3.sh` creates for the tests (`TALLY_S3_BUCKETS`).
const TEST_BUCKET: &str = "tally-test";

/// The stores to run a test against: a fresh local directory, and a fresh prefix of the S3
/// bucket when an S3 server is there. CI always has one: without it there, fail.
pub(crate) fn stores(name: &str) -> Vec<(Bucket, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let local = BucketSettings::from_url(ArchiveUrl::File(dir.path().join("archive")));
    let mut out = vec![(Bucket::open(&local).unwrap(), Some(dir))];
    if std::env::var_os("TALLY_TEST_S3").is_some() {
        let prefix = format!("{name}-{}", rand::random::<u64>());
        let url = ArchiveUrl::S3 {
            bucket: TEST_BUCKET.into(),
            prefix,
        };
        out.push((Bucket::open(&BucketSettings::from_url(url)).unwrap(), None));
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the archive tests against S3: start it with .ci/s3.sh"
        );
        println!("no S3 server (TALLY_TEST_S3 unset): local directory only");
    }
    out
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `count` batches of a random test ledger (signed header, encoded body), from `seed`.
pub(crate) fn ledger(count: usize, seed: u64) -> Vec<(SignedHeader, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let mut db = LedgerDb::open(dir.path(), StoreOptions::default()).unwrap();
    let mut chain = Chain::new(db.meta().unwrap(), seed);
    (0..count)
        .map(|i| {
            let w = chain.step(&mut db, 1 + i % 5);
            (w.signed_header, w.body)
        })
        .collect()
}

/// A replica's ledger as the writer sees it: the batches applied so far.
pub(crate) struct MemSource {
    batches: Mutex<Vec<(SignedHeader, Vec<u8>)>>,
    may_write: AtomicBool,
    stop: AtomicBool,
    /// A threshold operator's replica: the writer holds no key and publishes the checkpoint
    /// signatures the ledger holds (here made with the operator key, as a group's would be).
    threshold: bool,
}

impl MemSource {
    pub(crate) fn new(batches: Vec<(SignedHeader, Vec<u8>)>) -> Arc<MemSource> {
        Arc::new(MemSource {
            batches: Mutex::new(batches),
            may_write: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            threshold: false,
        })
    }

    fn threshold(batches: Vec<(SignedHeader, Vec<u8>)>) -> Arc<MemSource> {
        let mut source = Arc::into_inner(MemSource::new(batches)).expect("one owner");
        source.threshold = true;
        Arc::new(source)
    }

    /// The operator's signature of the checkpoint of the first `size` headers.
    fn checkpoint_signature(&self, size: u64) -> Signature {
        let all = self.batches.lock().unwrap();
        let leaves: Vec<_> = all[..size as usize]
            .iter()
            .map(|(h, _)| leaf_hash(&h.encode()))
            .collect();
        let checkpoint = Checkpoint {
            origin: origin_for(&CHAIN_ID),
            size,
            root: root_of(&leaves),
        };
        operator_key().sign(checkpoint.body().as_bytes()).to_bytes()
    }
}

/// The writer's handle on a [`MemSource`].
struct Shared(Arc<MemSource>);

impl BatchSource for Shared {
    fn applied_height(&self) -> u64 {
        self.0.batches.lock().unwrap().len() as u64
    }
    fn may_write(&self) -> bool {
        self.0.may_write.load(Ordering::SeqCst)
    }
    fn stopping(&self) -> bool {
        self.0.stop.load(Ordering::SeqCst)
    }
    /// At most 100 at once, as a ledger answers a bounded number.
    async fn checkpoint_signatures(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<Option<Signature>>, String> {
        assert!(self.0.threshold, "a writer holding the key never asks");
        let to = to.min(from + 99);
        Ok((from..=to)
            .map(|s| Some(self.0.checkpoint_signature(s)))
            .collect())
    }
    async fn read(&self, from: u64, to: u64) -> Result<Vec<(SignedHeader, Bytes)>, String> {
        let all = self.0.batches.lock().unwrap();
        let range = &all[from as usize - 1..to as usize];
        Ok(range
            .iter()
            .map(|(h, b)| (h.clone(), Bytes::from(b.clone())))
            .collect())
    }
}

pub(crate) fn operator_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// Whose manifests the tests read: the test ledger's.
pub(crate) fn owner() -> snapshots::Owner {
    snapshots::Owner {
        chain_id: CHAIN_ID,
        operators: vec![operator_key().verifying_key().to_bytes()],
        unsigned: false,
    }
}

/// Runs a writer over `source` until the archive holds `height` or it is fenced; returns its
/// progress.
pub(crate) fn archive(
    rt: &tokio::runtime::Runtime,
    bucket: &Bucket,
    source: &Arc<MemSource>,
    chain_id: [u8; 32],
    height: u64,
) -> Arc<ArchiveProgress> {
    let progress = Arc::new(ArchiveProgress::default());
    let writer = Archiver {
        bucket: bucket.clone(),
        source: Shared(source.clone()),
        progress: progress.clone(),
        chain_id,
        genesis: operator_key().verifying_key().to_bytes(),
        keys: match source.threshold {
            true => vec![],
            false => vec![operator_key()],
        },
        snapshot_every_batches: 7,
    };
    let task = rt.spawn(writer.run());
    let started = Instant::now();
    while progress.height.load(Ordering::SeqCst) < height && !progress.fenced.load(Ordering::SeqCst)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the archive did not reach {height} (at {})",
            progress.height.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    source.stop.store(true, Ordering::SeqCst);
    rt.block_on(task).unwrap();
    source.stop.store(false, Ordering::SeqCst);
    progress
}

pub(crate) fn audit_of(
    rt: &tokio::runtime::Runtime,
    bucket: &Bucket,
    earlier: Option<&[u8]>,
) -> AuditReport {
    let public = operator().public();
    rt.block_on(audit(bucket, Some(&CHAIN_ID), &public, earlier))
        .unwrap()
}

#[test]
fn create_only_and_conditional_writes() {
    let rt = runtime();
    for (bucket, _dir) in stores("writes") {
        rt.block_on(async {
            let a = Bytes::from_static(b"a");
            let b = Bytes::from_static(b"b");
            assert_eq!(
                bucket.put_new("k", a.clone()).await.unwrap(),
                PutNew::Created
            );
            assert_eq!(bucket.put_new("k", a.clone()).await.unwrap(), PutNew::Same);
            assert_eq!(
                bucket.put_new("k", b.clone()).await.unwrap(),
                PutNew::Different
            );
            assert_eq!(
                bucket.get("k").await.unwrap().unwrap().0,
                a,
                "never overwritten"
            );

            let v1 = bucket.replace("c", a.clone(), None).await.unwrap().unwrap();
            assert!(bucket
                .replace("c", b.clone(), None)
                .await
                .unwrap()
                .is_none());
            let v2 = bucket
                .replace("c", b.clone(), Some(&v1))
                .await
                .unwrap()
                .unwrap();
            assert!(
                bucket
                    .replace("c", a.clone(), Some(&v1))
                    .await
                    .unwrap()
                    .is_none(),
                "a stale version loses"
            );
            let (now, version) = bucket.get("c").await.unwrap().unwrap();
            assert_eq!((now, version), (b, v2));
            assert!(bucket.get("missing").await.unwrap().is_none());
        });
    }
}

#[test]
fn the_writer_archives_and_resumes_across_a_tile_boundary() {
    let rt = runtime();
    let batches = ledger(300, 1);
    for (bucket, _dir) in stores("resume") {
        let source = MemSource::new(batches[..10].to_vec());
        archive(&rt, &bucket, &source, CHAIN_ID, 10);
        let first = audit_of(&rt, &bucket, None);
        assert!(first.ok, "{:?}", first.errors);
        assert_eq!((first.height, first.batches), (10, 10));
        let saved = rt.block_on(bucket.get(CHECKPOINT_KEY)).unwrap().unwrap().0;

        // A new writer (a restart, a new leader) resumes from the archive alone.
        *source.batches.lock().unwrap() = batches.clone();
        let progress = archive(&rt, &bucket, &source, CHAIN_ID, 300);
        assert!(!progress.fenced.load(Ordering::SeqCst));
        let report = audit_of(&rt, &bucket, Some(&saved));
        assert!(report.ok, "{:?}", report.errors);
        assert_eq!((report.height, report.batches), (300, 300));
        // A snapshot every 7 batches, every 8th one full; each checked against the replay.
        let manifests = rt
            .block_on(snapshots::manifests(&bucket, 300, &owner()))
            .unwrap();
        assert_eq!(report.snapshots, manifests.len() as u64);
        assert!(manifests.len() >= 300 / 7, "{}", manifests.len());
        let fulls = manifests.iter().filter(|m| m.is_full()).count();
        assert!(fulls >= 2 && fulls < manifests.len(), "{fulls} full");
        let stored = rt.block_on(bucket.get(&batch_key(300))).unwrap().unwrap().0;
        assert_eq!(&stored[..256], &batches[299].0.encode()[..]);
    }
}

/// A threshold operator's writer (no key): every checkpoint's signature goes into the signature
/// bundles, across a restart and a bundle boundary; the audit checks each one and names a
/// bundle whose signature does not verify.
#[test]
fn a_threshold_writer_archives_every_checkpoint_signature() {
    let rt = runtime();
    let batches = ledger(300, 3);
    let (bucket, _dir) = stores("signatures").swap_remove(0);
    let source = MemSource::threshold(batches[..10].to_vec());
    archive(&rt, &bucket, &source, CHAIN_ID, 10);
    *source.batches.lock().unwrap() = batches.clone();
    archive(&rt, &bucket, &source, CHAIN_ID, 300);
    let report = audit_of(&rt, &bucket, None);
    assert!(report.ok, "{:?}", report.errors);
    assert_eq!(
        (report.batches, report.checkpoint_signatures),
        (300, Some(300))
    );
    assert!(
        report.snapshots >= 300 / 7,
        "unsigned manifests: {report:?}"
    );
    let log = rt
        .block_on(read_log(&bucket, Some(&CHAIN_ID), &operator().public()))
        .unwrap();
    let read = rt
        .block_on(read_signature_bundles(&bucket, &log, 260))
        .unwrap();
    let expected: Vec<Signature> = (1..=260).map(|s| source.checkpoint_signature(s)).collect();
    assert_eq!(read, Some(expected));

    let key = signature_bundle_key(0, 256);
    let mut damaged = rt.block_on(bucket.get(&key)).unwrap().unwrap().0.to_vec();
    damaged[64 * 100] ^= 1;
    rt.block_on(bucket.delete(&key)).unwrap();
    rt.block_on(bucket.put_new(&key, damaged.into())).unwrap();
    let report = audit_of(&rt, &bucket, None);
    assert!(!report.ok);
    assert_eq!(report.errors[0].key, key, "{:?}", report.errors);
    assert!(
        report.errors[0].message.contains("size 101"),
        "{:?}",
        report.errors
    );
}

#[test]
fn racing_writers_of_one_ledger_agree() {
    let rt = runtime();
    let batches = ledger(120, 2);
    for (bucket, _dir) in stores("race") {
        let a = MemSource::new(batches.clone());
        let b = MemSource::new(batches.clone());
        let (pa, pb) = std::thread::scope(|s| {
            let ra = s.spawn(|| archive(&rt, &bucket, &a, CHAIN_ID, 120));
            let rb = s.spawn(|| archive(&rt, &bucket, &b, CHAIN_ID, 120));
            (ra.join().unwrap(), rb.join().unwrap())
        });
        assert!(!pa.fenced.load(Ordering::SeqCst) && !pb.fenced.load(Ordering::SeqCst));
        let report = audit_of(&rt, &bucket, None);
        assert!(report.ok, "{:?}", report.errors);
        assert_eq!(report.height, 120);
    }
}

#[test]
fn a_writer_with_another_history_is_fenced_and_overwrites_nothing() {
    let rt = runtime();
    let mine = ledger(20, 3);
    let fork = ledger(25, 4);
    for (bucket, _dir) in stores("fork") {
        archive(&rt, &bucket, &MemSource::new(mine.clone()), CHAIN_ID, 20);
        let before = rt.block_on(bucket.get(CHECKPOINT_KEY)).unwrap().unwrap().0;
        let progress = archive(&rt, &bucket, &MemSource::new(fork.clone()), CHAIN_ID, 25);
        assert!(
            progress.fenced.load(Ordering::SeqCst),
            "the fork must be fenced"
        );
        let after = rt.block_on(bucket.get(CHECKPOINT_KEY)).unwrap().unwrap().0;
        assert_eq!(before, after, "the checkpoint was not replaced");
        let report = audit_of(&rt, &bucket, None);
        assert!(report.ok, "{:?}", report.errors);
        assert_eq!(report.height, 20);

        // Another ledger's writer (another chain id) is refused by the marker.
        let other = archive(&rt, &bucket, &MemSource::new(mine.clone()), [0x22; 32], 20);
        assert!(other.fenced.load(Ordering::SeqCst));
    }
}

#[test]
fn the_audit_names_the_first_bad_object() {
    let rt = runtime();
    let batches = ledger(30, 5);
    let fork = ledger(30, 6);
    let (bucket, _dir) = stores("audit").swap_remove(0);
    let (other, _other_dir) = stores("audit-other").swap_remove(0);
    archive(&rt, &bucket, &MemSource::new(batches.clone()), CHAIN_ID, 30);
    archive(&rt, &other, &MemSource::new(fork), CHAIN_ID, 30);
    let foreign = rt.block_on(other.get(CHECKPOINT_KEY)).unwrap().unwrap().0;
    let report = audit_of(&rt, &bucket, Some(&foreign));
    assert!(!report.ok);
    assert_eq!(report.errors[0].key, CHECKPOINT_KEY, "{:?}", report.errors);
    assert!(report.errors[0].message.contains("append-only"));

    let key = batch_key(17);
    let mut damaged = rt.block_on(bucket.get(&key)).unwrap().unwrap().0.to_vec();
    let last = damaged.len() - 3;
    damaged[last] ^= 1;
    rt.block_on(bucket.delete(&key)).unwrap();
    rt.block_on(bucket.put_new(&key, damaged.into())).unwrap();
    let report = audit_of(&rt, &bucket, None);
    assert!(!report.ok);
    assert_eq!(
        (report.height, report.errors[0].key.as_str()),
        (16, key.as_str())
    );

    rt.block_on(bucket.delete(&key)).unwrap();
    let report = audit_of(&rt, &bucket, None);
    assert_eq!(report.errors[0].key, key);
    assert!(report.errors[0].message.contains("missing"));
}

#[test]
fn a_damaged_snapshot_is_named_by_the_audit() {
    let rt = runtime();
    let batches = ledger(40, 7);
    let (bucket, _dir) = stores("snapshot").swap_remove(0);
    archive(&rt, &bucket, &MemSource::new(batches), CHAIN_ID, 40);
    let manifests = rt
        .block_on(snapshots::manifests(&bucket, 40, &owner()))
        .unwrap();
    let victim = &manifests[2];
    let (hash, _) = victim.chunks[0];
    let key = tally_core::snapshot::chunk_key(&hash);
    let mut bytes = rt.block_on(bucket.get(&key)).unwrap().unwrap().0.to_vec();
    bytes[40] ^= 1; // the first row's balance
    rt.block_on(bucket.delete(&key)).unwrap();
    rt.block_on(bucket.put_new(&key, bytes.into())).unwrap();
    let report = audit_of(&rt, &bucket, None);
    assert!(!report.ok);
    assert_eq!(report.errors[0].key, key, "{:?}", report.errors);
    assert_eq!(
        report.height, victim.height,
        "the batches up to it verified"
    );
}

/// A manifest is the operator's word: one signed by another key (whoever can write to the
/// bucket) is refused, although its rows would be the right ones.
#[test]
fn a_manifest_not_signed_by_the_operator_is_refused() {
    let rt = runtime();
    let batches = ledger(20, 8);
    let (bucket, _dir) = stores("forged-manifest").swap_remove(0);
    archive(&rt, &bucket, &MemSource::new(batches), CHAIN_ID, 20);
    let manifests = rt
        .block_on(snapshots::manifests(&bucket, 20, &owner()))
        .unwrap();
    let victim = &manifests[1];
    let key = tally_core::snapshot::manifest_key(victim.height);
    let forged = victim.sign(&CHAIN_ID, &SigningKey::from_bytes(&[9; 32]));
    rt.block_on(bucket.delete(&key)).unwrap();
    rt.block_on(bucket.put_new(&key, forged.into())).unwrap();
    let err = rt
        .block_on(snapshots::manifests(&bucket, 20, &owner()))
        .unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
    let report = audit_of(&rt, &bucket, None);
    assert!(!report.ok);
    assert_eq!(report.errors[0].key, key, "{:?}", report.errors);
}

/// What the audit checks of each request (on the blocking pool): its signature, for this chain.
#[test]
fn the_audit_refuses_a_request_whose_signature_does_not_verify() {
    use tally_core::archive::{decode_batch, encode_batch};
    use tally_storage::archive_read::check_requests;
    let batches = ledger(3, 9);
    let (signed, body) = &batches[2];
    let batch = decode_batch(&encode_batch(signed, body)).unwrap();
    let chain = signed.header.chain_id;
    assert_eq!(check_requests(&batch, &chain), Ok(()));
    assert!(
        check_requests(&batch, &[0xee; 32]).is_err(),
        "another chain"
    );
    let last = batch.body.items.len() - 1;
    let mut forged = batch.clone();
    forged.body.entry_mut(last).request.signature[10] ^= 1;
    let err = check_requests(&forged, &chain).unwrap_err();
    assert_eq!(err, format!("item {last}: its signature does not verify"));
}
