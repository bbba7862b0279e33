//! `tally-server init-cluster --dir D --new-group`: deals a threshold operator's next signing
//! group (FROST, issue 20) to the replicas of `D`, ahead of a rotation to it (`tally cluster
//! rotate-key`, PROTOCOL.md §4.14).
//!
//! A threshold group is dealt to the replicas of one membership. When the membership changes
//! (a replica added with `--add-node`, one removed, a share suspected lost), the operator deals
//! a new group to the members that will sign from then on, any majority of them, and rotates to
//! its key: the old group signs the rotation's batch, the new one every header after it. Each
//! member's share is written to `D/node<K>-<key id>.share` (mode 0600, a [`ShareFile`]) and its
//! config names it:
//! - as `operator.next_signing_key_share` on a replica that signs with a share already (it
//!   signs with the old group until the rotation, with the new one after);
//! - as `operator.signing_key_share` on a replica added with `--add-node`, which held none yet
//!   (it signs only for the new group).
//!
//! Every config also names the ledger's genesis key (`operator.genesis_public_key`), where the
//! key chain starts whichever share a replica is configured with later.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::rngs::OsRng;
use tally_config::Config;
use tally_core::threshold::{deal_to, SignerId};
use tally_wire::PublicKey;

use crate::bootstrap::{existing_nodes, replace_file, threshold_genesis_key, ShareFile};

/// What `--new-group` dealt and wrote.
pub struct NewGroup {
    pub group_key: PublicKey,
    /// The members, by node id, and how many of them sign.
    pub members: Vec<u64>,
    pub threshold: u16,
    /// Each member's share file and config.
    pub written: Vec<(PathBuf, PathBuf)>,
}

/// Deals a new group to `members` (default: every `node<K>.toml` in `dir`), any majority of
/// which sign, and names each member's share in its config. Everything is checked before
/// anything is written; share files are created, never replaced.
pub fn new_group(dir: &Path, members: Option<&[u64]>) -> Result<NewGroup> {
    let existing = existing_nodes(dir)?;
    let members: Vec<u64> = match members {
        Some(m) => m.to_vec(),
        None => existing.iter().map(|(id, _)| *id).collect(),
    };
    let configs = member_configs(dir, &existing, &members)?;
    let genesis = threshold_genesis_key(dir, &existing)?;
    let ids = members
        .iter()
        .map(|id| SignerId::try_from(*id).context("a node id beyond 65535"))
        .collect::<Result<Vec<_>>>()?;
    let threshold = (ids.len() / 2 + 1) as u16;
    let dealt = deal_to(&ids, threshold, &mut OsRng)?;
    let key_id = hex::encode(tally_core::crypto::key_id(&dealt.group_key));
    let mut planned = Vec::new();
    for ((id, mut config), signer) in configs.into_iter().zip(&ids) {
        let name = PathBuf::from(format!("node{id}-{key_id}.share"));
        let share_path = dir.join(&name);
        if share_path.exists() {
            bail!("{} exists", share_path.display());
        }
        let operator = config
            .operator
            .as_mut()
            .expect("checked: a threshold replica");
        let holds_share = operator
            .signing_key_share
            .as_ref()
            .is_some_and(|p| dir.join(p).exists());
        match holds_share {
            true => operator.next_signing_key_share = Some(name),
            false => operator.signing_key_share = Some(name),
        }
        operator
            .genesis_public_key
            .get_or_insert_with(|| hex::encode(genesis));
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("node{id}.toml would be invalid:\n{e}"))?;
        planned.push((id, *signer, share_path, config));
    }
    let mut written = Vec::new();
    for (id, signer, share_path, config) in planned {
        ShareFile::write(&share_path, &dealt, signer, threshold)?;
        let config_path = dir.join(format!("node{id}.toml"));
        let text = format!(
            "# tally replica {id}; its next threshold group was dealt by init-cluster \
             --new-group. Paths are relative to this file.\n{}",
            config.to_toml_string()
        );
        replace_file(&config_path, &text)?;
        written.push((share_path, config_path));
    }
    Ok(NewGroup {
        group_key: dealt.group_key,
        members,
        threshold,
        written,
    })
}

/// The configs of `members`, each a threshold replica of `dir` not already holding a next
/// group's share. At least two members (a single node keeps a plain key).
fn member_configs(
    dir: &Path,
    existing: &[(u64, Config)],
    members: &[u64],
) -> Result<Vec<(u64, Config)>> {
    let mut sorted = members.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != members.len() || members.len() < 2 {
        bail!("--new-group needs two or more distinct members, not {members:?}");
    }
    let mut out = Vec::new();
    for id in members {
        let Some((_, config)) = existing.iter().find(|(k, _)| k == id) else {
            bail!(
                "--new-group: {} has no node{id}.toml (add the replica with --add-node first)",
                dir.display()
            );
        };
        let operator = config.operator.as_ref().context("[operator] is required")?;
        if operator.signing_key_share.is_none() {
            bail!(
                "--new-group: node{id}.toml signs with a whole key (operator.signing_key): a \
                 whole key rotates to a whole key (operator.next_signing_key)"
            );
        }
        if let Some(next) = &operator.next_signing_key_share {
            bail!(
                "--new-group: node{id}.toml holds a next group's share already ({}): rotate to \
                 it first (tally cluster rotate-key), or remove it from the config if that \
                 group is abandoned",
                next.display()
            );
        }
        out.push((*id, config.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::tests::{error, loaded, threshold_cluster};
    use crate::bootstrap::{add_node, OperatorSecret};
    use crate::certs::CertOptions;

    #[test]
    fn a_new_member_and_the_old_ones_get_shares_of_a_new_group() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = threshold_cluster(&tmp);
        let genesis = ShareFile::read(&dir.join("node1.share")).unwrap().group_key;
        let added = add_node(&dir, 4, 7400, &CertOptions::default()).unwrap();
        assert!(added.threshold);
        let message = error(OperatorSecret::read(&loaded(&dir, 4)));
        assert!(
            message.contains("node4.share"),
            "no share before --new-group: {message}"
        );
        // Node 3 leaves: the new group is 1, 2 and 4, any two of whom sign.
        let group = new_group(&dir, Some(&[1, 2, 4])).unwrap();
        assert_eq!((group.members.clone(), group.threshold), (vec![1, 2, 4], 2));
        assert_ne!(group.group_key, genesis);
        for id in [1, 2, 4] {
            let OperatorSecret::Share(files) = OperatorSecret::read(&loaded(&dir, id)).unwrap()
            else {
                panic!("node {id} reads a whole key");
            };
            assert_eq!(files.genesis, genesis, "node {id}");
            let new = match id {
                4 => {
                    assert!(files.next.is_none());
                    &files.configured
                }
                _ => {
                    assert_eq!(files.configured.group_key, genesis);
                    files.next.as_ref().unwrap()
                }
            };
            assert_eq!((new.group_key, new.signer), (group.group_key, id as u16));
            assert_eq!((new.threshold, new.signers), (2, 3));
        }
        let OperatorSecret::Share(three) = OperatorSecret::read(&loaded(&dir, 3)).unwrap() else {
            panic!("node 3 reads a whole key");
        };
        assert!(
            three.next.is_none(),
            "node 3 is not a member of the new group"
        );
        let message = error(new_group(&dir, None));
        assert!(
            message.contains("holds a next group's share already"),
            "{message}"
        );
        let message = error(new_group(&dir, Some(&[3, 5])));
        assert!(message.contains("no node5.toml"), "{message}");
    }
}
