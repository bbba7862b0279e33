//! `tally account`, `tally history` and `tally lookup --receipt`: the accounting reads.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tally_client::to_hex;
use tally_core::crypto::header_hash;
use tally_core::key_chain::KeySchedule;
use tally_wire::{Hash, HistoryReply, PublicKey, HISTORY_ENTRIES_PER_REPLY_MAX};

use crate::Globals;

/// Prints an account's figures at the applied height (`height` 0) or as of `height`.
pub async fn account(ctx: &Globals, account: PublicKey, height: u64) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let a = ctx.cluster(&profile)?.account(account, height).await?;
    if ctx.json {
        let body = json!({
            "account": to_hex(&a.account),
            "height": a.height,
            "exists": a.exists,
            "balance": a.balance,
            "pending_debits": a.pending_debits,
            "pending_credits": a.pending_credits,
            "pending_known": a.pending_known,
            "total_debited": a.total_debited,
            "total_credited": a.total_credited,
            "operation_count": a.operation_count,
            "last_height": a.last_height,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    let state = if a.exists { "" } else { " (does not exist)" };
    println!("{} at height {}{state}", to_hex(&a.account), a.height);
    println!("  balance {}", a.balance);
    if a.pending_known {
        println!(
            "  pending: debits {}, credits {}",
            a.pending_debits, a.pending_credits
        );
    } else {
        println!("  pending: not known as of a past height");
    }
    println!(
        "  debited {}, credited {}, in {} operations (last at height {})",
        a.total_debited, a.total_credited, a.operation_count, a.last_height
    );
    Ok(ExitCode::SUCCESS)
}

/// Where a history listing starts and how much of it to print.
pub struct HistoryRange {
    pub from_height: u64,
    pub from_index: u32,
    /// Entries at most; None: all from the start on (page after page).
    pub limit: Option<u64>,
}

/// Prints an account's history, ascending by height then leaf index, each entry with the hash
/// of the signed header it was confirmed in (every header's signature checked).
pub async fn history(ctx: &Globals, account: PublicKey, range: HistoryRange) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let operator = profile.operator_key()?;
    let cluster = ctx.cluster(&profile)?;
    let mut entries = Vec::new();
    let mut from = (range.from_height, range.from_index);
    let (mut next, mut height, mut held_from) = (None, 0, 0);
    loop {
        let left = range.limit.map_or(u64::MAX, |l| l - entries.len() as u64);
        let ask = left.min(u64::from(HISTORY_ENTRIES_PER_REPLY_MAX)) as u16;
        if ask == 0 {
            break;
        }
        let page = cluster.history(account, from.0, from.1, ask).await?;
        (height, held_from, next) = (page.height, page.held_from, page.next);
        let keys = crate::key_chain::reaching(ctx, &cluster, &operator, &page.headers).await?;
        entries.extend(page_json(&page, &keys)?);
        match page.next {
            Some(n) if n > from => from = n,
            _ => break,
        }
    }
    if ctx.json {
        let body = json!({
            "account": to_hex(&account),
            "height": height,
            "held_from": held_from,
            "entries": entries,
            "next_from_height": next.map(|n| n.0),
            "next_from_index": next.map(|n| n.1),
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: {} entries (read at height {height}, history held from {held_from})",
        to_hex(&account),
        entries.len()
    );
    for e in &entries {
        println!(
            "  {:>8} {:>5} {:<8} {:<6} {:>20} balance {:>20}  {}",
            e["height"],
            e["index"],
            e["op"].as_str().unwrap_or(""),
            e["direction"].as_str().unwrap_or(""),
            e["amount"],
            e["balance"],
            e["counterparty"].as_str().unwrap_or("")
        );
    }
    if let Some((h, i)) = next {
        println!("  more from --from-height {h} --from-index {i}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A page's entries as JSON, each with its header's hash. Every header must be signed by the
/// operator (under the key for its height) and every entry's height must have one.
fn page_json(page: &HistoryReply, keys: &KeySchedule) -> Result<Vec<Value>> {
    let mut hashes = std::collections::HashMap::new();
    for signed in &page.headers {
        keys.verify_header(signed)
            .with_context(|| format!("the header of height {}", signed.header.height))?;
        hashes.insert(signed.header.height, header_hash(&signed.header));
    }
    let mut out = Vec::with_capacity(page.entries.len());
    for e in &page.entries {
        let Some(header) = hashes.get(&e.height) else {
            bail!("the reply has no header for height {}", e.height);
        };
        out.push(json!({
            "height": e.height,
            "index": e.index,
            "op": e.op.name(),
            "direction": if e.debit { "debit" } else { "credit" },
            "counterparty": to_hex(&e.counterparty),
            "amount": e.amount,
            "balance": e.balance,
            "request_hash": to_hex(&e.request_hash),
            "receipt_hash": to_hex(&e.receipt_hash),
            "header_hash": to_hex(header),
        }));
    }
    Ok(out)
}

/// `tally lookup --receipt HASH`: the confirmation of the receipt with that leaf hash,
/// verified, printed (with `--json`) and written to `out`.
pub async fn lookup_receipt(ctx: &Globals, leaf: Hash, out: Option<&Path>) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let operator = profile.operator_key()?;
    let cluster = ctx.cluster(&profile)?;
    let found = cluster.find_by_receipt(leaf).await?;
    let text = crate::envelope::found_json(ctx, &cluster, &operator, &found).await?;
    if let Some(path) = out {
        tally_client::confirmation::write_atomically(path, &text)?;
    }
    if ctx.json {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let (height, index) = crate::envelope::found_at(&found);
    println!(
        "found receipt {} at height {height}, leaf {index}",
        to_hex(&leaf)
    );
    println!("  verified: inclusion proof and operator signature (profile's operator key)");
    if let Some(path) = out {
        println!("  confirmation written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
