//! Ledger snapshots between replicas.
//!
//! A raft snapshot carries only a descriptor: the [`LedgerMeta`] of the state at the leader's
//! compaction point. The replica that receives it downloads a whole ledger dump from a peer (the
//! leader first, then the others) over the mutually authenticated peer transport, in chunks of
//! at most `raft.snapshot_chunk_bytes`, into a staged directory; `LedgerInstaller::finish`
//! verifies it (checksum, hash chain, operator signature on the tip, the account sum behind the
//! state digest, conservation) before it is swapped in with renames that a crash cannot tear.
//! The dump may be newer than the descriptor; committed entries it already contains are then
//! skipped by height when raft delivers them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use rustls::ClientConfig;
use tally_config::Config;
use tally_core::crypto::header_hash;
use tally_core::ports::LedgerStore;
use tally_core::state::LedgerMeta;
use tally_storage::{
    install_ledger_dir, staged_ledger_dir, LedgerDb, LedgerInstaller, StoreOptions,
};
use tally_wire::PublicKey;

use crate::peer::fetch_snapshot;
use crate::pipeline::SnapshotTransfer;
use crate::view::ClusterView;

pub struct PeerSnapshotTransfer {
    node_id: u64,
    chain_id: [u8; 32],
    operator: PublicKey,
    live: PathBuf,
    /// How the live ledger is opened after an install.
    store: StoreOptions,
    chunk_bytes_max: u32,
    client: Arc<ClientConfig>,
    view: Arc<ClusterView>,
    runtime: tokio::runtime::Handle,
}

impl PeerSnapshotTransfer {
    pub fn new(
        config: &Config,
        operator: PublicKey,
        client: Arc<ClientConfig>,
        view: Arc<ClusterView>,
        runtime: tokio::runtime::Handle,
    ) -> PeerSnapshotTransfer {
        PeerSnapshotTransfer {
            node_id: config.node.id,
            chain_id: config.chain_id_bytes(),
            operator,
            live: crate::dirs::ledger_dir(config),
            store: crate::dirs::store_options(config),
            chunk_bytes_max: config.raft.snapshot_chunk_bytes,
            client,
            view,
            runtime,
        }
    }

    /// Downloads and verifies a peer's ledger into the staged directory.
    fn download(&self, peer: u64, addr: SocketAddr) -> Result<LedgerMeta> {
        let staged = staged_ledger_dir(&self.live);
        if staged.exists() {
            std::fs::remove_dir_all(&staged)?;
        }
        let mut installer = LedgerInstaller::create(&staged, StoreOptions::default().staged())?;
        let bytes = self.runtime.block_on(fetch_snapshot(
            addr,
            peer,
            self.node_id,
            self.chain_id,
            self.chunk_bytes_max,
            self.client.clone(),
            |chunk| installer.push(chunk).map_err(|e| anyhow!("{e}")),
        ))?;
        let meta = installer.finish(&self.operator)?;
        tracing::info!(
            peer,
            bytes,
            height = meta.height,
            "downloaded a ledger snapshot"
        );
        Ok(meta)
    }
}

impl PeerSnapshotTransfer {
    /// Checks, before it replaces anything, that the staged ledger continues the chain the
    /// descriptor names and that its tip header commits to its own state.
    fn check_staged(&self, want: &LedgerMeta, meta: &LedgerMeta) -> Result<()> {
        // Only read to check it: no request filter to build.
        let checking = StoreOptions {
            request_filter_bytes: 0,
            ..StoreOptions::default().staged()
        };
        let mut db = LedgerDb::open(&staged_ledger_dir(&self.live), checking)?;
        let result = (|| {
            if meta.height > 0 {
                // Applied headers, signed or not (a threshold operator's newest wait for theirs).
                let tip = db
                    .applied_header(meta.height)?
                    .ok_or_else(|| anyhow!("no tip header"))?;
                if tip.state_digest != meta.state_digest() {
                    return Err(anyhow!(
                        "the tip header's state digest is not the staged state's"
                    ));
                }
            }
            if want.height > 0 {
                let at = db
                    .applied_header(want.height)?
                    .ok_or_else(|| anyhow!("no header at the snapshot point"))?;
                if header_hash(&at) != want.last_header_hash {
                    return Err(anyhow!(
                        "the staged chain forks from the snapshot point at height {}",
                        want.height
                    ));
                }
            }
            Ok(())
        })();
        db.close()?;
        result
    }
}

/// Whether `store` already holds the state `want` describes (same header at that height).
fn already_has(store: &mut LedgerDb, want: &LedgerMeta) -> tally_core::Result<bool> {
    let have = store.meta()?;
    if have.height < want.height {
        return Ok(false);
    }
    if want.height == 0 {
        return Ok(true);
    }
    Ok(store
        .applied_header(want.height)?
        .is_some_and(|h| header_hash(&h) == want.last_header_hash))
}

impl SnapshotTransfer<LedgerDb> for PeerSnapshotTransfer {
    fn install(
        &mut self,
        store: &mut Option<LedgerDb>,
        index: u64,
        descriptor: &[u8],
    ) -> tally_core::Result<()> {
        let (want, _) = tally_core::engine::members::decode_descriptor(descriptor)?;
        let db = store.as_mut().expect("the store is open before an install");
        if already_has(db, &want)? {
            tracing::info!(
                index,
                height = want.height,
                "snapshot already applied locally"
            );
            return Ok(());
        }
        // The leader first: it sent the snapshot, so it has at least that state.
        let leader = self
            .view
            .leader_id
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut order = self.view.peers();
        order.sort_by_key(|(id, _)| *id != leader);
        let mut last_error = String::from("no peers");
        for attempt in 0..3 {
            for &(peer, addr) in &order {
                let fetched = self.download(peer, addr).and_then(|meta| {
                    if meta.height < want.height {
                        anyhow::bail!("it is at height {}, behind {}", meta.height, want.height);
                    }
                    self.check_staged(&want, &meta)?;
                    Ok(meta)
                });
                match fetched {
                    Ok(meta) => {
                        let old = store.take().expect("store");
                        old.close()?;
                        install_ledger_dir(&self.live, &staged_ledger_dir(&self.live))?;
                        *store = Some(LedgerDb::open(&self.live, self.store.clone())?);
                        tracing::info!(index, height = meta.height, "installed a ledger snapshot");
                        return Ok(());
                    }
                    Err(e) => last_error = format!("peer {peer}: {e:#}"),
                }
                tracing::warn!(peer, attempt, "snapshot download failed: {last_error}");
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        Err(tally_core::Error::io(
            "fetching a ledger snapshot",
            last_error,
        ))
    }

    fn dump(
        &mut self,
        store: &mut LedgerDb,
        chunk_bytes_max: usize,
        out: &mut dyn FnMut(Vec<u8>) -> tally_core::Result<()>,
    ) -> tally_core::Result<LedgerMeta> {
        store.dump(chunk_bytes_max, out)
    }
}
