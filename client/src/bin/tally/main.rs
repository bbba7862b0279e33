//! `tally`: the command-line client. Parses arguments, calls `tally_client`, prints the result
//! (a table for people, `--json` for scripts).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use tally_client::{
    build_request, generate_key, load_key, members_json, members_table, parse_public_key,
    public_key, random_id, retry_name, role_name, to_hex, verify_confirmation_json_under,
    write_key, ClusterClient, ClusterOptions, ConfirmationFile, Error, Profile,
};
use tally_core::crypto::header_hash;
use tally_core::key_chain::KeySchedule;
use tally_core::verify::verify_confirmation;
use tally_storage::archive_read;
use tally_storage::bucket::{Bucket, BucketSettings};
use tally_wire::{AdminCommand, Op, PublicKey, ReadMode, SignedHeader, HEADERS_PER_REPLY_MAX};
use tokio::time::Instant;

mod account;
mod consistency;
mod envelope;
mod key_chain;
mod prove;
mod two_phase;

const DEFAULT_PROFILE: &str = "./tally-data/profile.toml";

/// How long before `--total-timeout-ms` the cluster client's own deadline falls.
/// Exit code of a command that found a split view (the operator signed two histories).
const EXIT_SPLIT_VIEW: u8 = 3;

const BACKSTOP_MARGIN: Duration = Duration::from_millis(50);

#[derive(Parser)]
#[command(name = "tally", version, about = "Client for a tally ledger")]
struct Cli {
    /// Client profile written by the server [default: ./tally-data/profile.toml]
    #[arg(long, global = true, env = "TALLY_PROFILE", value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Machine-readable output on stdout (errors too)
    #[arg(long, global = true)]
    json: bool,
    /// Timeout of each connection attempt and each call, in milliseconds (never more than
    /// --total-timeout-ms)
    #[arg(
        long,
        global = true,
        env = "TALLY_TIMEOUT_MS",
        default_value_t = 30_000,
        value_name = "MS"
    )]
    timeout_ms: u64,
    /// How long a command that talks to the ledger (deposit, transfer, withdraw, balance,
    /// headers, status, info, cluster) may take in all: connects, calls, redirects, failover and backoff, in
    /// milliseconds. `audit` reads an archive and is not bounded by it.
    #[arg(
        long,
        global = true,
        env = "TALLY_TOTAL_TIMEOUT_MS",
        default_value_t = 60_000,
        value_name = "MS"
    )]
    total_timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

/// What post, void and renew share: whose reserve, this operation's id, where to write.
#[derive(clap::Args)]
struct Acting {
    /// The reserve's owner, when the key is the party it names [default: the key's account]
    #[arg(long, value_name = "PUBKEY", value_parser = public_key_arg)]
    owner: Option<PublicKey>,
    /// This operation's id (idempotency key) [default: random]
    #[arg(long)]
    id: Option<u128>,
    /// Also write the confirmation to this file
    #[arg(long, value_name = "CONFIRMATION.json")]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new Ed25519 key (PKCS#8 PEM, mode 0600) and print its public key
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Credit an account, signed with the profile's deposit key
    Deposit {
        #[arg(long, value_name = "PUBKEY", value_parser = public_key_arg)]
        to: PublicKey,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        amount: u64,
        /// Request id (idempotency key) [default: random]
        #[arg(long)]
        id: Option<u128>,
        /// Also write the confirmation to this file
        #[arg(long, value_name = "CONFIRMATION.json")]
        out: Option<PathBuf>,
    },
    /// Move funds from the key's account to another
    Transfer {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "PUBKEY", value_parser = public_key_arg)]
        to: PublicKey,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        amount: u64,
        /// Request id (idempotency key) [default: random]
        #[arg(long)]
        id: Option<u128>,
        /// Also write the confirmation to this file
        #[arg(long, value_name = "CONFIRMATION.json")]
        out: Option<PathBuf>,
    },
    /// Debit the key's account
    Withdraw {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        amount: u64,
        /// Request id (idempotency key) [default: random]
        #[arg(long)]
        id: Option<u128>,
        /// Also write the confirmation to this file
        #[arg(long, value_name = "CONFIRMATION.json")]
        out: Option<PathBuf>,
    },
    /// Sign many operations as one envelope and submit it: all or nothing with --atomic, else
    /// each operation its own result
    Envelope {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// One JSON operation per line: {"op": "transfer", "to": HEX, "amount": N, "id": N}
        /// (deposit alike; withdraw without "to")
        #[arg(long, value_name = "OPS.jsonl")]
        file: PathBuf,
        /// All operations apply or none (the failure names failed_index and code)
        #[arg(long)]
        atomic: bool,
        /// Also write the envelope and its confirmation to this file (`tally verify` checks it)
        #[arg(long, value_name = "CONFIRMATIONS.json")]
        out: Option<PathBuf>,
    },
    /// Fetch and verify the original confirmation of an operation by its signer and id, or by
    /// its receipt hash, without resubmitting it (the file verifies with `tally verify`)
    Lookup {
        #[arg(long, value_name = "PUBKEY", value_parser = public_key_arg,
              requires = "id", required_unless_present = "receipt", conflicts_with = "receipt")]
        signer: Option<PublicKey>,
        #[arg(long, requires = "signer")]
        id: Option<u128>,
        /// The receipt's Merkle leaf hash (64 hex; `receipt_hash` in `tally history`)
        #[arg(long, value_name = "HASH", value_parser = hash_arg)]
        receipt: Option<tally_wire::Hash>,
        /// Also write the confirmation to this file
        #[arg(long, value_name = "CONFIRMATION.json")]
        out: Option<PathBuf>,
    },
    /// Hold funds for a receiver until posted, voided or expired (two-phase transfer); the
    /// reserve is known by its --id
    Reserve {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "PUBKEY", value_parser = public_key_arg)]
        to: PublicKey,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        amount: u64,
        /// Expires this long after its batch's time unless posted, voided or renewed
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=tally_wire::RESERVE_TIMEOUT_MS_MAX))]
        expires_in_ms: u64,
        /// Who else may post, void or renew it
        #[arg(long, value_name = "PUBKEY", value_parser = public_key_arg)]
        party: Option<PublicKey>,
        /// The reserve's id (its operation's idempotency key) [default: random]
        #[arg(long)]
        id: Option<u128>,
        /// Also write the confirmation to this file
        #[arg(long, value_name = "CONFIRMATION.json")]
        out: Option<PathBuf>,
    },
    /// Capture a reserve: all of it, or --amount of it (the rest returns to its owner)
    Post {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long)]
        reserve_id: u128,
        /// Capture this much [default: all]
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        amount: Option<u64>,
        #[command(flatten)]
        acting: Acting,
    },
    /// Release a reserve to its owner
    Void {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long)]
        reserve_id: u128,
        #[command(flatten)]
        acting: Acting,
    },
    /// Move a reserve's deadline to this long after the batch's time (a lease renewed)
    Renew {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long)]
        reserve_id: u128,
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=tally_wire::RESERVE_TIMEOUT_MS_MAX))]
        expires_in_ms: u64,
        #[command(flatten)]
        acting: Acting,
    },
    /// An account's figures: balance, pending debits and credits, totals debited and credited,
    /// operations, last height touched (now, or as of --height)
    Account {
        #[arg(value_name = "PUBKEY", value_parser = public_key_arg)]
        account: PublicKey,
        /// Answer as of this applied height (pending amounts are then not known) [default: now]
        #[arg(long, value_name = "H", default_value_t = 0)]
        height: u64,
    },
    /// An account's operations, ascending by height then leaf index, each with the header it
    /// was confirmed in
    History {
        #[arg(value_name = "PUBKEY", value_parser = public_key_arg)]
        account: PublicKey,
        /// The first height listed (inclusive) [default: the oldest held]
        #[arg(long, value_name = "H", default_value_t = 0)]
        from_height: u64,
        /// The first leaf index listed within --from-height (to go on from a page cut mid-height)
        #[arg(long, value_name = "I", default_value_t = 0)]
        from_index: u32,
        /// Entries at most [default: all]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// The operator's totals: deposits minus withdrawals, and the sum of every balance (they
    /// must be equal; exit 1 if not)
    Supply,
    /// Read an account's balance (linearizable unless --stale)
    Balance {
        #[arg(value_name = "PUBKEY", value_parser = public_key_arg)]
        account: PublicKey,
        /// Accept whatever the replica has applied (may lag; served without a leader too)
        #[arg(long)]
        stale: bool,
    },
    /// Check a confirmation file offline: inclusion proof and operator signature
    Verify {
        #[arg(value_name = "CONFIRMATION.json")]
        file: PathBuf,
        /// Operator public key to check against [default: the profile's, else the file's own]
        #[arg(long, value_name = "HEX", value_parser = public_key_arg)]
        operator_key: Option<PublicKey>,
    },
    /// Fetch the operator's key chain (every key rotation, PROTOCOL.md §4.14), check it from
    /// the profile's genesis key and save it beside the profile (key-chain.json)
    KeyChain,
    /// Prove that the header log at one height is a prefix of the log at a later one (RFC 9162
    /// consistency, under checkpoints the operator signed) and write the proof file
    Consistency {
        #[arg(long, value_name = "HEIGHT")]
        from: u64,
        #[arg(long, value_name = "HEIGHT")]
        to: u64,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Prove an account's balance (or that it does not exist) against the newest signed header,
    /// through the state map its state digest commits to, and write the proof file
    Prove {
        #[arg(value_name = "PUBKEY", value_parser = public_key_arg)]
        account: PublicKey,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Run a witness of the profile's ledger (C2SP tlog-witness): cosign each checkpoint the
    /// operator sends that is consistent with the last one this witness cosigned
    Witness {
        /// The witness's Ed25519 key (PKCS#8 PEM); its state is kept in FILE.state.json
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// The name in its cosignature lines [default: tally-witness/<key prefix>]
        #[arg(long)]
        name: Option<String>,
    },
    /// Print signed headers, checking each signature and the hash chain between them
    Headers {
        #[arg(long, value_name = "HEIGHT", default_value_t = 1)]
        from: u64,
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u64,
    },
    /// Show every replica's role, term, indexes and lag
    Status,
    /// Ask a replica for the ledger's chain id, the operator key and its size limits, and
    /// compare them with the profile
    Info,
    /// Verify an archive from its objects alone: checkpoint, tiles, every header and batch,
    /// and a replay of every balance (exit 0 only if all of it holds)
    Audit {
        /// The archive: s3://bucket/prefix (endpoint, region, plain HTTP from AWS_ENDPOINT_URL,
        /// AWS_REGION, AWS_ALLOW_HTTP; credentials from the AWS variables), file:///path or a
        /// directory
        #[arg(long, value_name = "URL")]
        archive: String,
        /// A checkpoint saved earlier: the archive must be an append-only extension of it
        #[arg(long, value_name = "FILE")]
        from_checkpoint: Option<PathBuf>,
        /// Operator public key (64 hex) [default: the profile's]
        #[arg(long, value_name = "HEX", value_parser = public_key_arg)]
        operator_key: Option<PublicKey>,
    },
    /// List and change the replica set, signed with the profile's admin_key; every command
    /// prints the membership that results
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List the members (id, role, peer and client address) and the leader
    Members,
    /// Add a replica (start it first), as a learner with --learner, else as a voter
    Add {
        /// The new replica's id (not in use)
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// The new replica's peer address
        #[arg(long, value_name = "HOST:PORT", value_parser = address_arg)]
        address: String,
        /// The new replica's client address (what clients and not_leader hints use)
        #[arg(long, value_name = "HOST:PORT", value_parser = address_arg)]
        client_address: Option<String>,
        /// Add it as a learner (it catches up without voting; promote it afterwards)
        #[arg(long)]
        learner: bool,
    },
    /// Make a learner a voter
    Promote {
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Remove a member (voter or learner; not the leader: transfer leadership first)
    Remove {
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Hand leadership to a voter
    TransferLeader {
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Rotate the operator key: the next batch names the new key, which signs every header
    /// after it (every replica must hold it as operator.next_signing_key first)
    RotateKey {
        #[arg(long, value_name = "PUBKEY", value_parser = public_key_arg)]
        new_public_key: PublicKey,
    },
}

impl ClusterCommand {
    fn admin_command(self) -> AdminCommand {
        match self {
            ClusterCommand::Members => AdminCommand::Members,
            ClusterCommand::Add {
                id,
                address,
                client_address,
                learner,
            } => AdminCommand::Add {
                id,
                address,
                client_address: client_address.unwrap_or_default(),
                learner,
            },
            ClusterCommand::Promote { id } => AdminCommand::Promote { id },
            ClusterCommand::Remove { id } => AdminCommand::Remove { id },
            ClusterCommand::TransferLeader { id } => AdminCommand::TransferLeader { id },
            ClusterCommand::RotateKey { new_public_key } => AdminCommand::RotateKey {
                new_key: new_public_key,
            },
        }
    }
}

fn address_arg(text: &str) -> std::result::Result<String, String> {
    tally_wire::check_host_port(text)
        .map(|()| text.to_string())
        .map_err(|reason| format!("{text:?}: {reason} (want HOST:PORT)"))
}

fn hash_arg(text: &str) -> std::result::Result<tally_wire::Hash, String> {
    let bytes = hex::decode(text).map_err(|e| format!("{text:?}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{text:?}: want 64 hex digits (32 bytes)"))
}

fn public_key_arg(text: &str) -> std::result::Result<PublicKey, String> {
    parse_public_key(text).map_err(|e| e.to_string())
}

impl Command {
    /// Whether the command talks to the ledger's replicas, and so is bounded by
    /// `--total-timeout-ms`.
    fn talks_to_replicas(&self) -> bool {
        match self {
            Command::Deposit { .. }
            | Command::Transfer { .. }
            | Command::Withdraw { .. }
            | Command::Envelope { .. }
            | Command::Reserve { .. }
            | Command::Post { .. }
            | Command::Void { .. }
            | Command::Renew { .. }
            | Command::Lookup { .. }
            | Command::Account { .. }
            | Command::History { .. }
            | Command::Supply
            | Command::Balance { .. }
            | Command::Headers { .. }
            | Command::Consistency { .. }
            | Command::KeyChain
            | Command::Prove { .. }
            | Command::Status
            | Command::Info
            | Command::Cluster { .. } => true,
            Command::Keygen { .. }
            | Command::Verify { .. }
            | Command::Audit { .. }
            | Command::Witness { .. } => false,
        }
    }

    /// What to tell the user when the command is stopped at its budget, for a command whose
    /// outcome is then unknown.
    fn unknown_outcome_hint(&self) -> &'static str {
        match self {
            Command::Deposit { .. } | Command::Transfer { .. } | Command::Withdraw { .. } => {
                "; whether the request was applied is unknown: resubmit it with the same --id \
                 to find out (it never applies twice)"
            }
            Command::Reserve { .. }
            | Command::Post { .. }
            | Command::Void { .. }
            | Command::Renew { .. } => {
                "; whether it was applied is unknown: run it again with the same --id to find \
                 out (it never applies twice)"
            }
            Command::Envelope { .. } => {
                "; whether the envelope was applied is unknown: submit the same file again to \
                 find out (nothing applies twice)"
            }
            Command::Cluster { command } if !matches!(command, ClusterCommand::Members) => {
                "; whether the change took effect is unknown: `tally cluster members` tells"
            }
            _ => "",
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run_bounded(cli).await {
        Ok(code) => code,
        Err(e) => {
            report_error(&e, json);
            match e.downcast_ref::<Error>() {
                Some(Error::SplitView { .. }) => ExitCode::from(EXIT_SPLIT_VIEW),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Prints an error: `{"error": {...}}` on stdout with `--json`, a sentence on stderr otherwise.
fn report_error(e: &anyhow::Error, json: bool) {
    let client_error = e.downcast_ref::<Error>();
    if json {
        let (code, code_number, retry) = match client_error {
            Some(Error::Rejected(reply)) => (
                reply.code.name(),
                Some(reply.code as u16),
                Some(retry_name(reply.retry)),
            ),
            Some(err) => (err.code_name(), None, err.retry().map(retry_name)),
            None => ("error", None, None),
        };
        let mut body = json!({
            "code": code,
            "failed_index": match client_error {
                Some(Error::EnvelopeFailed(f)) => Some(f.failed_index),
                _ => None,
            },
            "code_number": code_number,
            "retry": retry,
            "message": match client_error {
                Some(Error::Rejected(reply)) => reply.message.clone(),
                _ => format!("{e:#}"),
            },
        });
        if let Some(Error::Rejected(reply)) = client_error {
            if reply.retry_after_ms > 0 {
                body["retry_after_ms"] = reply.retry_after_ms.into();
            }
            if !reply.leader_hint.is_empty() {
                body["leader_hint"] = reply.leader_hint.clone().into();
            }
        }
        // `code` (and `failed_index`) also at the top, for scripts that read `.code`.
        let failed_index = body["failed_index"].clone();
        println!(
            "{}",
            json!({ "error": body, "code": code, "failed_index": failed_index })
        );
    } else {
        eprintln!("error: {e:#}");
    }
}

/// [`run`], stopped at `--total-timeout-ms` if the command talks to the replicas. The cluster
/// client's own deadline ends just before (with its precise error: gave up, or outcome unknown
/// for a request it sent); this one also bounds what comes after it (more header pages).
async fn run_bounded(cli: Cli) -> Result<ExitCode> {
    let budget_ms = cli.total_timeout_ms;
    if !cli.command.talks_to_replicas() {
        return run(cli, Instant::now()).await;
    }
    let what = cli.command.unknown_outcome_hint();
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_millis(budget_ms), run(cli, started)).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::Error::from(Error::Timeout).context(format!(
            "stopped after --total-timeout-ms {budget_ms} ms{what}"
        ))),
    }
}

async fn run(cli: Cli, started: Instant) -> Result<ExitCode> {
    let ctx = Globals {
        profile_path: cli.profile.clone(),
        json: cli.json,
        timeout: Duration::from_millis(cli.timeout_ms),
        total_timeout: Duration::from_millis(cli.total_timeout_ms),
        started,
    };
    match cli.command {
        Command::Keygen { out } => keygen(&ctx, &out),
        Command::Deposit {
            to,
            amount,
            id,
            out,
        } => {
            let profile = ctx.profile()?;
            let key = profile.load_deposit_key()?;
            submit(&ctx, &profile, &key, Op::Deposit, to, amount, id, out).await
        }
        Command::Transfer {
            key,
            to,
            amount,
            id,
            out,
        } => {
            let profile = ctx.profile()?;
            let key = load_key(&key)?;
            submit(&ctx, &profile, &key, Op::Transfer, to, amount, id, out).await
        }
        Command::Withdraw {
            key,
            amount,
            id,
            out,
        } => {
            let profile = ctx.profile()?;
            let key = load_key(&key)?;
            submit(&ctx, &profile, &key, Op::Withdraw, [0; 32], amount, id, out).await
        }
        Command::Envelope {
            key,
            file,
            atomic,
            out,
        } => {
            let profile = ctx.profile()?;
            let key = load_key(&key)?;
            envelope::submit(&ctx, &profile, &key, &file, atomic, out.as_deref()).await
        }
        Command::Reserve {
            key,
            to,
            amount,
            expires_in_ms,
            party,
            id,
            out,
        } => {
            let ask = two_phase::Ask {
                op: Op::Reserve,
                id: id.unwrap_or_else(random_id),
                to: Some(to),
                amount,
                timeout_ms: expires_in_ms,
                reserve_id: 0,
                party,
            };
            two_phase_run(&ctx, &key, ask, out.as_deref()).await
        }
        Command::Post {
            key,
            reserve_id,
            amount,
            acting,
        } => {
            act(
                &ctx,
                &key,
                Op::Post,
                reserve_id,
                amount.unwrap_or(0),
                0,
                acting,
            )
            .await
        }
        Command::Void {
            key,
            reserve_id,
            acting,
        } => act(&ctx, &key, Op::Void, reserve_id, 0, 0, acting).await,
        Command::Renew {
            key,
            reserve_id,
            expires_in_ms,
            acting,
        } => act(&ctx, &key, Op::Renew, reserve_id, 0, expires_in_ms, acting).await,
        Command::Lookup {
            signer,
            id,
            receipt,
            out,
        } => match (receipt, signer, id) {
            (Some(leaf), _, _) => account::lookup_receipt(&ctx, leaf, out.as_deref()).await,
            (None, Some(signer), Some(id)) => {
                envelope::lookup(&ctx, signer, id, out.as_deref()).await
            }
            _ => bail!("give --receipt HASH, or --signer PUBKEY and --id ID"),
        },
        Command::Account { account, height } => account::account(&ctx, account, height).await,
        Command::History {
            account,
            from_height,
            from_index,
            limit,
        } => {
            let range = account::HistoryRange {
                from_height,
                from_index,
                limit,
            };
            account::history(&ctx, account, range).await
        }
        Command::Supply => envelope::supply(&ctx).await,
        Command::Balance { account, stale } => balance(&ctx, account, stale).await,
        Command::Verify { file, operator_key } => verify(&ctx, &file, operator_key),
        Command::Headers { from, limit } => headers(&ctx, from, limit).await,
        Command::Witness { key, listen, name } => witness(&ctx, &key, listen, name).await,
        Command::Consistency { from, to, out } => {
            consistency::prove(&ctx, from, to, out.as_deref()).await
        }
        Command::Prove { account, out } => prove::prove(&ctx, account, out.as_deref()).await,
        Command::Status => status(&ctx).await,
        Command::Info => info(&ctx).await,
        Command::Audit {
            archive,
            from_checkpoint,
            operator_key,
        } => audit(&ctx, &archive, from_checkpoint, operator_key).await,
        Command::Cluster {
            command: ClusterCommand::RotateKey { new_public_key },
        } => key_chain::rotate(&ctx, new_public_key).await,
        Command::Cluster { command } => cluster(&ctx, command.admin_command()).await,
        Command::KeyChain => key_chain::show(&ctx).await,
    }
}

/// What every command needs from the global flags.
pub(crate) struct Globals {
    profile_path: Option<PathBuf>,
    json: bool,
    /// Of each attempt.
    timeout: Duration,
    /// Of the whole command, over all its attempts.
    total_timeout: Duration,
    /// When the command started: the total timeout counts from here.
    started: Instant,
}

impl Globals {
    fn profile_path(&self) -> PathBuf {
        self.profile_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PROFILE))
    }

    fn profile(&self) -> Result<Profile> {
        let path = self.profile_path();
        if self.profile_path.is_none() && !path.exists() {
            bail!(
                "no profile at {DEFAULT_PROFILE}: pass --profile FILE or set TALLY_PROFILE \
                 (the server writes profile.toml into its data directory)"
            );
        }
        Ok(Profile::load(&path)?)
    }

    /// A client for the profile's replicas that follows the leader and fails over (it connects
    /// on first use). Its operations end with the command's budget, a little before the
    /// backstop in [`run_bounded`], so that their own error (which says whether a request
    /// was sent) is the one reported.
    fn cluster(&self, profile: &Profile) -> Result<ClusterClient> {
        if profile.replicas.is_empty() {
            bail!("the profile lists no replicas");
        }
        let left = self.total_timeout.saturating_sub(self.started.elapsed());
        let total = left
            .saturating_sub(BACKSTOP_MARGIN)
            .max(Duration::from_millis(1));
        Ok(ClusterClient::new(
            profile,
            ClusterOptions {
                call_timeout: self.timeout.min(total),
                total_timeout: total,
                ..ClusterOptions::default()
            },
        ))
    }
}

/// `tally witness`: serves until the process is stopped.
async fn witness(
    ctx: &Globals,
    key_path: &Path,
    listen: std::net::SocketAddr,
    name: Option<String>,
) -> Result<ExitCode> {
    use tally_client::witness::{bind, default_name, serve, Witness};
    let profile = ctx.profile()?;
    let key = load_key(key_path)?;
    let origin = tally_core::tlog::origin_for(&profile.chain_id_bytes()?);
    let genesis = profile.operator_key()?;
    let dir = consistency::profile_dir(ctx);
    let saved = tally_client::key_chain::load(&dir, &genesis)?;
    let logs = [(origin.clone(), verifying_keys(&saved)?)]
        .into_iter()
        .collect();
    let name = name.unwrap_or_else(|| default_name(&key));
    let witness = std::sync::Arc::new(Witness::open(key, name, key_path, logs)?);
    let listener = bind(listen).await?;
    let addr = listener.local_addr()?;
    println!("tally witness {} listening on {addr}", witness.name());
    println!("  verifier key {}", witness.verifier_key());
    println!("  witnessing {origin}");
    let cluster = ctx.cluster(&profile)?;
    let follow = follow_key_chain(cluster, dir, genesis, origin, witness.clone());
    tokio::spawn(follow);
    serve(listener, witness).await;
    Ok(ExitCode::SUCCESS)
}

/// How often a witness asks the log for its key chain (PROTOCOL.md §4.14), at the latest: a
/// checkpoint refused for its signature makes it ask at once, so the log's next attempt (one
/// second later, `server/src/witnesses.rs`) finds the key rotated in.
const WITNESS_KEY_CHAIN_EVERY: Duration = Duration::from_secs(5);

/// Keeps the witness's keys for `origin` on the log's key chain, followed from `genesis` and
/// saved beside the profile. A failed ask is retried at the next turn.
async fn follow_key_chain(
    cluster: tally_client::ClusterClient,
    dir: PathBuf,
    genesis: PublicKey,
    origin: String,
    witness: std::sync::Arc<tally_client::witness::Witness>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WITNESS_KEY_CHAIN_EVERY) => {}
            _ = witness.refused_signature.notified() => {}
        }
        let keys = tally_client::key_chain::refresh(&cluster, &dir, &genesis).await;
        match keys
            .map_err(anyhow::Error::from)
            .and_then(|k| verifying_keys(&k))
        {
            Ok(keys) => witness.set_log_keys(&origin, keys),
            Err(e) => eprintln!("tally witness: the log's key chain was not read: {e}"),
        }
    }
}

/// Every key of a followed chain, as checkpoint verifiers.
fn verifying_keys(
    keys: &tally_core::key_chain::KeySchedule,
) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    keys.keys()
        .iter()
        .map(|k| ed25519_dalek::VerifyingKey::from_bytes(k).context("an operator key"))
        .collect()
}

fn keygen(ctx: &Globals, out: &Path) -> Result<ExitCode> {
    let key = generate_key();
    write_key(out, &key)?;
    let public = to_hex(&public_key(&key));
    if ctx.json {
        println!(
            "{}",
            json!({ "public_key": public, "path": out.display().to_string() })
        );
    } else {
        println!("{public}");
        eprintln!("private key written to {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
async fn two_phase_run(
    ctx: &Globals,
    key: &Path,
    ask: two_phase::Ask,
    out: Option<&Path>,
) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let key = load_key(key)?;
    two_phase::run(ctx, &profile, &key, ask, out).await
}

/// Post, void or renew of a reserve.
async fn act(
    ctx: &Globals,
    key: &Path,
    op: Op,
    reserve_id: u128,
    amount: u64,
    timeout_ms: u64,
    acting: Acting,
) -> Result<ExitCode> {
    let ask = two_phase::Ask {
        op,
        id: acting.id.unwrap_or_else(random_id),
        to: None,
        amount,
        timeout_ms,
        reserve_id,
        party: acting.owner,
    };
    two_phase_run(ctx, key, ask, acting.out.as_deref()).await
}

#[allow(clippy::too_many_arguments)]
async fn submit(
    ctx: &Globals,
    profile: &Profile,
    key: &ed25519_dalek::SigningKey,
    op: Op,
    to: PublicKey,
    amount: u64,
    id: Option<u128>,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    let id = id.unwrap_or_else(random_id);
    let request = build_request(key, profile.chain_id_bytes()?, op, id, to, amount);
    let (confirmation, signer, chain) = submit_verified(ctx, profile, request).await?;
    if let Some(path) = &out {
        let file = ConfirmationFile::new(&confirmation, &signer).with_key_chain(&chain);
        tally_client::confirmation::write_atomically(path, &file.to_json_pretty())?;
    }
    if ctx.json {
        print!(
            "{}",
            ConfirmationFile::with_replayed(&confirmation, &signer)
                .with_key_chain(&chain)
                .to_json_pretty()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (r, rc, h) = (
        &confirmation.request,
        &confirmation.receipt,
        &confirmation.header.header,
    );
    println!(
        "confirmed {} of {} (id {}) at height {}, index {}{}",
        op.name(),
        r.amount,
        r.id,
        rc.height,
        rc.index,
        if confirmation.replayed {
            " (already applied earlier: original confirmation)"
        } else {
            ""
        }
    );
    match op {
        Op::Deposit => println!("  {} balance {}", to_hex(&r.to), rc.to_balance),
        Op::Transfer => {
            println!("  from {} balance {}", to_hex(&r.signer), rc.signer_balance);
            println!("  to   {} balance {}", to_hex(&r.to), rc.to_balance);
        }
        Op::Withdraw => println!("  {} balance {}", to_hex(&r.signer), rc.signer_balance),
        other => unreachable!("a request carries no {}", other.name()),
    }
    println!("  header {}", to_hex(&header_hash(h)));
    println!("  verified: inclusion proof and operator signature (profile's operator key)");
    if let Some(path) = &out {
        println!("  confirmation written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Submits `request` and verifies its confirmation under the key for its header's height
/// (the profile's key chain); returns it, that key and the links a file of it carries.
async fn submit_verified(
    ctx: &Globals,
    profile: &Profile,
    request: tally_wire::Request,
) -> Result<(
    tally_wire::Confirmation,
    PublicKey,
    Vec<tally_wire::KeyLink>,
)> {
    let operator = profile.operator_key()?;
    let id = request.id;
    let cluster = ctx.cluster(profile)?;
    let confirmation = cluster.submit(request).await.map_err(|e| {
        // The id is what makes a resubmission safe; say it whenever the outcome is open.
        if e.outcome_unknown() {
            anyhow::Error::from(e).context(format!(
                "request id {id}: resubmit with --id {id} to learn whether it was applied"
            ))
        } else {
            anyhow::Error::from(e).context(format!("request id {id}"))
        }
    })?;
    let (signer, chain) =
        key_chain::header_key(ctx, &cluster, &operator, &confirmation.header).await?;
    verify_confirmation(&confirmation, &signer)
        .context("the server's confirmation does not verify against the profile's operator key")?;
    consistency::track(ctx, &cluster, &operator, &confirmation.header).await?;
    Ok((confirmation, signer, chain))
}

async fn balance(ctx: &Globals, account: PublicKey, stale: bool) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let mode = if stale {
        ReadMode::Stale
    } else {
        ReadMode::Linearizable
    };
    let reply = ctx.cluster(&profile)?.balance(account, mode).await?;
    let mode_name = match reply.mode {
        ReadMode::Linearizable => "linearizable",
        ReadMode::Stale => "stale",
    };
    if ctx.json {
        println!(
            "{}",
            json!({
                "account": to_hex(&reply.account),
                "balance": reply.balance,
                "exists": reply.exists,
                "height": reply.height,
                "mode": mode_name,
            })
        );
    } else if reply.exists {
        println!(
            "{} balance {} (height {}, {mode_name})",
            to_hex(&reply.account),
            reply.balance,
            reply.height
        );
    } else {
        println!(
            "{} does not exist (balance 0; height {}, {mode_name})",
            to_hex(&reply.account),
            reply.height
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(ctx: &Globals, file: &Path, operator_key: Option<PublicKey>) -> Result<ExitCode> {
    // Which key to trust as the genesis key: the flag, else the profile's (with the chain
    // saved beside it), else (weakest) the file's own.
    let (trusted, source) = match operator_key {
        Some(key) => (
            Some(KeySchedule::genesis(key)),
            "--operator-key".to_string(),
        ),
        None => {
            let path = ctx.profile_path();
            if path.exists() {
                let profile = Profile::load(&path)?;
                (
                    Some(key_chain::saved(ctx, &profile.operator_key()?)?),
                    format!("profile {}", path.display()),
                )
            } else if ctx.profile_path.is_some() {
                bail!("profile {} does not exist", path.display());
            } else {
                (None, "the file itself".to_string())
            }
        }
    };
    let trusted = trusted.as_ref();
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    if text.contains(tally_client::envelope::ENVELOPE_CONFIRMATION_FORMAT) {
        return envelope::verify(ctx, file, &text, trusted, &source);
    }
    if text.contains(tally_client::envelope::OPERATION_CONFIRMATION_FORMAT) {
        return envelope::verify_operation(ctx, file, &text, trusted, &source);
    }
    if text.contains(tally_client::envelope::EXPIRY_CONFIRMATION_FORMAT) {
        return envelope::verify_expiry(ctx, file, &text, trusted, &source);
    }
    if text.contains(tally_client::balance_proof::BALANCE_PROOF_FORMAT) {
        return prove::verify(ctx, file, &text, trusted, &source);
    }
    if text.contains(tally_client::consistency::CONSISTENCY_FORMAT) {
        return consistency::verify(ctx, file, &text, trusted, &source);
    }
    let (c, operator) = verify_confirmation_json_under(&text, trusted)
        .with_context(|| format!("{} does not verify", file.display()))?;
    let (r, rc, h) = (&c.request, &c.receipt, &c.header.header);
    let checks = [
        "the confirmation bytes decode",
        "the request's signature verifies under its signer",
        "the receipt names the request (SHA-256 of its bytes), its operation and its height",
        "the inclusion proof leads from the receipt to the header's Merkle root",
        "the operator's signature over the header verifies",
        "the readable fields match the confirmation bytes",
    ];
    let trusted = operator_key.is_some() || source.starts_with("profile");
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "valid": true,
                "file": file.display().to_string(),
                "operator_public_key": to_hex(&operator),
                "operator_key_source": if operator_key.is_some() { "flag" } else if trusted { "profile" } else { "file" },
                "op": r.op.name(),
                "id": r.id.to_string(),
                "signer": to_hex(&r.signer),
                "to": to_hex(&r.to),
                "amount": r.amount,
                "height": rc.height,
                "index": rc.index,
                "signer_balance": rc.signer_balance,
                "to_balance": rc.to_balance,
                "header_hash": to_hex(&header_hash(h)),
                "checks": checks,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: valid", file.display());
    println!(
        "  {} of {} (id {}) by {}{}",
        r.op.name(),
        r.amount,
        r.id,
        to_hex(&r.signer),
        if r.op == Op::Withdraw {
            String::new()
        } else {
            format!(" to {}", to_hex(&r.to))
        }
    );
    println!(
        "  applied at height {}, index {} of {}; balances after: signer {}, recipient {}",
        rc.height, rc.index, h.request_count, rc.signer_balance, rc.to_balance
    );
    println!("  header {}", to_hex(&header_hash(h)));
    println!("  operator key {} (from {source})", to_hex(&operator));
    println!("  checked:");
    for check in checks {
        println!("    - {check}");
    }
    if !trusted {
        println!(
            "  note: the operator key came from the file itself, so this proves the file is \
             consistent, not who signed it; pass --operator-key or a profile to check that"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One fetched header and what checking it found.
struct Checked {
    signed: SignedHeader,
    hash: [u8; 32],
    signature_ok: bool,
    /// Whether it links to the header printed before it (None for the first one, unless it is
    /// height 1, whose previous hash must be zero).
    linked: Option<bool>,
}

async fn headers(ctx: &Globals, from: u64, limit: u64) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let operator = profile.operator_key()?;
    let chain_id = profile.chain_id_bytes()?;
    let client = ctx.cluster(&profile)?;
    let mut fetched: Vec<SignedHeader> = Vec::new();
    let mut next = from.max(1);
    while (fetched.len() as u64) < limit {
        let want = (limit - fetched.len() as u64).min(HEADERS_PER_REPLY_MAX as u64) as u16;
        let page = client.headers(next, want).await?;
        let Some(last) = page.last() else { break };
        if last.header.height < next {
            break; // no progress: do not loop on a confused server
        }
        next = last.header.height + 1;
        fetched.extend(page);
    }
    fetched.truncate(limit as usize);
    let keys = key_chain::reaching(ctx, &client, &operator, &fetched).await?;
    let mut checked: Vec<Checked> = Vec::with_capacity(fetched.len());
    for signed in fetched {
        let h = &signed.header;
        let signature_ok = h.chain_id == chain_id && keys.verify_header(&signed).is_ok();
        let linked = match checked.last() {
            Some(prev) => {
                Some(h.height == prev.signed.header.height + 1 && h.prev_hash == prev.hash)
            }
            None if h.height == 1 => Some(h.prev_hash == [0; 32]),
            None => None,
        };
        checked.push(Checked {
            hash: header_hash(h),
            signed,
            signature_ok,
            linked,
        });
    }
    let failures = checked
        .iter()
        .filter(|c| !c.signature_ok || c.linked == Some(false))
        .count();

    if ctx.json {
        let rows: Vec<_> = checked
            .iter()
            .map(|c| {
                let h = &c.signed.header;
                json!({
                    "height": h.height,
                    "hash": to_hex(&c.hash),
                    "prev_hash": to_hex(&h.prev_hash),
                    "merkle_root": to_hex(&h.merkle_root),
                    "state_digest": to_hex(&h.state_digest),
                    "request_count": h.request_count,
                    "term": h.term,
                    "time_unix_ms": h.time_unix_ms,
                    "signature": to_hex(&c.signed.signature),
                    "signature_ok": c.signature_ok,
                    "linked": c.linked,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:>8}  {:<16}  {:<16}  {:<16}  {:>5}  {:<24}  CHECK",
            "HEIGHT", "HASH", "PREV", "ROOT", "COUNT", "TIME (UTC)"
        );
        for c in &checked {
            let h = &c.signed.header;
            let check = match (c.signature_ok, c.linked) {
                (false, _) => "BAD SIGNATURE",
                (true, Some(false)) => "BROKEN LINK",
                (true, _) => "ok",
            };
            println!(
                "{:>8}  {:<16}  {:<16}  {:<16}  {:>5}  {:<24}  {check}",
                h.height,
                &to_hex(&c.hash)[..16],
                &to_hex(&h.prev_hash)[..16],
                &to_hex(&h.merkle_root)[..16],
                h.request_count,
                format_unix_ms(h.time_unix_ms),
            );
        }
        if checked.is_empty() {
            println!("(no headers from height {from})");
        }
    }
    if failures > 0 {
        eprintln!(
            "error: {failures} header(s) failed verification against the profile's operator key"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(ctx: &Globals) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    // Every replica at once, so an unreachable one costs one timeout, not one per replica.
    let results: Vec<_> = ctx
        .cluster(&profile)?
        .status_all()
        .await
        .into_iter()
        .map(|(_, result)| result)
        .collect();
    let max_height = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|s| s.applied_height))
        .max()
        .unwrap_or(0);

    if ctx.json {
        let rows: Vec<_> = profile
            .replicas
            .iter()
            .zip(&results)
            .map(|(replica, result)| match result {
                Ok(s) => json!({
                    "id": replica.id,
                    "address": replica.address,
                    "reachable": true,
                    "node_id": s.node_id,
                    "role": role_name(s.role),
                    "term": s.term,
                    "leader_id": s.leader_id,
                    "leader_client_address": s.leader_client_address,
                    "writable": s.writable,
                    "commit_index": s.commit_index,
                    "applied_index": s.applied_index,
                    "applied_height": s.applied_height,
                    "lag": max_height - s.applied_height,
                    "latest_header_hash": s.latest_header.as_ref().map(|h| to_hex(&header_hash(&h.header))),
                    "archive_height": s.archive_height,
                }),
                Err(e) => json!({
                    "id": replica.id,
                    "address": replica.address,
                    "reachable": false,
                    "error": e.to_string(),
                }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>4}  {:<21}  {:<13}  {:>6}  {:>6}  {:>8}  {:>8}  {:>8}  {:>6}  {:>8}  LATEST HEADER",
        "ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "HEIGHT", "LAG", "ARCHIVE"
    );
    for (replica, result) in profile.replicas.iter().zip(&results) {
        match result {
            Ok(s) => println!(
                "{:>4}  {:<21}  {:<13}  {:>6}  {:>6}  {:>8}  {:>8}  {:>8}  {:>6}  {:>8}  {}",
                replica.id,
                replica.address,
                role_name(s.role),
                s.term,
                s.leader_id,
                s.commit_index,
                s.applied_index,
                s.applied_height,
                max_height - s.applied_height,
                s.archive_height.map_or("-".to_string(), |h| h.to_string()),
                s.latest_header
                    .as_ref()
                    .map_or("-".to_string(), |h| to_hex(&header_hash(&h.header))),
            ),
            Err(e) => println!(
                "{:>4}  {:<21}  unreachable: {e}",
                replica.id, replica.address
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally cluster …`: one admin command, signed with the profile's admin key; prints the
/// membership the replica answers with.
async fn cluster(ctx: &Globals, command: AdminCommand) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let key = profile.load_admin_key()?;
    let name = command.name();
    let changes = command.changes_membership();
    let reply = ctx
        .cluster(&profile)?
        .admin(profile.chain_id_bytes()?, &key, command)
        .await
        .map_err(|e| {
            let e = anyhow::Error::from(e);
            if changes && matches!(e.downcast_ref::<Error>(), Some(err) if err.outcome_unknown()) {
                e.context(format!(
                    "cluster {name}: whether the change took effect is unknown; \
                     `tally cluster members` tells"
                ))
            } else {
                e.context(format!("cluster {name}"))
            }
        })?;
    if ctx.json {
        println!("{}", members_json(&reply));
    } else {
        print!("{}", members_table(&reply));
    }
    Ok(ExitCode::SUCCESS)
}

async fn info(ctx: &Globals) -> Result<ExitCode> {
    let profile = ctx.profile()?;
    let info = ctx.cluster(&profile)?.info().await?;
    let chain_matches = info.chain_id == profile.chain_id_bytes()?;
    let key_matches = info.operator_public_key == profile.operator_key()?;
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "node_id": info.node_id,
                "chain_id": to_hex(&info.chain_id),
                "operator_public_key": to_hex(&info.operator_public_key),
                "frame_bytes_max": info.frame_bytes_max,
                "reply_payload_bytes_max": info.reply_payload_bytes_max,
                "requests_in_flight_max": info.requests_in_flight_max,
                "headers_per_reply_max": info.headers_per_reply_max,
                "client_limits": info.client_limits.map(|l| json!({
                    "handshake_timeout_ms": l.handshake_timeout_ms,
                    "first_request_timeout_ms": l.first_request_timeout_ms,
                    "frame_timeout_ms": l.frame_timeout_ms,
                    "idle_timeout_ms": l.idle_timeout_ms,
                    "write_timeout_ms": l.write_timeout_ms,
                    "connections_per_address_max": l.connections_per_address_max,
                })),
                "chain_id_matches_profile": chain_matches,
                "operator_key_matches_profile": key_matches,
            }))?
        );
    } else {
        let mark = |ok: bool| {
            if ok {
                "same as the profile"
            } else {
                "NOT the profile's"
            }
        };
        println!("node {}", info.node_id);
        println!(
            "  chain id      {} ({})",
            to_hex(&info.chain_id),
            mark(chain_matches)
        );
        println!(
            "  operator key  {} ({})",
            to_hex(&info.operator_public_key),
            mark(key_matches)
        );
        println!(
            "  request frames up to {} bytes of payload",
            info.frame_bytes_max
        );
        println!(
            "  replies up to {} bytes of payload",
            info.reply_payload_bytes_max
        );
        println!(
            "  {} requests in flight per connection, {} headers per reply",
            info.requests_in_flight_max, info.headers_per_reply_max
        );
        print_client_limits(info.client_limits.as_ref());
    }
    Ok(if chain_matches && key_matches {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The deadlines and the per-address limit of `tally info`'s text output.
fn print_client_limits(limits: Option<&tally_wire::ClientLimits>) {
    let Some(l) = limits else {
        println!("  deadlines: not reported (a server older than this client)");
        return;
    };
    println!(
        "  deadlines: TLS handshake {} ms, first request {} ms, each frame {} ms, idle {} ms, \
         reading replies {} ms",
        l.handshake_timeout_ms,
        l.first_request_timeout_ms,
        l.frame_timeout_ms,
        l.idle_timeout_ms,
        l.write_timeout_ms
    );
    println!(
        "  {} connections per address (IPv4 address or IPv6 /64)",
        l.connections_per_address_max
    );
}

async fn audit(
    ctx: &Globals,
    archive: &str,
    from_checkpoint: Option<PathBuf>,
    operator_key: Option<PublicKey>,
) -> Result<ExitCode> {
    let url = tally_config::ArchiveUrl::parse(archive)
        .map_err(|e| anyhow::anyhow!("--archive {archive}: {e}"))?;
    let (operator, chain_id) = match operator_key {
        Some(key) => (key, None),
        None => {
            let profile = ctx.profile()?;
            (profile.operator_key()?, Some(profile.chain_id_bytes()?))
        }
    };
    let earlier = match &from_checkpoint {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let bucket = Bucket::open(&BucketSettings::from_url(url))?;
    let report = archive_read::audit(&bucket, chain_id.as_ref(), &operator, earlier.as_deref())
        .await
        .context("reading the archive")?;
    print_audit(ctx, &report);
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_audit(ctx: &Globals, report: &archive_read::AuditReport) {
    let errors: Vec<_> = report
        .errors
        .iter()
        .map(|e| json!({ "key": e.key, "message": e.message }))
        .collect();
    if ctx.json {
        let body = json!({
            "ok": report.ok,
            "height": report.height,
            "batches": report.batches,
            "checkpoint_size": report.checkpoint_size,
            "chain_id": report.chain_id.map(|c| to_hex(&c)),
            "snapshots": report.snapshots,
            "checkpoint_signatures": report.checkpoint_signatures,
            "key_rotations": report.key_rotations,
            "accounts": report.accounts,
            "state_map_root": report.state_map_root.map(|r| to_hex(&r)),
            "errors": errors,
        });
        println!("{body}");
        return;
    }
    for e in &report.errors {
        println!("BAD  {}: {}", e.key, e.message);
    }
    println!(
        "{}: chain {}: {} batches verified and replayed up to height {} of {} in the checkpoint; {} accounts; {} snapshots checked",
        if report.ok { "ok" } else { "FAILED" },
        report.chain_id.map_or("?".to_string(), |c| to_hex(&c)),
        report.batches,
        report.height,
        report
            .checkpoint_size
            .map_or("?".to_string(), |s| s.to_string()),
        report.accounts,
        report.snapshots,
    );
    if let Some(n) = report.checkpoint_signatures {
        println!("{n} threshold checkpoint signatures checked");
    }
}

/// `2024-05-01T12:00:00.000Z` from Unix milliseconds (proleptic Gregorian, UTC).
fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cluster_commands_parse() {
        let parse = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(["tally"].iter().chain(args)).map_err(|e| e.to_string())?;
            match cli.command {
                Command::Cluster { command } => Ok((command.admin_command(), cli.json)),
                _ => Err("not a cluster command".to_string()),
            }
        };
        assert_eq!(
            parse(&["cluster", "members", "--json"]),
            Ok((AdminCommand::Members, true))
        );
        assert_eq!(
            parse(&[
                "cluster",
                "add",
                "--id",
                "4",
                "--address",
                "127.0.0.1:7503",
                "--learner"
            ]),
            Ok((
                AdminCommand::Add {
                    id: 4,
                    address: "127.0.0.1:7503".into(),
                    client_address: String::new(),
                    learner: true
                },
                false
            ))
        );
        assert_eq!(
            parse(&[
                "cluster",
                "add",
                "--id",
                "5",
                "--address",
                "n5:7500",
                "--client-address",
                "n5:7400"
            ]),
            Ok((
                AdminCommand::Add {
                    id: 5,
                    address: "n5:7500".into(),
                    client_address: "n5:7400".into(),
                    learner: false
                },
                false
            ))
        );
        for (args, want) in [
            (["promote"], AdminCommand::Promote { id: 2 }),
            (["remove"], AdminCommand::Remove { id: 2 }),
            (["transfer-leader"], AdminCommand::TransferLeader { id: 2 }),
        ] {
            assert_eq!(parse(&["cluster", args[0], "--id", "2"]), Ok((want, false)));
        }
        for bad in [
            &["cluster", "add", "--id", "4", "--address", "no-port"][..],
            &["cluster", "add", "--id", "0", "--address", "h:1"],
            &["cluster", "add", "--address", "h:1"],
            &[
                "cluster",
                "add",
                "--id",
                "4",
                "--address",
                "h:1",
                "--client-address",
                "h:0",
            ],
            &["cluster", "remove"],
            &["cluster", "promote", "--id", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formats_times() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_unix_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
