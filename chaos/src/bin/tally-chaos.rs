//! `tally-chaos`: disrupt a tally cluster under load and check that nothing is lost.
//! Exit status: 0 when every invariant holds, 1 when one fails, 2 when the harness itself fails.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = tally_chaos::cli::Args::parse();
    match tally_chaos::cli::run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tally-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}
