//! Per-model inference statistics for the KServe `ModelStatistics` RPC:
//! counts and cumulative nanoseconds, lock-free.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::engine::Phases;
use crate::pb::inference::{InferStatistics, ModelStatistics, StatisticDuration};

use super::models::{Model, VERSION};

/// A count and a total duration.
#[derive(Default)]
struct Counter {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Counter {
    fn add(&self, duration: Duration) {
        self.count.fetch_add(1, Relaxed);
        self.ns.fetch_add(duration.as_nanos() as u64, Relaxed);
    }

    fn read(&self) -> Option<StatisticDuration> {
        Some(StatisticDuration {
            count: self.count.load(Relaxed),
            ns: self.ns.load(Relaxed),
        })
    }
}

/// What one model has served.
#[derive(Default)]
pub struct ModelStats {
    last_inference_ms: AtomicU64,
    success: Counter,
    fail: Counter,
    queue: Counter,
    compute_input: Counter,
    compute_infer: Counter,
    compute_output: Counter,
}

/// The time each stage of one successful request took.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stages {
    /// Decoding and validating the input.
    pub input: Duration,
    /// Waiting for, and running, the layer.
    pub layer: Phases,
    /// Building the response.
    pub output: Duration,
}

impl ModelStats {
    /// Records one request that took `total` in the server.
    pub fn record(&self, succeeded: bool, total: Duration, stages: &Stages) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.fetch_max(now_ms, Relaxed);
        if !succeeded {
            self.fail.add(total);
            return;
        }
        self.success.add(total);
        self.queue.add(stages.layer.queue);
        self.compute_input.add(stages.input);
        self.compute_infer.add(stages.layer.compute);
        self.compute_output.add(stages.output);
    }

    pub fn snapshot(&self, model: Model) -> ModelStatistics {
        // Each request is one inference in one execution: layerd does not batch.
        let success = self.success.count.load(Relaxed);
        ModelStatistics {
            name: model.name(),
            version: VERSION.to_string(),
            last_inference: self.last_inference_ms.load(Relaxed),
            inference_count: success,
            execution_count: success,
            inference_stats: Some(InferStatistics {
                success: self.success.read(),
                fail: self.fail.read(),
                queue: self.queue.read(),
                compute_input: self.compute_input.read(),
                compute_infer: self.compute_infer.read(),
                compute_output: self.compute_output.read(),
                cache_hit: Some(StatisticDuration::default()),
                cache_miss: Some(StatisticDuration::default()),
            }),
        }
    }
}
