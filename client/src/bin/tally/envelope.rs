//! `tally envelope` and the envelope branch of `tally verify`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use serde_json::json;
use tally_client::envelope::{
    build_envelope, parse_operations, verify_envelope_json_under, verify_operation_json_under,
    write_envelope_file, EnvelopeFile, OperationFile,
};
use tally_client::{to_hex, Profile};
use tally_core::engine::apply::Found;
use tally_core::key_chain::KeySchedule;
use tally_core::verify::verify_envelope_confirmation;
use tally_core::verify::{
    verify_confirmation, verify_expiry_confirmation, verify_operation_confirmation,
};
use tally_wire::{KeyLink, PublicKey};

use crate::Globals;

/// Signs the operations of `file` into one envelope, submits it and verifies the answer.
pub async fn submit(
    ctx: &Globals,
    profile: &Profile,
    key: &SigningKey,
    file: &Path,
    atomic: bool,
    out: Option<&Path>,
) -> Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let ops = parse_operations(&text).with_context(|| file.display().to_string())?;
    let envelope = Arc::new(build_envelope(key, profile.chain_id_bytes()?, atomic, ops));
    let what = format!("envelope of {}", file.display());
    let again = "; submit the same file again to learn whether it was applied (every operation \
                 keeps its id: nothing applies twice)";
    let Verified { c, signer, chain } =
        submit_verified(ctx, profile, &envelope, &what, again).await?;
    let record = EnvelopeFile::new(&envelope, &c, &signer).with_key_chain(&chain);
    if let Some(path) = out {
        write_envelope_file(path, &record)?;
    }
    if ctx.json {
        let mut shown = record;
        shown.replayed = Some(c.replayed);
        print!("{}", shown.to_json_pretty());
        return Ok(ExitCode::SUCCESS);
    }
    let failed = c.receipts.iter().filter(|r| r.failed.is_some()).count();
    println!(
        "confirmed {} envelope of {} operations ({} applied, {failed} failed) at height {}, \
         leaves {}..{}{}",
        if atomic {
            "an atomic"
        } else {
            "an independent"
        },
        c.receipts.len(),
        c.receipts.len() - failed,
        c.header.header.height,
        c.proof.first,
        c.proof.first + c.proof.count,
        if c.replayed {
            " (already applied earlier: original confirmation)"
        } else {
            ""
        }
    );
    println!("  envelope {}", to_hex(&c.envelope_hash));
    println!(
        "  verified: range proof of every receipt and operator signature (profile's operator key)"
    );
    if let Some(path) = out {
        println!("  confirmations written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// A verified envelope confirmation, the key that signed its header and the key chain a file
/// of it carries.
pub struct Verified {
    pub c: tally_wire::EnvelopeConfirmation,
    pub signer: PublicKey,
    pub chain: Vec<KeyLink>,
}

/// Submits `envelope` and verifies its confirmation under the key for its header's height
/// (from the profile's key chain). An error names `what`, and `again` (how to learn the
/// outcome) when the outcome is unknown.
pub async fn submit_verified(
    ctx: &Globals,
    profile: &Profile,
    envelope: &Arc<tally_wire::Envelope>,
    what: &str,
    again: &str,
) -> Result<Verified> {
    let operator = profile.operator_key()?;
    let cluster = ctx.cluster(profile)?;
    let c = cluster
        .submit_envelope(Arc::clone(envelope))
        .await
        .map_err(|e| {
            let again = if e.outcome_unknown() { again } else { "" };
            anyhow::Error::from(e).context(format!("{what}{again}"))
        })?;
    let (signer, chain) = crate::key_chain::header_key(ctx, &cluster, &operator, &c.header).await?;
    verify_envelope_confirmation(envelope, &c, &signer)
        .context("the server's confirmation does not verify against the profile's operator key")?;
    crate::consistency::track(ctx, &cluster, &operator, &c.header).await?;
    Ok(Verified { c, signer, chain })
}

/// `tally verify` of an envelope confirmation file.
pub fn verify(
    ctx: &Globals,
    file: &Path,
    text: &str,
    trusted: Option<&KeySchedule>,
    source: &str,
) -> Result<ExitCode> {
    let (envelope, c) = verify_envelope_json_under(text, trusted)
        .with_context(|| format!("{} does not verify", file.display()))?;
    let failed = c.receipts.iter().filter(|r| r.failed.is_some()).count();
    let checks = [
        "the envelope and confirmation bytes decode",
        "the envelope's signature verifies under its signer",
        "every receipt names the envelope, its operation, its position and the height",
        "the range proof leads from the receipts to the header's Merkle root",
        "the operator's signature over the header verifies",
        "the readable fields match the envelope and confirmation bytes",
    ];
    if ctx.json {
        let body = json!({
            "valid": true,
            "file": file.display().to_string(),
            "envelope_hash": to_hex(&c.envelope_hash),
            "operations": c.receipts.len(),
            "failed": failed,
            "height": c.header.header.height,
            "operator_key_source": source,
            "checks": checks,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: valid", file.display());
    println!(
        "  envelope of {} operations by {} ({} failed), applied at height {}",
        envelope.ops.len(),
        to_hex(&envelope.signer),
        failed,
        c.header.header.height
    );
    println!("  operator key from {source}");
    println!("  checked:");
    for check in checks {
        println!("    - {check}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally lookup`: the original confirmation of `(signer, id)`, verified, without resubmitting.
/// A found confirmation verified under `operator` (the key for its header's height), as the
/// file `tally verify` checks, carrying `chain` (the links up to that key).
pub fn verified_json(found: &Found, operator: &PublicKey, chain: &[KeyLink]) -> Result<String> {
    let unverified = "the confirmation does not verify";
    Ok(match found {
        Found::Request(c) => {
            verify_confirmation(c, operator).context(unverified)?;
            tally_client::ConfirmationFile::new(c, operator)
                .with_key_chain(chain)
                .to_json_pretty()
        }
        Found::Operation(c) => {
            verify_operation_confirmation(c, operator).context(unverified)?;
            OperationFile::new(c, operator)
                .with_key_chain(chain)
                .to_json_pretty()
        }
        Found::Expiry(c) => {
            verify_expiry_confirmation(c, operator).context(unverified)?;
            tally_client::envelope::ExpiryFile::new(c, operator)
                .with_key_chain(chain)
                .to_json_pretty()
        }
    })
}

/// Verifies a found confirmation under the key for its header's height and renders its file
/// (see [`verified_json`]), checking the header against the profile's held one.
pub async fn found_json(
    ctx: &Globals,
    cluster: &tally_client::ClusterClient,
    genesis: &PublicKey,
    found: &Found,
) -> Result<String> {
    let (signer, chain) =
        crate::key_chain::header_key(ctx, cluster, genesis, found.header()).await?;
    let text = verified_json(found, &signer, &chain)?;
    crate::consistency::track(ctx, cluster, genesis, found.header()).await?;
    Ok(text)
}

/// The height and leaf index of a found confirmation.
pub fn found_at(found: &Found) -> (u64, u32) {
    let r = found.receipt();
    (r.height, r.index)
}

pub async fn lookup(
    ctx: &Globals,
    signer: PublicKey,
    id: u128,
    out: Option<&Path>,
) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let operator = profile.operator_key()?;
    let cluster = ctx.cluster(&profile)?;
    let found = cluster.find_confirmation(signer, id).await?;
    let text = found_json(ctx, &cluster, &operator, &found).await?;
    if let Some(path) = out {
        tally_client::confirmation::write_atomically(path, &text)?;
    }
    if ctx.json {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let (height, index) = found_at(&found);
    println!(
        "found id {id} of {} at height {height}, leaf {index}",
        to_hex(&signer)
    );
    println!("  verified: inclusion proof and operator signature (profile's operator key)");
    if let Some(path) = out {
        println!("  confirmation written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally verify` of a reserve expiry's confirmation file.
pub fn verify_expiry(
    ctx: &Globals,
    file: &Path,
    text: &str,
    trusted: Option<&KeySchedule>,
    source: &str,
) -> Result<ExitCode> {
    let c = tally_client::envelope::verify_expiry_json_under(text, trusted)
        .with_context(|| format!("{} does not verify", file.display()))?;
    let r = &c.receipt;
    if ctx.json {
        let body = json!({
            "valid": true,
            "file": file.display().to_string(),
            "op": "expire",
            "owner": to_hex(&c.owner),
            "reserve_id": c.id.to_string(),
            "height": r.height,
            "index": r.index,
            "owner_balance": r.signer_balance,
            "operator_key_source": source,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: valid", file.display());
    println!(
        "  reserve {} of {} expired at height {}, leaf {} (owner's balance after: {})",
        c.id,
        to_hex(&c.owner),
        r.height,
        r.index,
        r.signer_balance
    );
    println!("  operator key from {source}");
    Ok(ExitCode::SUCCESS)
}

/// `tally verify` of one envelope operation's confirmation file.
pub fn verify_operation(
    ctx: &Globals,
    file: &Path,
    text: &str,
    trusted: Option<&KeySchedule>,
    source: &str,
) -> Result<ExitCode> {
    let c = verify_operation_json_under(text, trusted)
        .with_context(|| format!("{} does not verify", file.display()))?;
    let r = &c.receipt;
    if ctx.json {
        let body = json!({
            "valid": true,
            "file": file.display().to_string(),
            "height": r.height,
            "index": r.index,
            "op_index": r.op_index,
            "failed": r.failed.map(|code| code.name()),
            "operator_key_source": source,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: valid", file.display());
    println!(
        "  operation {} of an envelope of {} by {}, at height {}, leaf {}",
        r.op_index,
        c.envelope.ops.len(),
        to_hex(&c.envelope.signer),
        r.height,
        r.index
    );
    println!("  operator key from {source}");
    Ok(ExitCode::SUCCESS)
}

/// `tally supply`: the operator's totals, and whether balances sum to them.
pub async fn supply(ctx: &Globals) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let s = ctx.cluster(&profile)?.supply().await?;
    let total_supply = s.total_deposited.checked_sub(s.total_withdrawn);
    let balanced = total_supply == Some(s.sum_of_balances);
    if ctx.json {
        let body = json!({
            "total_supply": total_supply,
            "sum_of_balances": s.sum_of_balances,
            "height": s.height,
            "total_deposited": s.total_deposited,
            "total_withdrawn": s.total_withdrawn,
            "accounts": s.accounts,
            "balanced": balanced,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        let state = if balanced { "balanced" } else { "NOT BALANCED" };
        println!("at height {}: {} accounts", s.height, s.accounts);
        println!(
            "  deposited {}, withdrawn {}",
            s.total_deposited, s.total_withdrawn
        );
        println!("  sum of balances {} ({state})", s.sum_of_balances);
    }
    Ok(if balanced {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
