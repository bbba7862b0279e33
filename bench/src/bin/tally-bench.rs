//! `tally-bench`: load a tally operator and report throughput, latency and the machine's bound.

use anyhow::Result;
use clap::Parser;
use tally_bench::Args;

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(accounts) = args.snapshot_accounts {
        let sizes = tally_bench::archive::snapshot_sizes(accounts, args.snapshot_change, 7);
        println!("{}", serde_json::to_string_pretty(&sizes)?);
        return Ok(());
    }
    if let Some(accounts) = args.state_map_accounts {
        let cost = tally_bench::state_map::state_map_cost(
            accounts,
            args.state_map_changes,
            args.state_map_rounds,
            7,
        );
        println!("{}", serde_json::to_string_pretty(&cost)?);
        return Ok(());
    }
    if let Some(n) = args.threshold_signers {
        anyhow::ensure!(
            2 <= args.threshold_min && args.threshold_min <= n,
            "--threshold-min must be between 2 and --threshold-signers"
        );
        let cost =
            tally_bench::threshold::threshold_cost(n, args.threshold_min, args.threshold_rounds);
        println!("{}", serde_json::to_string_pretty(&cost)?);
        return Ok(());
    }
    let report = tally_bench::run(&args)?;
    if let Some(path) = &args.json {
        tally_bench::write_json(&report, path)?;
    }
    print!("{}", report.to_markdown());
    Ok(())
}
