//! `tally consistency`, `tally verify` of a consistency proof file, and the check every command
//! makes of the headers it sees against the newest one the profile holds
//! (`tally_client::trust`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tally_client::consistency::{verify_consistency_json_under, ConsistencyFile};
use tally_client::trust::{proof, Checked, TrustStore};
use tally_client::{key_chain, ClusterClient, Error, Profile};
use tally_core::key_chain::KeySchedule;
use tally_core::tlog::Checkpoint;
use tally_wire::{PublicKey, SignedHeader};

use crate::Globals;

/// The longest a command waits for the check of the header it saw, after its own work is done.
const TRACK_BUDGET: Duration = Duration::from_secs(3);
/// The same with a `witness_quorum`: the leader sends its witnesses each new checkpoint within
/// 100 ms, and a command waits for the one that covers its header.
const WITNESSED_TRACK_BUDGET: Duration = Duration::from_secs(12);

/// The directory of the command's profile: its trust files and its key chain live there.
pub fn profile_dir(ctx: &Globals) -> PathBuf {
    let path = ctx.profile_path();
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The trust store of the command's profile: the profile's own directory, and its witnesses.
fn store(ctx: &Globals, profile: &Profile) -> Result<TrustStore> {
    Ok(TrustStore::new(&profile_dir(ctx)).with_witnesses(profile)?)
}

/// Checks `seen` (verified) against the profile's held header. A split view or a proof that
/// does not verify is the command's error; anything else (a replica that cannot answer in
/// time, a trust file that cannot be written) is a warning, and the check happens again from
/// the same held header next time. With a `witness_quorum` every failure is an error.
pub async fn track(
    ctx: &Globals,
    cluster: &ClusterClient,
    operator: &PublicKey,
    seen: &SignedHeader,
) -> Result<()> {
    let profile = ctx.profile()?;
    let left = ctx.total_timeout.saturating_sub(ctx.started.elapsed());
    let wanted = if profile.witness_quorum > 0 {
        WITNESSED_TRACK_BUDGET
    } else {
        TRACK_BUDGET
    };
    let budget = left.saturating_sub(crate::BACKSTOP_MARGIN * 2).min(wanted);
    let store = store(ctx, &profile)?;
    let checked = tokio::time::timeout(budget, async {
        let keys = key_chain::for_header(cluster, &profile_dir(ctx), operator, seen).await?;
        store.check(cluster, &keys, seen).await
    })
    .await;
    match checked {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e @ (Error::SplitView { .. } | Error::Verify(_)))) => {
            Err(anyhow::Error::from(e).context("checking the header log against the held header"))
        }
        Ok(Err(e)) if profile.witness_quorum > 0 => {
            Err(anyhow::Error::from(e).context("checking the witnesses' cosignatures"))
        }
        Ok(Err(e)) => {
            eprintln!("warning: the header log was not checked this time: {e}");
            Ok(())
        }
        Err(_) if profile.witness_quorum > 0 => Err(anyhow::Error::from(Error::Verify(
            "the witnesses' cosignatures were not had in time (witness_quorum)".into(),
        ))),
        Err(_) => {
            eprintln!("warning: the header log was not checked this time: no answer in time");
            Ok(())
        }
    }
}

/// `tally consistency --from H1 --to H2 [--out FILE]`.
pub async fn prove(ctx: &Globals, from: u64, to: u64, out: Option<&Path>) -> Result<ExitCode> {
    if from == 0 || from > to {
        bail!("--from must be at least 1 and at most --to (got {from} and {to})");
    }
    let profile: Profile = ctx.profile()?;
    let operator = profile.operator_key()?;
    let chain_id = profile.chain_id_bytes()?;
    let cluster = ctx.cluster(&profile)?;
    let keys = key_chain::refresh(&cluster, &profile_dir(ctx), &operator).await?;
    let reply = proof(&cluster, &keys, &chain_id, (from, to))
        .await
        .with_context(|| format!("consistency from {from} to {to}"))?;
    let (a, b) = checkpoints(&reply, &keys, &chain_id)?;
    // The file carries the whole chain: a checkpoint may be signed by any key after its size's.
    let links = key_chain::load_links(&profile_dir(ctx), &operator)?;
    let signer = keys.key_for(reply.to.header.header.height);
    let file = ConsistencyFile::new(&reply, (&a, &b), &signer).with_key_chain(&links);
    let text = file.to_json_pretty();
    if let Some(path) = out {
        tally_client::confirmation::write_atomically(path, &text)?;
    }
    let checked = store(ctx, &profile)?
        .check(&cluster, &keys, &reply.to.header)
        .await?;
    if ctx.json {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("the header log at {from} is a prefix of the log at {to}");
    println!("  root at {from}: {}", file.from_root);
    println!("  root at {to}: {}", file.to_root);
    println!(
        "  {} proof hashes; both checkpoints signed by the operator (the profile's key chain)",
        file.proof.len()
    );
    if let Checked::Extended { from } = checked {
        println!("  the profile's held header moved from height {from} to {to}");
    }
    if let Some(path) = out {
        println!("  proof written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn checkpoints(
    reply: &tally_wire::ConsistencyReply,
    keys: &KeySchedule,
    chain_id: &tally_wire::Hash,
) -> Result<(Checkpoint, Checkpoint)> {
    Ok(tally_core::header_log::verify_consistency_reply_under(
        reply, keys, chain_id,
    )?)
}

/// `tally verify` of a consistency proof file.
pub fn verify(
    ctx: &Globals,
    file: &Path,
    text: &str,
    trusted: Option<&KeySchedule>,
    source: &str,
) -> Result<ExitCode> {
    let (_, _, a, b) = verify_consistency_json_under(text, trusted)
        .with_context(|| format!("{} does not verify", file.display()))?;
    if ctx.json {
        let body = json!({
            "valid": true,
            "file": file.display().to_string(),
            "kind": "consistency",
            "from_size": a.size,
            "to_size": b.size,
            "from_root": hex::encode(a.root),
            "to_root": hex::encode(b.root),
            "operator_key_source": source,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: valid", file.display());
    println!(
        "  the header log of size {} is a prefix of the log of size {}",
        a.size, b.size
    );
    println!("  operator key from {source}");
    Ok(ExitCode::SUCCESS)
}
