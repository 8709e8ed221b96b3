//! `taskd-bench`: runs the taskd benchmark workloads (W1 throughput, W2 latency, W3
//! concurrency, Scaling) against a broker and worker processes it starts itself on 127.0.0.1,
//! and prints a Markdown table (or JSON with `--json`).
//!
//! `taskd-bench worker ...` is the worker process the benchmark starts (itself, re-executed).

mod broker;
mod cli;
mod procs;
mod report;
mod run;
mod workers;
mod workloads;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Cli, Command, RunArgs};
use crate::report::{Machine, Report};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Workers log errors only: reconnect warnings during the restart measurement are expected.
    let default_level = match cli.command {
        Some(Command::Worker(_)) => "error",
        None => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TASKD_BENCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let flavour = match &cli.command {
        Some(Command::Worker(args)) => args.runtime,
        None => cli.run.client_runtime,
    };
    let runtime = match flavour.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskd-bench: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Worker(args)) => runtime.block_on(workers::worker_main(args)),
        None => runtime.block_on(bench(cli.run)),
    };
    // Dropping the runtime after block_on returned: every guard has already run.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskd-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The benchmark run: every workload, then the table (and JSON).
async fn bench(args: RunArgs) -> Result<()> {
    let params = args.params()?;
    let taskd = match &args.taskd {
        Some(p) => p.clone(),
        None => procs::sibling_binary("taskd")?,
    };
    let machine = Machine::detect();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let results = tokio::select! {
        r = run::run_all(&params, &taskd) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    };
    let report = Report {
        date,
        machine,
        params,
        results,
    };
    let table = report.table();
    if args.json {
        eprintln!("{table}");
        let json = serde_json::to_string_pretty(&report).context("encoding the results")?;
        println!("{json}");
    } else {
        println!("{table}");
    }
    Ok(())
}
