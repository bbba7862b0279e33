//! Installing a raft snapshot: the ledger state is fetched from a peer and swapped in atomically.
//!
//! (Being built: until the transfer lands, a replica that needs a snapshot stops with a clear
//! error instead of diverging.)

use anyhow::Result;
use tally_config::Config;
use tally_storage::LedgerDb;
use tally_wire::PublicKey;

use crate::pipeline::SnapshotInstaller;

pub struct PeerSnapshotInstaller {
    _operator: PublicKey,
}

impl PeerSnapshotInstaller {
    pub fn new(_config: &Config, operator: PublicKey) -> Result<PeerSnapshotInstaller> {
        Ok(PeerSnapshotInstaller {
            _operator: operator,
        })
    }
}

impl SnapshotInstaller<LedgerDb> for PeerSnapshotInstaller {
    fn install(
        &mut self,
        _store: &mut Option<LedgerDb>,
        index: u64,
        _descriptor: &[u8],
    ) -> tally_core::Result<()> {
        Err(tally_core::Error::Storage(format!(
            "this replica needs the ledger state at raft index {index} from a peer, and snapshot transfer is not built yet"
        )))
    }
}
