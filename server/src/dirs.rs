//! Where a replica keeps its data, and how its ledger database is tuned: one place for the
//! paths the node, the snapshot installer and `restore` all open.

use std::path::PathBuf;

use tally_config::Config;
use tally_storage::StoreOptions;

/// The ledger's databases (state, and its archive of bodies and request records).
pub fn ledger_dir(config: &Config) -> PathBuf {
    config.node.data_dir.join("ledger")
}

/// The live ledger's LevelDB tuning, from `[cache]`.
pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        request_filter_bytes: config.cache.request_filter_bytes,
        ..StoreOptions::default()
    }
}

/// The raft log.
pub fn raft_dir(config: &Config) -> PathBuf {
    config.node.data_dir.join("raft")
}
