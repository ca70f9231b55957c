//! layerd-bench: a verifying gRPC load generator for layerd.
//!
//! It drives Forward/Backward traffic over N connections x M concurrent
//! calls (layerd.v1, or the KServe v2 / Triton protocol with `--protocol
//! kserve`), checks every answer against a local reference, and reports
//! throughput and latency percentiles (see `--help`).

mod args;
mod chart;
mod kserve;
mod measured;
mod network;
mod reference;
mod report;
mod trainable;
mod workload;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, RunArgs};
use report::{Report, Summary};
use workload::SetupError;

fn main() -> ExitCode {
    // The client, too, allocates and frees buffers of megabytes per call: the
    // server's allocator settings spare it a page fault per page of each.
    // Before the runtime's threads exist.
    layerd::allocator::tune();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Chart(chart)) => merge_charts(&chart),
        None => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(run(&cli.run)),
            Err(error) => Err(format!("cannot start the runtime: {error}")),
        },
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("layerd-bench: {message}");
            ExitCode::from(1)
        }
    }
}

/// One run, or a sweep of runs; prints the table(s), writes JSON and chart.
async fn run(args: &RunArgs) -> Result<ExitCode, String> {
    if args.mode == args::Mode::TrainStep {
        return train_step(args).await;
    }
    if args.sweep.is_none() && args.kind.len() > 1 {
        return Err("several --kind values need --sweep".into());
    }
    let mut summaries = Vec::new();
    for &kind in &args.kind {
        let sizes: Vec<Vec<u64>> = match &args.sweep {
            Some(_) if trainable::default_shape(kind).is_some() => {
                return Err(format!(
                    "--sweep drives 1-D tensors; {kind} takes a shape of its own (--shape)"
                ))
            }
            Some(sizes) => sizes.iter().map(|&n| vec![n]).collect(),
            None => vec![match (&args.shape, trainable::default_shape(kind)) {
                (None, Some(shape)) => shape,
                _ => args.shape(),
            }],
        };
        for shape in &sizes {
            let measured = match workload::run(args, kind, shape).await {
                Ok(measured) => measured,
                Err(error) => return setup_failed(error),
            };
            let summary = Summary::new(args, kind, shape, &measured);
            if args.sweep.is_none() {
                print!("{}", summary.table());
            } else {
                eprintln!(
                    "{} {} {}: {:.0} calls/s, p99 {} us",
                    summary.label,
                    summary.kind,
                    summary.elements,
                    summary.calls_per_s,
                    summary.latency_us.p99
                );
            }
            summaries.push(summary);
        }
    }
    if args.sweep.is_some() {
        print!("{}", report::sweep_table(&summaries));
    }
    finish(args, summaries)
}

/// Writes the JSON and the chart, and says how the run ended.
fn finish(args: &RunArgs, summaries: Vec<Summary>) -> Result<ExitCode, String> {
    if let Some(path) = &args.json {
        let json =
            serde_json::to_string_pretty(&Report::new(summaries.clone())).expect("serialisable");
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(prefix) = &args.chart {
        chart::write(&summaries, prefix)?;
        eprintln!("chart: {} and .png", prefix.with_extension("svg").display());
    }
    let mismatches: u64 = summaries.iter().map(|s| s.mismatches).sum();
    let errors: u64 = summaries.iter().map(Summary::error_count).sum();
    Ok(if mismatches > 0 {
        eprintln!("layerd-bench: {mismatches} answers differed from the reference");
        ExitCode::from(3)
    } else if errors > 0 && !args.allow_errors {
        eprintln!("layerd-bench: {errors} calls failed");
        ExitCode::from(4)
    } else {
        ExitCode::SUCCESS
    })
}

/// `--mode train-step`: one run of the named network.
async fn train_step(args: &RunArgs) -> Result<ExitCode, String> {
    let measured = match network::run(args, args.network).await {
        Ok(measured) => measured,
        Err(error) => return setup_failed(error),
    };
    let mut summary = Summary::new(
        args,
        args::Kind::Sequential,
        &args.network.x_shape(),
        &measured,
    );
    summary.kind = format!("network {}", args.network.name());
    print!("{}", summary.table());
    finish(args, vec![summary])
}

/// How a run that could not start ends: exit 2 when the server cannot be
/// reached, else an error message (exit 1).
fn setup_failed(error: SetupError) -> Result<ExitCode, String> {
    match error {
        SetupError::Unfit(message) => Err(message),
        SetupError::Unreachable(message) => {
            eprintln!("layerd-bench: {message}");
            Ok(ExitCode::from(2))
        }
        SetupError::Rejected(status) => Err(format!(
            "the server refused to set up the run: {}",
            layerd::client::status_text(&status)
        )),
    }
}

fn merge_charts(args: &args::ChartArgs) -> Result<ExitCode, String> {
    let mut runs = Vec::new();
    for path in &args.inputs {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let report: Report =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        runs.extend(report.runs);
    }
    chart::write(&runs, &args.out)?;
    Ok(ExitCode::SUCCESS)
}
