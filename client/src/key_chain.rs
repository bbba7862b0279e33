//! The operator's key chain as a client keeps it (PROTOCOL.md §4.14): the links that lead from
//! the profile's genesis key to the key that signs today, saved in the profile's directory as
//! `key-chain.json` and checked again whenever it is read.
//!
//! A header that names a key the saved chain does not reach (a rotation since) sends the
//! client to the cluster for the chain; the new links must extend the saved ones from the
//! genesis key, like any chain. Nothing in the file is trusted: a file that does not follow
//! from the profile's key is an error, not a chain.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tally_core::key_chain::KeySchedule;
use tally_wire::{KeyLink, PublicKey, SignedHeader};

use crate::{ClusterClient, Error, Result};

/// `format` of the saved chain.
pub const KEY_CHAIN_FORMAT: &str = "tally-key-chain-v1";
/// The file in the profile's directory.
pub const FILE_NAME: &str = "key-chain.json";

/// The saved chain: the genesis key and each link's bytes (PROTOCOL.md §4.14), hex.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyChainFile {
    pub format: String,
    pub genesis: String,
    pub links: Vec<String>,
}

impl KeyChainFile {
    pub fn new(genesis: &PublicKey, links: &[KeyLink]) -> KeyChainFile {
        KeyChainFile {
            format: KEY_CHAIN_FORMAT.into(),
            genesis: hex::encode(genesis),
            links: links.iter().map(|l| hex::encode(l.encode())).collect(),
        }
    }

    /// The links, decoded (not verified).
    pub fn decode_links(&self) -> Result<Vec<KeyLink>> {
        self.links
            .iter()
            .map(|h| {
                let bytes = hex::decode(h).map_err(|e| Error::Verify(format!("a link: {e}")))?;
                KeyLink::decode(&bytes).map_err(|e| Error::Verify(format!("a link: {e}")))
            })
            .collect()
    }

    /// The schedule the links lead to from `genesis` (the profile's key), all checked.
    pub fn follow(&self, genesis: &PublicKey) -> Result<KeySchedule> {
        if self.format != KEY_CHAIN_FORMAT {
            return Err(Error::Verify(format!("not a {KEY_CHAIN_FORMAT} file")));
        }
        if self.genesis != hex::encode(genesis) {
            return Err(Error::Verify(
                "the key chain starts from another genesis key than the profile's".into(),
            ));
        }
        KeySchedule::follow(*genesis, &self.decode_links()?).map_err(verify_error)
    }
}

fn verify_error(e: tally_core::Error) -> Error {
    Error::Verify(e.to_string())
}

/// Where the chain of the profile in `dir` is saved.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The saved chain's schedule (the genesis key alone when none is saved).
pub fn load(dir: &Path, genesis: &PublicKey) -> Result<KeySchedule> {
    let file = path(dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(KeySchedule::genesis(*genesis))
        }
        Err(source) => return Err(Error::Io { path: file, source }),
    };
    let saved: KeyChainFile = serde_json::from_str(&text)
        .map_err(|e| Error::Verify(format!("{}: {e}", file.display())))?;
    saved
        .follow(genesis)
        .map_err(|e| Error::Verify(format!("{}: {e}", file.display())))
}

/// Asks the cluster for the chain, follows it from `genesis`, and saves it; it must extend
/// what was saved (a chain that drops a known rotation is an error).
pub async fn refresh(
    cluster: &ClusterClient,
    dir: &Path,
    genesis: &PublicKey,
) -> Result<KeySchedule> {
    let known = load(dir, genesis)?;
    let links = cluster.key_chain().await?.links;
    let schedule = KeySchedule::follow(*genesis, &links).map_err(verify_error)?;
    if schedule.rotations.get(..known.rotations.len()) != Some(&known.rotations[..]) {
        return Err(Error::Verify(
            "the cluster's key chain does not extend the one saved in the profile".into(),
        ));
    }
    let text = serde_json::to_string_pretty(&KeyChainFile::new(genesis, &links))
        .expect("a key chain serializes");
    let file = path(dir);
    std::fs::write(&file, text + "\n").map_err(|source| Error::Io { path: file, source })?;
    Ok(schedule)
}

/// The schedule to check `header` under: the saved one, refreshed from the cluster when the
/// header names a key it does not reach.
pub async fn for_header(
    cluster: &ClusterClient,
    dir: &Path,
    genesis: &PublicKey,
    header: &SignedHeader,
) -> Result<KeySchedule> {
    let schedule = load(dir, genesis)?;
    if schedule.is_behind(header) {
        return refresh(cluster, dir, genesis).await;
    }
    Ok(schedule)
}
