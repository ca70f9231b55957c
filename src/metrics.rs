//! Prometheus metrics: what layerd counts, and the `/metrics` endpoint that
//! serves them (`--metrics-addr`, off unless set).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `layerd_calls_total` | counter | `method`, `kind`, `code` |
//! | `layerd_call_duration_seconds` | histogram | `method`, `kind` |
//! | `layerd_sessions_open` | gauge | |
//! | `layerd_sessions_ended_total` | counter | `cause`: `closed` (CloseSession, sequence_end), `idle` (expired) |
//! | `layerd_kept_bytes` | gauge | |
//! | `layerd_tensor_bytes_total` | counter | `direction`: `in`, `out` |
//! | `layerd_calls_in_flight` | gauge | |
//! | `layerd_calls_shed_total` | counter | |
//! | `layerd_connections_open` | gauge | |
//! | `layerd_connections_refused_total` | counter | |
//! | `layerd_shm_regions` | gauge | |
//!
//! `method` is the RPC (`Forward`, `Run.Backward`, `ModelInfer`, ...), `kind`
//! the layer kind once known (else ""), `code` the gRPC status code name as
//! gRPC spells it (`OK`, `NotFound`, ...). A session limit refuses new
//! sessions (RESOURCE_EXHAUSTED, counted in `layerd_calls_total`); it never
//! evicts open ones.
//!
//! The facade is the `metrics` crate; the process-wide recorder is
//! `metrics-exporter-prometheus`, installed once however many servers the
//! process runs. Without it (no `--metrics-addr`) recording is a no-op.

use std::{
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use axum::{routing::get, Router};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tonic::Code;

const CALLS: &str = "layerd_calls_total";
const CALL_DURATION: &str = "layerd_call_duration_seconds";
const SESSIONS_OPEN: &str = "layerd_sessions_open";
const SESSIONS_ENDED: &str = "layerd_sessions_ended_total";
const KEPT_BYTES: &str = "layerd_kept_bytes";
const TENSOR_BYTES: &str = "layerd_tensor_bytes_total";
const CALLS_IN_FLIGHT: &str = "layerd_calls_in_flight";
const CALLS_SHED: &str = "layerd_calls_shed_total";
const CONNECTIONS_OPEN: &str = "layerd_connections_open";
const CONNECTIONS_REFUSED: &str = "layerd_connections_refused_total";
const SHM_REGIONS: &str = "layerd_shm_regions";
const STORE_UP: &str = "layerd_store_up";
const STORE_WRITES: &str = "layerd_store_writes_total";
const STORE_WRITE_DURATION: &str = "layerd_store_write_duration_seconds";
const STORE_WRITTEN_BYTES: &str = "layerd_store_written_bytes_total";
const STORE_ERRORS: &str = "layerd_store_errors_total";
const STORE_FENCED: &str = "layerd_store_fenced_writes_total";
const STORE_HANDOVERS: &str = "layerd_store_handovers_total";
const STORE_SESSIONS_HELD: &str = "layerd_store_sessions_held";

/// Call duration buckets: 50 µs to 30 s, covering 1 Ki calls to 64 MiB ones.
const DURATION_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 30.0,
];

/// gRPC code names as gRPC spells them, indexed by code number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The process-wide recorder's handle, installed by the first caller.
pub fn recorder() -> Result<PrometheusHandle, String> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut handle = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = handle.as_ref() {
        return Ok(handle.clone());
    }
    let installed = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CALL_DURATION.into()), &DURATION_BUCKETS)
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(STORE_WRITE_DURATION.into()),
                &DURATION_BUCKETS,
            )
        })
        .and_then(|builder| builder.install_recorder())
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    *handle = Some(installed.clone());
    Ok(installed)
}

fn describe() {
    describe_counter!(
        CALLS,
        "RPCs (and Run steps) finished, by method, layer kind and status code"
    );
    describe_histogram!(
        CALL_DURATION,
        Unit::Seconds,
        "Time from request to answer, by method and layer kind"
    );
    describe_gauge!(SESSIONS_OPEN, "Sessions open (native and KServe sequences)");
    describe_counter!(
        SESSIONS_ENDED,
        "Sessions ended, by cause: closed or idle (expired)"
    );
    describe_gauge!(
        KEPT_BYTES,
        Unit::Bytes,
        "Bytes of state kept for Backward, all sessions"
    );
    describe_counter!(
        TENSOR_BYTES,
        Unit::Bytes,
        "Tensor bytes received (in) and sent (out)"
    );
    describe_gauge!(
        CALLS_IN_FLIGHT,
        "Calls (streams count once) holding a --max-concurrent-calls slot"
    );
    describe_counter!(
        CALLS_SHED,
        "Calls refused UNAVAILABLE (OVERLOADED) at --max-concurrent-calls, not run"
    );
    describe_gauge!(CONNECTIONS_OPEN, "Client connections open");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed on accept at --max-connections"
    );
    describe_gauge!(
        SHM_REGIONS,
        "System shared-memory regions registered (--allow-client-shm), all clients"
    );
    describe_gauge!(
        STORE_UP,
        "1 while the session store (--session-store) answers the heartbeat, else 0"
    );
    describe_counter!(STORE_WRITES, "Session states written to the session store");
    describe_histogram!(
        STORE_WRITE_DURATION,
        Unit::Seconds,
        "Time the session store took to acknowledge a write"
    );
    describe_counter!(
        STORE_WRITTEN_BYTES,
        Unit::Bytes,
        "Bytes of session state written to the session store"
    );
    describe_counter!(
        STORE_ERRORS,
        "Session store commands that failed (store unreachable or erroring)"
    );
    describe_counter!(
        STORE_FENCED,
        "Writes the session store refused because another replica holds the session"
    );
    describe_counter!(
        STORE_HANDOVERS,
        "Sessions moved between replicas: in (handed over by a live holder), out (handed over to another), takeover (from a dead holder's stored state)"
    );
    describe_gauge!(
        STORE_SESSIONS_HELD,
        "Sessions this replica holds in the session store"
    );
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                // Drains histogram samples into their buckets.
                handle.run_upkeep();
                handle.render()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

tokio::task_local! {
    /// The layer kind's name of the call being observed, once the handler knows it.
    static CALL_KIND: Arc<OnceLock<&'static str>>;
}

/// Runs `call`, a whole RPC, so that [`note_kind`] inside it labels its
/// metrics; returns its output and the kind noted.
pub async fn with_kind<T>(call: impl Future<Output = T>) -> (T, Option<&'static str>) {
    let kind = Arc::new(OnceLock::new());
    let output = CALL_KIND.scope(kind.clone(), call).await;
    (output, kind.get().copied())
}

/// Labels the current call's metrics with the layer kind `kind` (its name:
/// metrics know labels, not layer types).
pub fn note_kind(kind: &'static str) {
    let _ = CALL_KIND.try_with(|noted| noted.set(kind));
}

/// One finished call; `kind` is the layer kind's name, if the call had one.
pub fn call(method: &'static str, kind: Option<&'static str>, code: Code, elapsed: Duration) {
    let kind = kind.unwrap_or("");
    let code = CODE_NAMES.get(code as usize).copied().unwrap_or("Unknown");
    counter!(CALLS, "method" => method, "kind" => kind, "code" => code).increment(1);
    histogram!(CALL_DURATION, "method" => method, "kind" => kind).record(elapsed.as_secs_f64());
}

/// Tensor bytes received or sent.
pub fn tensor_bytes(direction: Direction, bytes: usize) {
    let direction = match direction {
        Direction::In => "in",
        Direction::Out => "out",
    };
    counter!(TENSOR_BYTES, "direction" => direction).increment(bytes as u64);
}

#[derive(Debug, Clone, Copy)]
pub enum Direction {
    In,
    Out,
}

/// A session opened.
pub fn session_opened() {
    gauge!(SESSIONS_OPEN).increment(1.0);
}

/// Sessions ended, closed by a client or expired.
pub fn sessions_ended(cause: EndCause, count: usize) {
    if count == 0 {
        return;
    }
    let cause = match cause {
        EndCause::Closed => "closed",
        EndCause::Idle => "idle",
    };
    gauge!(SESSIONS_OPEN).decrement(count as f64);
    counter!(SESSIONS_ENDED, "cause" => cause).increment(count as u64);
}

#[derive(Debug, Clone, Copy)]
pub enum EndCause {
    Closed,
    Idle,
}

/// Kept-state bytes reserved (positive) or released (negative).
pub fn kept_bytes_changed(delta: i64) {
    gauge!(KEPT_BYTES).increment(delta as f64);
}

/// Calls holding an in-flight slot: `delta` is +1 or -1.
pub fn calls_in_flight(delta: i8) {
    gauge!(CALLS_IN_FLIGHT).increment(f64::from(delta));
}

/// A call shed at the concurrency limit.
pub fn call_shed() {
    counter!(CALLS_SHED).increment(1);
}

/// Connections open: `delta` is +1 or -1.
pub fn connections_open(delta: i8) {
    gauge!(CONNECTIONS_OPEN).increment(f64::from(delta));
}

/// A connection closed on accept at the connection cap.
pub fn connection_refused() {
    counter!(CONNECTIONS_REFUSED).increment(1);
}

/// Shared-memory regions registered now.
pub fn shm_regions(count: usize) {
    gauge!(SHM_REGIONS).set(count as f64);
}

/// Whether the session store answered the last heartbeat.
pub fn store_up(up: bool) {
    gauge!(STORE_UP).set(if up { 1.0 } else { 0.0 });
}

/// A session state written to the session store.
pub fn store_write(elapsed: Duration, bytes: usize) {
    counter!(STORE_WRITES).increment(1);
    counter!(STORE_WRITTEN_BYTES).increment(bytes as u64);
    histogram!(STORE_WRITE_DURATION).record(elapsed.as_secs_f64());
}

/// A session store command that failed.
pub fn store_error() {
    counter!(STORE_ERRORS).increment(1);
}

/// A write refused by fencing.
pub fn store_fenced() {
    counter!(STORE_FENCED).increment(1);
}

/// A session moved: `direction` is "in", "out" or "takeover".
pub fn store_handover(direction: &'static str) {
    counter!(STORE_HANDOVERS, "direction" => direction).increment(1);
}

/// Sessions this replica holds in the session store now.
pub fn store_sessions_held(count: usize) {
    gauge!(STORE_SESSIONS_HELD).set(count as f64);
}
