//! `taskctl`: the command-line client of taskd. See `taskctl --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
