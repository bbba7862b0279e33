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
            links: hex_links(links),
        }
    }

    /// The links, decoded (not verified).
    pub fn decode_links(&self) -> Result<Vec<KeyLink>> {
        decode_hex_links(&self.links)
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
    KeySchedule::follow(*genesis, &load_links(dir, genesis)?).map_err(verify_error)
}

/// The saved chain's links, checked from `genesis` (none when no chain is saved).
pub fn load_links(dir: &Path, genesis: &PublicKey) -> Result<Vec<KeyLink>> {
    let file = path(dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::Io { path: file, source }),
    };
    let in_file = |e: Error| Error::Verify(format!("{}: {e}", file.display()));
    let saved: KeyChainFile = serde_json::from_str(&text)
        .map_err(|e| Error::Verify(format!("{}: {e}", file.display())))?;
    saved.follow(genesis).map_err(in_file)?;
    saved.decode_links().map_err(in_file)
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

/// The links a proof file carries (its `key_chain` key, PROTOCOL.md §11) for headers at or
/// below `height`: every rotation below it, so that the chain reaches the key for `height`.
pub fn links_before(links: &[KeyLink], height: u64) -> &[KeyLink] {
    let reaching = links
        .iter()
        .take_while(|l| l.header.header.height < height)
        .count();
    &links[..reaching]
}

/// Each link's bytes as lowercase hex: a proof file's `key_chain`.
pub fn hex_links(links: &[KeyLink]) -> Vec<String> {
    links.iter().map(|l| hex::encode(l.encode())).collect()
}

/// Links from their lowercase hex (a proof file's `key_chain`, a saved chain's `links`),
/// decoded, not verified. Uppercase or malformed hex, or bytes that are not one link, fail.
pub fn decode_hex_links(hexes: &[String]) -> Result<Vec<KeyLink>> {
    if hexes.len() > tally_wire::KEY_LINKS_MAX {
        return Err(Error::Verify(format!(
            "key_chain: more than {} links",
            tally_wire::KEY_LINKS_MAX
        )));
    }
    let link = |(i, text): (usize, &String)| {
        let bad = |why: String| Error::Verify(format!("key_chain link {i}: {why}"));
        let bytes = hex::decode(text).map_err(|e| bad(e.to_string()))?;
        if hex::encode(&bytes) != *text {
            return Err(bad("not lowercase hex".into()));
        }
        KeyLink::decode(&bytes).map_err(|e| bad(e.to_string()))
    };
    hexes.iter().enumerate().map(link).collect()
}

/// The keys a proof file's headers are checked under (PROTOCOL.md §11). `trusted` is the
/// genesis key with the chain known beside it (a profile's saved chain, or none); `named` is
/// the file's `operator_public_key`, `key_chain` its links.
///
/// - A file that carries a chain: the chain, followed from the trusted genesis key; any link
///   that does not follow (changed, reordered, dropped) fails the file.
/// - A file without one: the trusted chain as it is.
/// - No trusted key: the file's own key alone (which proves only that the file is
///   consistent); its chain must decode but cannot be followed, for nothing names the
///   genesis key it starts from.
pub fn file_keys(
    trusted: Option<&KeySchedule>,
    named: &PublicKey,
    key_chain: &[String],
) -> Result<KeySchedule> {
    let links = decode_hex_links(key_chain)?;
    match trusted {
        None => Ok(KeySchedule::genesis(*named)),
        Some(known) if links.is_empty() => Ok(known.clone()),
        Some(known) => KeySchedule::follow(known.genesis, &links).map_err(|e| {
            Error::Verify(format!(
                "the file's key_chain does not follow from the genesis key {}: {e}",
                hex::encode(known.genesis)
            ))
        }),
    }
}

/// The key that signed a proof file's `header` under `keys`; a header that names a key the
/// chain does not reach is an error that says how to fetch the chain.
pub fn file_header_key(keys: &KeySchedule, header: &SignedHeader) -> Result<PublicKey> {
    if keys.is_behind(header) {
        return Err(Error::Verify(format!(
            "the header at height {} names operator key id {}, which the key chain does not \
             reach from {}: the file carries no key_chain that does, and the profile's saved \
             chain is behind (`tally key-chain` fetches it), or the header is not the operator's",
            header.header.height,
            hex::encode(header.header.operator_key_id),
            hex::encode(keys.genesis)
        )));
    }
    Ok(keys.key_for(header.header.height))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{build_request, public_key};
    use ed25519_dalek::SigningKey;
    use tally_core::batch::{prepare_apply, BatchWrite, Confirmed};
    use tally_core::crypto::OperatorKey;
    use tally_core::ports::{LedgerStore, MemStore};
    use tally_core::sequencer::{Sequencer, SequencerConfig, Submitted};
    use tally_wire::{BalanceProofReply, Confirmation, Op};

    /// A ledger whose key rotated twice (genesis seed 0x07, then 0x31 at height 1, then 0x32
    /// at height 2), with a third batch of a deposit and a transfer signed by the last key.
    pub(crate) struct Rotated {
        pub genesis: PublicKey,
        pub keys: Vec<OperatorKey>,
        pub links: Vec<KeyLink>,
        /// The third batch's confirmations (deposit, transfer).
        pub confirmations: Vec<Confirmation>,
        /// Alice's balance proved against the third batch's header.
        pub proof: BalanceProofReply,
        pub headers: Vec<SignedHeader>,
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    pub(crate) fn rotated() -> Rotated {
        let chain_id = [42; 32];
        let keys: Vec<OperatorKey> = [7, 0x31, 0x32].map(|s| OperatorKey::new(key(s))).into();
        let (deposit, alice, bob) = (key(8), key(9), key(10));
        let mut seq = Sequencer::new(
            SequencerConfig {
                chain_id,
                operator_key_id: keys[0].key_id(),
                batch_requests_max: 100,
                accounts_cached_max: 100,
                recent_heights_kept: 10,
            },
            tally_core::state::LedgerMeta::genesis(),
        );
        let mut store = MemStore::default();
        let mut writes: Vec<BatchWrite> = Vec::new();
        let mut batch = |requests: Vec<tally_wire::Request>, rotate: Option<PublicKey>, n: u64| {
            let time = 1_700_000_000_000 + n;
            seq.open_batch(time, 1, &mut store).unwrap();
            for r in requests {
                let outcome = seq.submit(r, 0, time, &mut store).unwrap();
                assert!(matches!(outcome, Submitted::Accepted { .. }), "{outcome:?}");
            }
            if let Some(new) = rotate {
                seq.rotate(new).unwrap();
            }
            let body = seq.seal(1).unwrap();
            let meta = store.meta().unwrap();
            let signer = &keys[(n as usize - 1).min(2)];
            let write = prepare_apply(&body, body.encode(), &meta, &mut store, signer).unwrap();
            store.apply(&write).unwrap();
            seq.applied(write.meta.height);
            (body, write)
        };
        let dep = |id, amount| {
            build_request(
                &deposit,
                chain_id,
                Op::Deposit,
                id,
                public_key(&alice),
                amount,
            )
        };
        let (_, w1) = batch(vec![dep(1, 100)], Some(keys[1].public()), 1);
        let (_, w2) = batch(vec![dep(2, 100)], Some(keys[2].public()), 2);
        let transfer = build_request(&alice, chain_id, Op::Transfer, 3, public_key(&bob), 30);
        let (body, w3) = batch(vec![dep(4, 5), transfer], None, 3);
        let confirmations = body
            .confirmations(&w3.signed_header)
            .into_iter()
            .map(|c| match c {
                Confirmed::Request(c) => *c,
                _ => unreachable!("requests only"),
            })
            .collect();
        let meta = store.meta().unwrap();
        let links = tally_core::key_chain::links(&mut store, &meta).unwrap();
        let map_proof = w3
            .meta
            .map
            .prove_account(&public_key(&alice))
            .expect("loaded");
        let proof = BalanceProofReply {
            header: w3.signed_header.clone(),
            map_root: w3.meta.map.root(),
            account_count: w3.meta.account_count,
            total_deposited: w3.meta.total_deposited,
            total_withdrawn: w3.meta.total_withdrawn,
            account: public_key(&alice),
            balance: Some(175),
            siblings: map_proof.siblings,
            neighbor: map_proof.neighbor,
        };
        writes.extend([w1, w2, w3]);
        Rotated {
            genesis: keys[0].public(),
            headers: writes.iter().map(|w| w.signed_header.clone()).collect(),
            keys,
            links,
            confirmations,
            proof,
        }
    }

    /// Checks a file's text that carries `key_chain` under `verify` (the trusted chain, or
    /// None): it verifies from the genesis key alone; it fails with any byte of any link
    /// changed, with its links reordered, with any link dropped, and without its chain (the
    /// genesis key alone does not reach the header's key); a profile's saved chain stands in
    /// for the file's.
    pub(crate) fn check_carried_chain(
        text: &str,
        fixture: &Rotated,
        verify: &dyn Fn(&str, Option<&KeySchedule>) -> Result<()>,
    ) {
        let genesis = KeySchedule::genesis(fixture.genesis);
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        let chain: Vec<String> = serde_json::from_value(json["key_chain"].clone()).unwrap();
        assert_eq!(
            chain,
            hex_links(&fixture.links),
            "the file carries the chain"
        );
        verify(text, Some(&genesis)).expect("verifies from the genesis key");
        let with = |links: Vec<String>| {
            let mut v = json.clone();
            if links.is_empty() {
                v.as_object_mut().unwrap().remove("key_chain");
            } else {
                v["key_chain"] = links.into();
            }
            v.to_string()
        };
        let refused = |text: String, what: &str| {
            let err = verify(&text, Some(&genesis)).expect_err(what);
            assert!(matches!(err, Error::Verify(_)), "{what}: {err}");
        };
        for (i, link) in fixture.links.iter().enumerate() {
            let bytes = link.encode();
            for at in 0..bytes.len() {
                let mut changed = bytes.clone();
                changed[at] ^= 0x01;
                let mut links = chain.clone();
                links[i] = hex::encode(changed);
                refused(with(links), &format!("link {i} byte {at} changed"));
            }
            let mut dropped = chain.clone();
            dropped.remove(i);
            refused(with(dropped), &format!("link {i} dropped"));
        }
        let mut reordered = chain.clone();
        reordered.reverse();
        refused(with(reordered), "links reordered");
        refused(with(Vec::new()), "no chain");
        let other = KeySchedule::genesis(fixture.keys[1].public());
        assert!(verify(text, Some(&other)).is_err(), "another genesis key");
        // Without a chain of its own, the profile's saved chain serves.
        let saved = KeySchedule::follow(fixture.genesis, &fixture.links).unwrap();
        verify(&with(Vec::new()), Some(&saved)).expect("the saved chain");
    }

    #[test]
    fn links_before_a_height_reach_its_key() {
        let r = rotated();
        let heights: Vec<u64> = r.links.iter().map(|l| l.header.header.height).collect();
        assert_eq!(heights, [1, 2]);
        assert!(links_before(&r.links, 1).is_empty());
        assert_eq!(links_before(&r.links, 2).len(), 1);
        assert_eq!(links_before(&r.links, 3).len(), 2);
        for h in &r.headers {
            let keys = KeySchedule::follow(r.genesis, links_before(&r.links, h.header.height));
            keys.unwrap().verify_header(h).unwrap();
        }
        let upper = hex_links(&r.links)[0].to_uppercase();
        assert!(decode_hex_links(&[upper]).is_err(), "uppercase hex");
    }
}
