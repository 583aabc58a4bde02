//! The `hyperloop` binary: parse arguments, set up logging, call the library, map errors to exit
//! statuses (0 ran, 1 failed, 2 bad input, 3 `run` stopped with work left).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use hyperloop::cli::Cli;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(hyperloop::worker::supervisor::COMMAND) {
        let code = hyperloop::worker::supervisor::main(&args[2..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { hyperloop::secrets::seal_process() };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 for usage errors and 0 for --help/--version, as CONTRACT §1 wants.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match hyperloop::app::run(&cli.command, &cli.global) {
        Ok(outcome) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(outcome.stdout.as_bytes());
            let _ = out.flush();
            ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1))
        }
        Err(e) => {
            let code = e.exit_code();
            if hyperloop::action::ActionsEnv::from_env().is_some()
                && let Some(annotation) = hyperloop::action::annotate(&e)
            {
                // Workflow commands are read from standard output; the plain message below
                // still goes to standard error for people reading the log.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{annotation}");
                let _ = out.flush();
            }
            let mut err = std::io::stderr().lock();
            if code == 0 {
                let _ = writeln!(err, "hyperloop: {e}");
            } else {
                let _ = writeln!(err, "error: {e}");
            }
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
