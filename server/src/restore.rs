//! `tally-server restore`: a replica's ledger rebuilt from the archive alone.
//!
//! The archive is read verified (`tally_storage::archive_read`: the marker names this ledger
//! and operator key, the checkpoint carries the operator's signature, the headers hash to its
//! root and form the signed chain, each batch object holds its header and a body with that
//! Merkle root). Then, up to the target height `H`:
//! 1. From the newest snapshot at or below `H` (its manifest signed by the operator key, its
//!    chunks hashing to the manifest's names, differential ones chained on their bases), the
//!    batches up to its height `S` are imported as history without replay (headers, bodies,
//!    request records, each record matching the snapshot's), and the state is the snapshot's:
//!    it must give the state digest that header `S` carries (`LedgerImport`).
//! 2. Each batch after `S` is applied through the replica's own apply path (`prepare_apply` +
//!    `LedgerDb::apply`), which replays the balances, checks the state digest and signs the
//!    header again: the signature must come out byte for byte the archived one; the state at
//!    every later snapshot must be the snapshot's. A threshold operator's replica holds a share,
//!    not a key: it writes the replayed header with the archive's signature, which must be of
//!    that very header, and keeps the archive's checkpoint signature at its tip
//!    (`LedgerDb::restored_threshold`); its manifests are unsigned and trusted only as they
//!    check against the signed headers, as every manifest is.
//!
//! `--full-replay` skips step 1 and replays from height 1 (every snapshot is then checked).
//! The ledger holds every balance, header, body and request id the archive has, so that a
//! retry of a request confirmed before the loss returns its original confirmation.
//!
//! A restore below the archive's tip (`--height`) leaves `RESTORED-READ-ONLY` in the data
//! directory: that replica serves reads only, for good, and never signs a header the archive
//! already has. The marker is written before the restore starts, so a restore that fails
//! half-way leaves a replica that will not sign either.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use raft::eraftpb::Snapshot;
use tally_config::{ArchiveUrl, Config};
use tally_core::archive::batch_key;
use tally_core::archive::SIGNATURE_BUNDLE_PREFIX;
use tally_core::batch::prepare_apply_sealed;
use tally_core::crypto::header_hash;
use tally_core::key_chain::SigningKeys;
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::snapshot::{manifest_key, Delta, Manifest};
use tally_core::state::LedgerMeta;
use tally_storage::archive_read::{read_batches, read_log, read_signature_bundles, VerifiedLog};
use tally_storage::bucket::{Bucket, BucketSettings};
use tally_storage::snapshots::{manifests, read_rows, Owner};
use tally_storage::{LedgerDb, LedgerImport, RaftLogDb, StoreOptions};
use tally_wire::PublicKey;

use crate::archive::read_only_marker;
use crate::bootstrap::OperatorSecret;
use crate::dirs::{ledger_dir, raft_dir, store_options};

/// What to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The archive to read (default: the config's `[archive]`).
    pub from: Option<String>,
    /// Restore up to this height (default: the archive's tip).
    pub height: Option<u64>,
    /// Replay every batch from height 1 instead of starting from a snapshot.
    pub full_replay: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Height of the restored ledger.
    pub height: u64,
    /// The archive's height (its checkpoint's size).
    pub archive_height: u64,
    /// Height of the snapshot the restore started from (None: it replayed from height 1).
    pub snapshot: Option<u64>,
    /// Batches replayed after the snapshot (or from height 1).
    pub replayed: u64,
    pub seconds: f64,
    /// Whether the replica serves reads only (restored below the archive's tip).
    pub read_only: bool,
}

/// Restores `config`'s replica from the archive (see [`RestoreOptions`]).
///
/// The read-only marker is written first and removed only once the ledger is at the archive's
/// tip: a restore that fails or is killed half-way leaves a ledger below the tip that a server
/// would otherwise extend with headers the archive already has.
pub fn restore(config: &Config, options: &RestoreOptions) -> Result<Restored> {
    for dir in [ledger_dir(config), raft_dir(config)] {
        refuse_non_empty(&dir)?;
    }
    let settings = settings(config, options.from.as_deref())?;
    let bucket = Bucket::open(&settings)?;
    let operator = restore_keys(config)?;
    crate::bootstrap::create_private_dir(&config.node.data_dir)?;
    let marker = read_only_marker(&config.node.data_dir);
    write_marker(
        &marker,
        &format!("restore from {} in progress", bucket.url()),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut r = runtime.block_on(apply_archive(config, &bucket, &operator, options))?;
    r.seconds = started.elapsed().as_secs_f64();
    if r.read_only {
        let why = format!(
            "restored to height {} of the archive's {} from {}",
            r.height,
            r.archive_height,
            bucket.url()
        );
        write_marker(&marker, &why)?;
    } else {
        std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    }
    Ok(r)
}

/// The keys a restore signs replayed headers with (the configured key and the next one), and
/// the genesis key the archive's key chain starts from. A threshold operator's replica holds a
/// share, not a key: it signs nothing and keeps the archive's signatures (see [`replay`]).
fn restore_keys(config: &Config) -> Result<(SigningKeys, PublicKey)> {
    match crate::bootstrap::OperatorSecret::read(config)? {
        OperatorSecret::Whole(files) => Ok((files.signing_keys(), files.genesis)),
        OperatorSecret::Share(files) => {
            let genesis = files.genesis;
            Ok((SigningKeys::threshold(genesis, files.group_keys()), genesis))
        }
    }
}

fn write_marker(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, format!("{text}\n"))
        .and_then(|()| std::fs::File::open(path)?.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads the archive verified and builds the ledger up to the target height: from the newest
/// signed snapshot at or below it (history imported, state from the snapshot), then a replay of
/// the batches after it; or by replaying every batch.
async fn apply_archive(
    config: &Config,
    bucket: &Bucket,
    (operator, genesis): &(SigningKeys, PublicKey),
    options: &RestoreOptions,
) -> Result<Restored> {
    let chain_id = config.chain_id_bytes();
    let log = read_log(bucket, Some(&chain_id), genesis)
        .await
        .with_context(|| format!("the archive {} does not verify", bucket.url()))?;
    let size = log.checkpoint.size;
    let target = options.height.unwrap_or(size);
    if target > size {
        bail!("the archive holds {size} batches; cannot restore to height {target}");
    }
    let owner = Owner {
        chain_id,
        operators: log.keys.keys(),
        // A threshold operator's manifests are unsigned: a restore checks every row it uses
        // against the signed headers (`import_snapshot`, `check_snapshot`).
        unsigned: operator.is_threshold(),
    };
    let snaps = manifests(bucket, target, &owner).await?;
    let dir = ledger_dir(config);
    // The newest snapshot at or below the target, unless told to replay everything.
    let start = match options.full_replay {
        true => None,
        false => snaps.len().checked_sub(1),
    };
    let (mut store, later) = match start {
        Some(i) => {
            let store =
                import_snapshot(bucket, &log, &snaps[..=i], &dir, store_options(config)).await?;
            (store, &snaps[i + 1..])
        }
        None => {
            let store = LedgerDb::open(&dir, store_options(config))
                .with_context(|| format!("creating the ledger in {}", dir.display()))?;
            (store, &snaps[..])
        }
    };
    let from = store.meta()?.height;
    let height = replay(bucket, &log, &mut store, later, target, operator).await?;
    if operator.is_threshold() {
        restore_checkpoint_signatures(bucket, &log, &mut store).await?;
    }
    let meta = store.meta()?;
    store.shutdown()?;
    store.close()?;
    if height > 0 {
        write_raft_log(config, &meta)?;
    }
    Ok(Restored {
        height,
        archive_height: size,
        snapshot: start.map(|i| snaps[i].height),
        replayed: height - from,
        seconds: 0.0,
        read_only: height < size,
    })
}

/// Builds the ledger at the height of the last of `chain` (the manifests up to the one to
/// start from, in height order) without replaying: the batches up to it imported as history,
/// the state from the snapshot. Every request record the history gives must be the snapshot's,
/// and the state must give the signed header's digest (`LedgerImport::finish`).
async fn import_snapshot(
    bucket: &Bucket,
    log: &VerifiedLog,
    chain: &[Manifest],
    dir: &Path,
    opts: StoreOptions,
) -> Result<LedgerDb> {
    let m = chain.last().expect("a snapshot to start from");
    let key = manifest_key(m.height);
    let tip = &log.headers[m.height as usize - 1].header;
    if m.header_hash != header_hash(tip) || m.state_digest != tip.state_digest {
        bail!(
            "{key}: names another header than the log's at height {}",
            m.height
        );
    }
    let rotation = log
        .keys
        .rotations
        .iter()
        .rev()
        .find(|(h, _)| *h <= m.height)
        .copied();
    if m.operator.map(|r| (r.height, r.key)) != rotation {
        bail!("{key}: names another last key rotation than the archive's key chain");
    }
    let mut state = snapshot_state(bucket, chain).await?;
    let mut import = LedgerImport::create(dir, opts)
        .with_context(|| format!("creating the ledger in {}", dir.display()))?;
    let mut batches = std::pin::pin!(read_batches(bucket, log, 1, m.height));
    while let Some(item) = batches.next().await {
        let (h, batch) = item?;
        let encoded = batch.body.encode();
        for (signer, id, record) in import.batch(&batch.signed, &batch.body, &encoded)? {
            let at = state.requests.remove(&(signer, id));
            if at.map(|a| (a.height, a.index, a.request_hash))
                != Some((record.height, record.index, record.request_hash))
            {
                bail!(
                    "{}: request {id} of signer {} is not in {key} as applied here (or applied \
                     twice)",
                    batch_key(h),
                    hex::encode(signer)
                );
            }
        }
    }
    if let Some((signer, id)) = state.requests.keys().min() {
        bail!(
            "{key}: names request {id} of signer {}, which the history does not hold",
            hex::encode(signer)
        );
    }
    for (account, balance) in &state.accounts {
        import.account(account, *balance)?;
    }
    for ((owner, id), reserve) in &state.reserves {
        import.reserve(owner, *id, reserve)?;
    }
    import.operator(m.operator);
    import
        .finish(m.total_deposited, m.total_withdrawn, RESTORED_RAFT_INDEX)
        .with_context(|| format!("{key}: the snapshot does not restore"))
}

/// The rows at the last manifest of `chain`: the newest full snapshot at or below it, then
/// each differential one after it, each on the one before.
async fn snapshot_state(bucket: &Bucket, chain: &[Manifest]) -> Result<Delta> {
    let last = chain.last().expect("a snapshot");
    let Some(full) = chain.iter().rposition(Manifest::is_full) else {
        bail!("{}: no full snapshot below it", manifest_key(last.height));
    };
    let mut state = Delta::default();
    for (i, m) in chain.iter().enumerate().skip(full) {
        if i > full && m.base != chain[i - 1].height {
            bail!(
                "{}: applies on the snapshot at {}, not on the one before it ({})",
                manifest_key(m.height),
                m.base,
                chain[i - 1].height
            );
        }
        state.merge(read_rows(bucket, m).await?);
    }
    Ok(state)
}

/// Applies the archived batches after the store's height up to `target` through the replica's
/// apply path, checking the state at each snapshot of `later`. Returns the height reached.
async fn replay(
    bucket: &Bucket,
    log: &VerifiedLog,
    store: &mut LedgerDb,
    later: &[Manifest],
    target: u64,
    operator: &SigningKeys,
) -> Result<u64> {
    let mut meta = store.meta()?;
    let mut snaps: std::collections::VecDeque<&Manifest> = later.iter().collect();
    if target <= meta.height {
        return Ok(meta.height);
    }
    let mut batches = std::pin::pin!(read_batches(bucket, log, meta.height + 1, target));
    while let Some(item) = batches.next().await {
        let (h, batch) = item?;
        for (signer, id, _) in batch.body.records() {
            if store.request(&signer, id)?.is_some() {
                bail!(
                    "{}: request {} of signer {} was applied before: the archive applies a \
                     request twice",
                    batch_key(h),
                    id,
                    hex::encode(signer)
                );
            }
        }
        let encoded = batch.body.encode();
        let key = operator.header_key(&meta)?;
        let mut write = prepare_apply_sealed(&batch.body, encoded, &meta, store, key, None)
            .with_context(|| format!("{}: does not replay", batch_key(h)))?;
        write.meta.raft_index = RESTORED_RAFT_INDEX;
        // A threshold operator's replica cannot sign: it keeps the archived signature, which
        // `read_batches` verified, of the header it replayed (compared below).
        if operator.is_threshold() {
            write.signed_header.signature = batch.signed.signature;
        }
        if write.signed_header != batch.signed {
            bail!(
                "{}: the header signed again differs from the archived one",
                batch_key(h)
            );
        }
        store.apply(&write)?;
        meta = write.meta;
        if snaps.front().is_some_and(|m| m.height == h) {
            let m = snaps.pop_front().expect("front");
            check_snapshot(bucket, m, &meta, store).await?;
        }
    }
    Ok(meta.height)
}

/// Checkpoint signatures a restore writes to the ledger at once (256 KiB).
const RESTORED_SIGNATURES_PER_WRITE: usize = 4096;

/// A threshold operator's replica cannot sign a checkpoint again on its own: the signatures
/// of every checkpoint up to the restored height come from the archive's signature bundles,
/// each checked against the checkpoint this ledger computes from its headers (the very text
/// the archive's log gives, since the ledger's headers are the log's).
async fn restore_checkpoint_signatures(
    bucket: &Bucket,
    log: &VerifiedLog,
    store: &mut LedgerDb,
) -> Result<()> {
    let height = store.meta()?.height;
    let Some(signatures) = read_signature_bundles(bucket, log, height).await? else {
        bail!(
            "the archive holds no checkpoint signatures ({SIGNATURE_BUNDLE_PREFIX}...): a \
             threshold operator's replica cannot sign them again alone, and its archive must \
             hold them (PROTOCOL.md §15.10)"
        );
    };
    for (i, part) in signatures.chunks(RESTORED_SIGNATURES_PER_WRITE).enumerate() {
        let first = 1 + (i * RESTORED_SIGNATURES_PER_WRITE) as u64;
        store.restore_checkpoint_signatures(first, part)?;
    }
    store.restored_threshold()?;
    Ok(())
}

/// The raft log and ledger index of a restored replica: the restored state is "entry 1".
const RESTORED_RAFT_INDEX: u64 = 1;
const RESTORED_RAFT_TERM: u64 = 1;

/// The raft log of a restored replica: empty, after a snapshot point at index 1, term 1,
/// whose descriptor is the restored ledger's summary. Every replica restored to the same
/// height gets the same point, so their logs agree; a replica left empty is sent that
/// snapshot by a restored leader and installs its ledger, as one far behind does.
fn write_raft_log(config: &Config, meta: &LedgerMeta) -> Result<()> {
    use tally_core::replica::RaftLogStore;
    assert_eq!(
        meta.raft_index, RESTORED_RAFT_INDEX,
        "the ledger names the point"
    );
    let dir = raft_dir(config);
    let voters = config.initial_voters();
    let mut log = RaftLogDb::open(&dir, &voters)
        .with_context(|| format!("creating the raft log in {}", dir.display()))?;
    let mut snapshot = Snapshot::default();
    snapshot.data = meta.encode().to_vec().into();
    let m = snapshot.mut_metadata();
    m.index = RESTORED_RAFT_INDEX;
    m.term = RESTORED_RAFT_TERM;
    m.mut_conf_state().voters = voters;
    log.apply_snapshot(&snapshot)?;
    log.close()?;
    Ok(())
}

/// The restored state at a snapshot's height must be the snapshot's: digest, totals, and every
/// row (a full snapshot's account count too).
async fn check_snapshot(
    bucket: &Bucket,
    m: &Manifest,
    meta: &LedgerMeta,
    store: &mut LedgerDb,
) -> Result<()> {
    let key = manifest_key(m.height);
    if m.state_digest != meta.state_digest()
        || (m.total_deposited, m.total_withdrawn) != (meta.total_deposited, meta.total_withdrawn)
        || (m.is_full() && m.accounts != meta.account_count)
    {
        bail!("{key}: the snapshot's digest or totals differ from the restored state");
    }
    let rows = read_rows(bucket, m).await?;
    for (account, balance) in &rows.accounts {
        if store.account(account)? != Some(*balance) {
            bail!(
                "{key}: account {} differs from the restored state",
                hex::encode(account)
            );
        }
    }
    for ((signer, id), at) in &rows.requests {
        let found = store.request(signer, *id)?;
        let expected = RequestRecord {
            height: at.height,
            index: at.index,
            request_hash: at.request_hash,
        };
        if found != Some(expected) {
            bail!(
                "{key}: request {id} of {} differs from the restored state",
                hex::encode(signer)
            );
        }
    }
    Ok(())
}

/// The archive to read: `--from` with the config's endpoint settings, else `[archive]`.
fn settings(config: &Config, from: Option<&str>) -> Result<BucketSettings> {
    let Some(from) = from else {
        return BucketSettings::from_config(&config.archive)
            .context("no archive: set [archive] url in the config or pass --from URL");
    };
    let url = ArchiveUrl::parse(from).map_err(|e| anyhow::anyhow!("--from {from}: {e}"))?;
    Ok(BucketSettings {
        url,
        endpoint: config.archive.endpoint.clone(),
        region: config.archive.region.clone(),
        allow_http: config.archive.allow_http,
    })
}

/// A restore builds new state only: it never writes over a ledger or raft log.
fn refuse_non_empty(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty: restore builds a replica's data from nothing and never \
                     writes over one (move it away first)",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}
