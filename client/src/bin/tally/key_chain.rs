//! `tally cluster rotate-key` and `tally key-chain`: the operator's key rotations
//! (PROTOCOL.md §4.14), checked from the profile's genesis key and saved beside the profile.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use tally_client::{key_chain, ClusterClient, Profile};
use tally_core::crypto::key_id;
use tally_core::key_chain::KeySchedule;
use tally_wire::{KeyLink, PublicKey, SignedHeader};

use crate::consistency::profile_dir;
use crate::Globals;

/// `tally cluster rotate-key --new-public-key PK`: asks the leader to rotate, checks the link
/// it answers with against the saved chain, then fetches and saves the whole chain.
pub async fn rotate(ctx: &Globals, new_key: PublicKey) -> Result<ExitCode> {
    let profile: Profile = ctx.profile()?;
    let admin = profile.load_admin_key()?;
    let genesis = profile.operator_key()?;
    let cluster = ctx.cluster(&profile)?;
    let link = cluster
        .rotate_key(profile.chain_id_bytes()?, &admin, new_key)
        .await
        .context(
            "cluster rotate-key (if the outcome is unknown, `tally key-chain` tells whether \
             the rotation took effect)",
        )?;
    let schedule = key_chain::refresh(&cluster, &profile_dir(ctx), &genesis).await?;
    let height = link.header.header.height;
    if !schedule.rotations.contains(&(height, new_key)) {
        anyhow::bail!("the cluster's key chain does not hold the rotation it answered with");
    }
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "rotated": true,
                "height": height,
                "number": link.number,
                "new_key": hex::encode(new_key),
                "key_id": hex::encode(key_id(&new_key)),
            }))?
        );
    } else {
        println!(
            "rotation {} at height {height}: {} signs every header after it",
            link.number,
            hex::encode(new_key)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally key-chain`: the chain from the cluster, checked and saved.
pub async fn show(ctx: &Globals) -> Result<ExitCode> {
    let profile: Profile = ctx.profile()?;
    let genesis = profile.operator_key()?;
    let cluster = ctx.cluster(&profile)?;
    let schedule = key_chain::refresh(&cluster, &profile_dir(ctx), &genesis).await?;
    if ctx.json {
        let rotations: Vec<_> = schedule
            .rotations
            .iter()
            .map(|(h, k)| json!({"height": h, "key": hex::encode(k)}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "genesis": hex::encode(genesis),
                "current": hex::encode(schedule.current()),
                "rotations": rotations,
            }))?
        );
    } else {
        println!("genesis key {}", hex::encode(genesis));
        for (i, (h, k)) in schedule.rotations.iter().enumerate() {
            println!("rotation {} at height {h}: {}", i + 1, hex::encode(k));
        }
        println!("current key {}", hex::encode(schedule.current()));
    }
    Ok(ExitCode::SUCCESS)
}

/// The key that signed `header`, from the profile's key chain, fetched again from `cluster`
/// when the header names a key the saved chain does not reach; and the links a file of the
/// header carries (`key_chain`, PROTOCOL.md §11: every rotation below its height).
pub async fn header_key(
    ctx: &Globals,
    cluster: &ClusterClient,
    genesis: &PublicKey,
    header: &SignedHeader,
) -> Result<(PublicKey, Vec<KeyLink>)> {
    let dir = profile_dir(ctx);
    let schedule = key_chain::for_header(cluster, &dir, genesis, header).await?;
    let height = header.header.height;
    let links = key_chain::load_links(&dir, genesis)?;
    Ok((
        schedule.key_for(height),
        key_chain::links_before(&links, height).to_vec(),
    ))
}

/// The profile's key chain, fetched again from `cluster` when one of `headers` names a key
/// the saved chain does not reach: what a command checks a run of headers under.
pub async fn reaching(
    ctx: &Globals,
    cluster: &ClusterClient,
    genesis: &PublicKey,
    headers: &[SignedHeader],
) -> Result<KeySchedule> {
    let dir = profile_dir(ctx);
    let saved = key_chain::load(&dir, genesis)?;
    if headers.iter().any(|h| saved.is_behind(h)) {
        return Ok(key_chain::refresh(cluster, &dir, genesis).await?);
    }
    Ok(saved)
}

/// What `tally verify` trusts with a profile: its genesis key and the chain saved beside it
/// (used for files that carry no `key_chain`).
pub fn saved(ctx: &Globals, genesis: &PublicKey) -> Result<KeySchedule> {
    Ok(key_chain::load(&profile_dir(ctx), genesis)?)
}
