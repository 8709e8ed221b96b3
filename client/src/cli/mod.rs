//! `taskctl`: parse the command line, run one subcommand, map errors to one stderr line and a
//! documented exit status.

mod args;
mod commands;
mod output;
mod render;

use std::process::ExitCode;

use clap::Parser;
use taskd_client::Error;

pub(crate) use args::Cli;

/// Exit statuses (documented in `taskctl --help`).
pub(crate) mod exit {
    pub(crate) const OK: u8 = 0;
    pub(crate) const TASK_FAILED: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const CONNECTION: u8 = 3;
    pub(crate) const UNAUTHENTICATED: u8 = 4;
    pub(crate) const NOT_FOUND: u8 = 5;
    pub(crate) const TIMEOUT: u8 = 6;
    pub(crate) const BROKER: u8 = 7;
    /// A bug in taskctl (a panic); never expected.
    pub(crate) const INTERNAL: u8 = 70;
}

/// An error that ends taskctl: one line on stderr and an exit status.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl CliError {
    pub(crate) fn usage(message: impl Into<String>) -> CliError {
        CliError {
            code: exit::USAGE,
            message: message.into(),
        }
    }
}

/// The exit status that fits an SDK error.
pub(crate) fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Connection { .. } => exit::CONNECTION,
        Error::Unauthenticated(_) => exit::UNAUTHENTICATED,
        Error::InvalidArgument(_) | Error::ResourceExhausted(_) | Error::Decode(_) => exit::USAGE,
        Error::NotFound(_) => exit::NOT_FOUND,
        Error::Timeout(_) => exit::TIMEOUT,
        Error::TaskFailed { .. } | Error::Cancelled { .. } => exit::TASK_FAILED,
        _ => exit::BROKER,
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> CliError {
        CliError {
            code: exit_code(&e),
            message: e.to_string(),
        }
    }
}

/// Runs taskctl and returns its exit status.
pub(crate) fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("taskctl: internal error (please report): {info}");
        std::process::exit(i32::from(exit::INTERNAL));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(clap_error(e)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskctl: error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("taskctl: error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// Prints help/version as clap does; any other parse error as one line; returns the status.
fn clap_error(e: clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                exit::USAGE
            } else {
                exit::OK
            }
        }
        _ => {
            let rendered = e.render().to_string();
            // The message is the text before clap's "Usage:" block, on one line.
            let line = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let line = line.trim_start_matches("error: ");
            let line = if line.is_empty() {
                "invalid command line"
            } else {
                line
            };
            eprintln!("taskctl: error: {line} (see taskctl --help)");
            exit::USAGE
        }
    }
}
