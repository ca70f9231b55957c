//! Turns measured figures into the end-of-run table and the JSON report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::args::{Kind, Protocol, RunArgs, SharedMemory};
use crate::workload::Measured;

/// Everything one run measured, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub label: String,
    pub addr: String,
    pub mode: String,
    pub kind: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub elements: u64,
    pub connections: usize,
    pub concurrency: usize,
    /// Open-loop target rate in calls/s; null for closed loop.
    pub rate: Option<f64>,
    pub seconds: f64,
    pub calls: u64,
    pub calls_per_s: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub mb_per_s_sent: f64,
    pub mb_per_s_received: f64,
    pub latency_us: Latency,
    /// Latency of the failed calls (all zero without any).
    #[serde(default)]
    pub error_latency_us: Latency,
    pub errors: BTreeMap<String, u64>,
    pub error_examples: BTreeMap<String, String>,
    pub mismatches: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &hdrhistogram::Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// The JSON file: every run of one invocation.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub runs: Vec<Summary>,
}

impl Report {
    pub fn new(runs: Vec<Summary>) -> Report {
        Report {
            tool: "layerd-bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            runs,
        }
    }
}

/// The mode as reports name it: `train`, or `kserve train` / `kserve forward shm`.
fn mode_name(args: &RunArgs) -> String {
    let mode = format!("{:?}", args.mode).to_lowercase();
    match (args.protocol, args.shared_memory) {
        (Protocol::Layerd, _) => mode,
        (Protocol::Kserve, SharedMemory::None) => format!("kserve {mode}"),
        (Protocol::Kserve, SharedMemory::System) => format!("kserve {mode} shm"),
    }
}

impl Summary {
    pub fn new(args: &RunArgs, kind: Kind, shape: &[u64], measured: &Measured) -> Summary {
        let seconds = measured.seconds.max(1e-9);
        Summary {
            label: args.label.clone(),
            addr: args.addr.clone(),
            mode: mode_name(args),
            kind: kind.name().into(),
            dtype: format!("{:?}", args.dtype).to_lowercase(),
            shape: shape.to_vec(),
            elements: shape.iter().product(),
            connections: args.connections,
            concurrency: args.concurrency,
            rate: args.rate,
            seconds: measured.seconds,
            calls: measured.calls,
            calls_per_s: measured.calls as f64 / seconds,
            bytes_sent: measured.bytes_sent,
            bytes_received: measured.bytes_received,
            mb_per_s_sent: measured.bytes_sent as f64 / seconds / 1e6,
            mb_per_s_received: measured.bytes_received as f64 / seconds / 1e6,
            latency_us: Latency::of(&measured.latency_us),
            error_latency_us: Latency::of(&measured.error_latency_us),
            errors: measured.errors.clone(),
            error_examples: measured.error_examples.clone(),
            mismatches: measured.mismatches,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The human-readable end-of-run table.
    pub fn table(&self) -> String {
        let loop_kind = match self.rate {
            Some(rate) => format!("open loop at {rate:.0} calls/s"),
            None => "closed loop".into(),
        };
        let errors = if self.errors.is_empty() {
            "0".to_string()
        } else {
            self.errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = format!(
            "layerd-bench: {} {} {} {:?} against {} ({}), {} connection(s) x {} concurrent, {}\n",
            self.mode,
            self.kind,
            self.dtype,
            self.shape,
            self.addr,
            self.label,
            self.connections,
            self.concurrency,
            loop_kind
        );
        let l = &self.latency_us;
        let rows = [
            ("measured", format!("{:.2} s", self.seconds)),
            (
                "calls",
                format!("{} ({:.0} calls/s)", self.calls, self.calls_per_s),
            ),
            (
                "sent",
                format!(
                    "{:.1} MB ({:.1} MB/s)",
                    self.bytes_sent as f64 / 1e6,
                    self.mb_per_s_sent
                ),
            ),
            (
                "received",
                format!(
                    "{:.1} MB ({:.1} MB/s)",
                    self.bytes_received as f64 / 1e6,
                    self.mb_per_s_received
                ),
            ),
            (
                "latency (us)",
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    l.p50, l.p90, l.p99, l.p999, l.max
                ),
            ),
            ("errors", errors),
            (
                "failed (us)",
                format!(
                    "p50 {}  p99 {}  max {}",
                    self.error_latency_us.p50, self.error_latency_us.p99, self.error_latency_us.max
                ),
            ),
            ("mismatches", self.mismatches.to_string()),
        ];
        for (name, value) in rows {
            text.push_str(&format!("  {name:<13} {value}\n"));
        }
        for (code, example) in &self.error_examples {
            text.push_str(&format!("  e.g. {code}: {example}\n"));
        }
        text
    }
}

/// A markdown table of sweep results.
pub fn sweep_table(runs: &[Summary]) -> String {
    let mut text = String::from(
        "| server | kind | elements | calls/s | MB/s sent | MB/s received | p50 us | p99 us | errors | mismatches |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        text.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |\n",
            r.label,
            r.kind,
            r.elements,
            r.calls_per_s,
            r.mb_per_s_sent,
            r.mb_per_s_received,
            r.latency_us.p50,
            r.latency_us.p99,
            r.error_count(),
            r.mismatches
        ));
    }
    text
}
