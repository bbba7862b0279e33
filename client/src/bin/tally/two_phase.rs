//! `tally reserve`, `tally post`, `tally void`, `tally renew`: two-phase transfers, each sent
//! as an atomic envelope of one operation (PROTOCOL.md §4.10), so that a refusal comes back
//! as `EnvelopeFailed` with its code and the command exits non-zero.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use ed25519_dalek::SigningKey;
use serde_json::json;
use tally_client::envelope::{build_envelope, write_envelope_file, EnvelopeFile};
use tally_client::{public_key, to_hex, Profile};
use tally_wire::{Op, Operation, PublicKey};

use crate::envelope::Verified;
use crate::Globals;

/// What the command line asked for, before it is signed.
pub struct Ask {
    pub op: Op,
    pub id: u128,
    pub to: Option<PublicKey>,
    pub amount: u64,
    pub timeout_ms: u64,
    pub reserve_id: u128,
    /// reserve: the party; post, void, renew: the owner.
    pub party: Option<PublicKey>,
}

impl Ask {
    fn operation(&self) -> Operation {
        Operation {
            op: self.op,
            id: self.id,
            to: self.to.unwrap_or([0; 32]),
            amount: self.amount,
            timeout_ms: self.timeout_ms,
            reserve_id: self.reserve_id,
            party: self.party.unwrap_or([0; 32]),
        }
    }
}

/// Signs, submits and verifies one two-phase operation; prints what it did.
pub async fn run(
    ctx: &Globals,
    profile: &Profile,
    key: &SigningKey,
    ask: Ask,
    out: Option<&Path>,
) -> Result<ExitCode> {
    let envelope = Arc::new(build_envelope(
        key,
        profile.chain_id_bytes()?,
        true,
        vec![ask.operation()],
    ));
    let (kind, id) = (ask.op.name(), ask.id);
    let again = format!("; run it again with --id {id} to learn whether it applied (never twice)");
    let Verified { c, signer, chain } = crate::envelope::submit_verified(
        ctx,
        profile,
        &envelope,
        &format!("{kind} id {id}"),
        &again,
    )
    .await?;
    if let Some(path) = out {
        let file = EnvelopeFile::new(&envelope, &c, &signer).with_key_chain(&chain);
        write_envelope_file(path, &file)?;
    }
    let rc = &c.receipts[0];
    let owner = if ask.op == Op::Reserve {
        public_key(key)
    } else {
        ask.party.unwrap_or_else(|| public_key(key))
    };
    let time = c.header.header.time_unix_ms;
    let expires_at_ms = matches!(ask.op, Op::Reserve | Op::Renew).then(|| time + ask.timeout_ms);
    let reserve_id = if ask.op == Op::Reserve {
        ask.id
    } else {
        ask.reserve_id
    };
    let body = json!({
        "op": kind,
        "id": ask.id.to_string(),
        "reserve_id": reserve_id.to_string(),
        "owner": to_hex(&owner),
        "height": c.header.header.height,
        "batch_time_ms": time,
        "expires_at_ms": expires_at_ms,
        "owner_balance": rc.signer_balance,
        "receiver_balance": (ask.op == Op::Post).then_some(rc.to_balance),
        "replayed": c.replayed,
    });
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "confirmed {kind} of reserve {reserve_id} at height {}{}",
        c.header.header.height,
        if c.replayed { " (applied earlier)" } else { "" }
    );
    println!("  owner {} available {}", to_hex(&owner), rc.signer_balance);
    if let Some(at) = expires_at_ms {
        println!(
            "  expires at {at} ms (batch time {time} + {} ms)",
            ask.timeout_ms
        );
    }
    if ask.op == Op::Post {
        println!("  receiver balance {}", rc.to_balance);
    }
    if let Some(path) = out {
        println!("  confirmation written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
