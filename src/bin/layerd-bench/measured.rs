//! One workload's figures, gathered from every worker: calls, bytes,
//! latencies, errors by code and mismatches against the reference.

use std::{collections::BTreeMap, time::Instant};

use hdrhistogram::Histogram;
use tonic::{Code, Status};

/// One workload's measured figures, from every worker.
pub struct Measured {
    pub seconds: f64,
    pub calls: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub latency_us: Histogram<u64>,
    /// Latency of the calls that failed (e.g. shed under overload).
    pub error_latency_us: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub error_examples: BTreeMap<String, String>,
    pub mismatches: u64,
}

impl Measured {
    pub(crate) fn new() -> Measured {
        Measured {
            seconds: 0.0,
            calls: 0,
            bytes_sent: 0,
            bytes_received: 0,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            error_latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid bounds"),
            errors: BTreeMap::new(),
            error_examples: BTreeMap::new(),
            mismatches: 0,
        }
    }

    pub(crate) fn merge(&mut self, other: Measured) {
        self.calls += other.calls;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.latency_us.add(&other.latency_us).expect("same bounds");
        self.error_latency_us
            .add(&other.error_latency_us)
            .expect("same bounds");
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (code, example) in other.error_examples {
            self.error_examples.entry(code).or_insert(example);
        }
        self.mismatches += other.mismatches;
    }

    /// A measured call sent at `sent` that failed with `status` at `done`.
    pub(crate) fn error(&mut self, sent: Instant, status: &Status, done: Instant) {
        let code = code_name(status.code());
        *self.errors.entry(code.clone()).or_default() += 1;
        let micros = done.duration_since(sent).as_micros().max(1) as u64;
        self.error_latency_us.saturating_record(micros);
        self.error_examples
            .entry(code)
            .or_insert_with(|| status.message().to_string());
    }

    /// A measured call that answered (`right` or not) at `done`.
    pub(crate) fn call(
        &mut self,
        sent: Instant,
        done: Instant,
        bytes_sent: usize,
        bytes_received: usize,
        right: bool,
    ) {
        if !right {
            self.mismatches += 1;
        }
        self.calls += 1;
        self.bytes_sent += bytes_sent as u64;
        self.bytes_received += bytes_received as u64;
        let micros = done.duration_since(sent).as_micros().max(1) as u64;
        self.latency_us.saturating_record(micros);
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}
