//! `tally-server restore`: a replica's ledger rebuilt from the archive alone.
//!
//! The archive is read verified (`tally_storage::archive_read`: the marker names this ledger
//! and operator key, the checkpoint carries the operator's signature, the headers hash to its
//! root and form the signed chain, each batch object holds its header and a body with that
//! Merkle root), and each batch is then applied through the replica's own apply path
//! (`prepare_apply` + `LedgerDb::apply`), which replays the balances, checks the state digest
//! and signs the header again: the signature must come out byte for byte the archived one.
//! The ledger then holds every balance, header, body and request id the archive has, so that a
//! retry of a request confirmed before the loss returns its original confirmation.
//!
//! A restore below the archive's tip (`--height`) leaves `RESTORED-READ-ONLY` in the data
//! directory: that replica serves reads only, for good, and never signs a header the archive
//! already has.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use tally_config::{ArchiveUrl, Config};
use tally_core::archive::batch_key;
use tally_core::batch::prepare_apply;
use tally_core::crypto::OperatorKey;
use tally_core::ports::{LedgerRead, LedgerStore, RequestRecord};
use tally_core::snapshot::{manifest_key, Manifest};
use tally_core::state::LedgerMeta;
use tally_storage::archive_read::{read_batches, read_log};
use tally_storage::bucket::{Bucket, BucketSettings};
use tally_storage::snapshots::{manifests, read_rows};
use tally_storage::LedgerDb;

use crate::archive::read_only_marker;
use crate::bootstrap::read_signing_key;
use crate::node::{ledger_dir, raft_dir, store_options};

/// What a restore did.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Height of the restored ledger.
    pub height: u64,
    /// The archive's height (its checkpoint's size).
    pub archive_height: u64,
    pub seconds: f64,
    /// Whether the replica serves reads only (restored below the archive's tip).
    pub read_only: bool,
}

/// Restores `config`'s replica from the archive at `from` (default: `[archive]`), up to
/// `height` (default: the archive's tip).
pub fn restore(config: &Config, from: Option<&str>, height: Option<u64>) -> Result<Restored> {
    for dir in [ledger_dir(config), raft_dir(config)] {
        refuse_non_empty(&dir)?;
    }
    // A full restore replaces a forensic copy: the marker of an earlier one goes.
    let marker = read_only_marker(&config.node.data_dir);
    if marker.exists() {
        std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    }
    let settings = settings(config, from)?;
    let bucket = Bucket::open(&settings)?;
    let op_cfg = config.operator.as_ref().context("[operator] is required")?;
    let operator = OperatorKey::new(read_signing_key(&op_cfg.signing_key)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let (restored, archive_height) =
        runtime.block_on(apply_archive(config, &bucket, &operator, height))?;
    let read_only = restored < archive_height;
    if read_only {
        let marker = read_only_marker(&config.node.data_dir);
        std::fs::write(
            &marker,
            format!(
                "restored to height {restored} of the archive's {archive_height} from {}\n",
                bucket.url()
            ),
        )
        .with_context(|| format!("writing {}", marker.display()))?;
    }
    Ok(Restored {
        height: restored,
        archive_height,
        seconds: started.elapsed().as_secs_f64(),
        read_only,
    })
}

/// Reads the archive verified and applies its batches `1..=height` to a new ledger. Returns
/// (restored height, archive height).
async fn apply_archive(
    config: &Config,
    bucket: &Bucket,
    operator: &OperatorKey,
    height: Option<u64>,
) -> Result<(u64, u64)> {
    let chain_id = config.chain_id_bytes();
    let log = read_log(bucket, Some(&chain_id), &operator.public())
        .await
        .with_context(|| format!("the archive {} does not verify", bucket.url()))?;
    let size = log.checkpoint.size;
    let target = height.unwrap_or(size);
    if target > size {
        bail!("the archive holds {size} batches; cannot restore to height {target}");
    }
    let dir = ledger_dir(config);
    crate::bootstrap::create_private_dir(&config.node.data_dir)?;
    let mut store = LedgerDb::open(&dir, store_options(config))
        .with_context(|| format!("creating the ledger in {}", dir.display()))?;
    let mut meta = store.meta()?;
    assert_eq!(meta.height, 0, "restore starts from an empty ledger");
    let mut snaps: std::collections::VecDeque<Manifest> = manifests(bucket, target).await?.into();
    if target > 0 {
        let mut batches = std::pin::pin!(read_batches(bucket, &log, 1, target));
        while let Some(item) = batches.next().await {
            let (h, batch) = item?;
            for e in &batch.body.entries {
                if store.request(&e.request.signer, e.request.id)?.is_some() {
                    bail!(
                        "{}: request {} of signer {} was applied before: the archive applies a \
                         request twice",
                        batch_key(h),
                        e.request.id,
                        hex::encode(e.request.signer)
                    );
                }
            }
            let encoded = batch.body.encode();
            let write = prepare_apply(&batch.body, encoded, &meta, &mut store, operator)
                .with_context(|| format!("{}: does not replay", batch_key(h)))?;
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
                check_snapshot(bucket, &m, &meta, &mut store).await?;
            }
        }
    }
    store.shutdown()?;
    store.close()?;
    Ok((meta.height, size))
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
