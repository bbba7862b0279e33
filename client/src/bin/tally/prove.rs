//! `tally prove PK --out FILE` and `tally verify` of a balance proof file (PROTOCOL.md §11.3).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use tally_client::balance_proof::{verify_balance_proof_json_under, BalanceProofFile};
use tally_client::{to_hex, Profile};
use tally_core::key_chain::KeySchedule;
use tally_core::verify::verify_balance_proof;
use tally_wire::PublicKey;

use crate::{consistency, Globals};

/// Asks a replica for the proof at its applied height, verifies it under the key for its
/// height (the profile's key chain, which the file carries), checks its header against the profile's held one, and writes the file.
pub async fn prove(ctx: &Globals, account: PublicKey, out: Option<&Path>) -> Result<ExitCode> {
    let profile: Profile = ctx.profile()?;
    let operator = profile.operator_key()?;
    let cluster = ctx.cluster(&profile)?;
    let reply = cluster
        .balance_proof(account)
        .await
        .with_context(|| format!("the balance proof of {}", to_hex(&account)))?;
    let (signer, chain) =
        crate::key_chain::header_key(ctx, &cluster, &operator, &reply.header).await?;
    verify_balance_proof(&reply, &signer).context("the replica's balance proof does not verify")?;
    let file = BalanceProofFile::new(&reply, &signer).with_key_chain(&chain);
    let text = file.to_json_pretty();
    if let Some(path) = out {
        tally_client::confirmation::write_atomically(path, &text)?;
    }
    consistency::track(ctx, &cluster, &operator, &reply.header).await?;
    if ctx.json {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    match reply.balance {
        Some(b) => println!("{} holds {b} at height {}", to_hex(&account), file.height),
        None => println!(
            "{} does not exist at height {}",
            to_hex(&account),
            file.height
        ),
    }
    println!(
        "  proved against the header's state map root {} ({} siblings)",
        file.map_root,
        file.siblings.len()
    );
    if let Some(path) = out {
        println!("  proof written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally verify` of a balance proof file.
pub fn verify(
    ctx: &Globals,
    file: &Path,
    text: &str,
    trusted: Option<&KeySchedule>,
    source: &str,
) -> Result<ExitCode> {
    let (reply, operator) = verify_balance_proof_json_under(text, trusted)
        .with_context(|| format!("{} does not verify", file.display()))?;
    let height = reply.header.header.height;
    if ctx.json {
        let body = json!({
            "valid": true,
            "file": file.display().to_string(),
            "kind": "balance",
            "account": to_hex(&reply.account),
            "exists": reply.balance.is_some(),
            "balance": reply.balance.unwrap_or(0),
            "height": height,
            "operator_public_key": to_hex(&operator),
            "operator_key_source": source,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: valid", file.display());
    match reply.balance {
        Some(b) => println!("  {} holds {b} at height {height}", to_hex(&reply.account)),
        None => println!(
            "  {} does not exist at height {height}",
            to_hex(&reply.account)
        ),
    }
    println!("  operator key {} (from {source})", to_hex(&operator));
    Ok(ExitCode::SUCCESS)
}
