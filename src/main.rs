//! The `hyperloop` binary: parse arguments, set up logging, call the library, map errors to exit
//! statuses.

use std::process::ExitCode;

use clap::Parser;

use hyperloop::cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 for usage errors and 0 for --help/--version, as CONTRACT §1 wants.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let _ = cli;
    ExitCode::from(1)
}
