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

use crate::bootstrap::{existing_nodes, replace_file, ShareFile};

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
    let genesis = genesis_key(dir, &existing)?;
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

/// The ledger's genesis key: the one the configs name, or the group key of the lowest node's
/// share (a cluster that never rotated).
pub(crate) fn genesis_key(dir: &Path, existing: &[(u64, Config)]) -> Result<PublicKey> {
    if let Some(key) = existing
        .iter()
        .find_map(|(_, c)| c.genesis_public_key_bytes())
    {
        return Ok(key);
    }
    let held = existing.iter().find_map(|(_, c)| {
        let path = c.operator.as_ref()?.signing_key_share.as_ref()?;
        Some(dir.join(path)).filter(|p| p.exists())
    });
    let path = held.context("--new-group: no replica of this directory holds a share yet")?;
    Ok(ShareFile::read(&path)?.group_key)
}

/// The `[operator]` of a replica `--add-node` adds to a threshold operator's directory: it
/// holds no share until `--new-group` deals one to it (`node<id>.share` stands for it until
/// then), and names the ledger's genesis key.
pub(crate) fn added_member_operator(
    dir: &Path,
    existing: &[(u64, Config)],
    id: u64,
    config: &mut Config,
) -> Result<()> {
    let genesis = genesis_key(dir, existing)?;
    let operator = config.operator.as_mut().context("[operator] is required")?;
    operator.signing_key_share = Some(PathBuf::from(format!("node{id}.share")));
    operator.next_signing_key_share = None;
    operator.genesis_public_key = Some(hex::encode(genesis));
    Ok(())
}
