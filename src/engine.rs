//! The compute path both protocols share (the native handlers in
//! [`crate::service`] and the KServe ones in [`crate::kserve`]): Forward and
//! Backward on a layer instance, the request timeout with tracing and metrics
//! around each call, where computations run, and in-order stream answering.
//!
//! Invariant: a call validates everything before it touches a session,
//! computes without holding any lock but its own layer instance's, and commits
//! kept state only after the computation succeeded — so a failed, timed-out
//! or cancelled call leaves the session as it was.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataMap, Code, Status, Streaming};
use tracing::{field, Instrument, Span};

use crate::error::Error;
use crate::metrics;
use crate::session::{KeptEntry, LayerInstance, Session};
use crate::tensor::Tensor;

/// The metadata key load balancers hash on to route a session to its replica.
pub const SESSION_HEADER: &str = "x-session-id";

/// Tensors up to this many elements are computed on the async executor;
/// larger ones on the blocking pool, so small calls are not starved behind
/// them. At this size a ReLU or Sigmoid takes some tens of microseconds.
const INLINE_COMPUTE_MAX_ELEMENTS: usize = 16 * 1024;

/// Answers a stream (Run, ModelStreamInfer) may compute ahead of a slow reader.
const STREAM_BUFFER: usize = 4;

/// A span for one RPC; `kind`, `elements` and `code` are filled in as known.
pub fn rpc_span(method: &'static str, session_id: &str, layer_id: &str) -> Rpc {
    let span = tracing::info_span!(
        "rpc",
        method,
        session = session_id,
        layer = layer_id,
        kind = field::Empty,
        elements = field::Empty,
        code = field::Empty,
    );
    Rpc { method, span }
}

/// If the request carries `x-session-id`, it must name the message's session.
pub fn check_routing(metadata: &MetadataMap, session_id: &str) -> Result<(), Error> {
    let Some(header) = metadata.get(SESSION_HEADER) else {
        return Ok(());
    };
    if header.as_bytes() == session_id.as_bytes() {
        return Ok(());
    }
    Err(Error::invalid(
        SESSION_HEADER,
        format!("the request's session_id {session_id:?} (the header routes the call)"),
        format!("{:?}", String::from_utf8_lossy(header.as_bytes())),
        "SESSION_HEADER_MISMATCH",
    ))
}

/// One RPC (or stream step) being observed: its method name and its span.
pub struct Rpc {
    pub method: &'static str,
    pub span: Span,
}

/// Runs one call (or stream step) in its span under `request_timeout`, and
/// records its outcome on the span and in the metrics.
pub async fn observe<T>(
    request_timeout: Duration,
    rpc: Rpc,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let Rpc { method, span } = rpc;
    let started = Instant::now();
    let (result, kind) = metrics::with_kind(tokio::time::timeout(
        request_timeout,
        call.instrument(span.clone()),
    ))
    .await;
    let result = result.unwrap_or(Err(Error::Timeout(request_timeout)));
    let code = result.as_ref().map_or_else(Error::code, |_| Code::Ok);
    span.record("code", field::debug(code));
    let elapsed = started.elapsed();
    metrics::call(method, kind, code, elapsed);
    let micros = elapsed.as_micros() as u64;
    span.in_scope(|| match &result {
        Ok(_) => tracing::debug!(micros, "ok"),
        Err(error @ Error::Internal(_)) => tracing::error!(micros, %error, "failed"),
        Err(error) => tracing::info!(micros, %error, "failed"),
    });
    result
}

/// Where a Forward or Backward spent its time, for the KServe statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    /// Waiting for the layer instance (held by an earlier call of its session).
    pub queue: Duration,
    /// The layer's computation.
    pub compute: Duration,
}

/// Forward on one layer instance. Unless `no_grad`, reserves the bytes to
/// keep before computing and replaces the kept state only once the
/// computation succeeded.
pub async fn forward_on(
    session: &Session,
    layer: &LayerInstance,
    x: Tensor,
    no_grad: bool,
    phases: &mut Phases,
) -> Result<Tensor, Error> {
    let kind = layer.kind;
    let queued = Instant::now();
    let mut kept = layer.kept.lock().await;
    let computing = Instant::now();
    phases.queue = computing - queued;
    let y = if no_grad {
        compute(x.len(), move || kind.forward_no_grad(&x)).await?
    } else {
        // Reserved before computing; both old and new state exist until the commit.
        let charge = session.reserve(kind.kept_bytes(x.dtype(), x.len()))?;
        let (y, state) = compute(x.len(), move || kind.forward(&x)).await?;
        *kept = Some(Arc::new(KeptEntry::new(state, charge)));
        y
    };
    phases.compute = computing.elapsed();
    Ok(y)
}

/// Backward on one layer instance, from what its last Forward kept.
pub async fn backward_on(
    layer: &LayerInstance,
    layer_id: &str,
    dout: Tensor,
    phases: &mut Phases,
) -> Result<Tensor, Error> {
    let queued = Instant::now();
    let kept = layer.kept.lock().await;
    let computing = Instant::now();
    phases.queue = computing - queued;
    let entry = kept.clone().ok_or_else(|| Error::NothingKept {
        layer_id: layer_id.to_string(),
    })?;
    let dx = compute(dout.len(), move || entry.kept.backward(&dout)).await??;
    drop(kept);
    phases.compute = computing.elapsed();
    Ok(dx)
}

/// Answers the requests of a bidirectional stream one at a time, in order,
/// from a spawned task feeding a bounded channel (so a slow reader holds back
/// the computation, not the server's memory). An `Err` answer is sent and ends
/// the stream. A client that goes away drops the request in progress before
/// it commits anything.
pub fn answer_in_order<Req, Resp, Fut>(
    mut requests: Streaming<Req>,
    max_message_bytes: u64,
    mut answer: impl FnMut(Req) -> Fut + Send + 'static,
) -> ReceiverStream<Result<Resp, Status>>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send,
{
    let (answers, receiver) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        loop {
            let result = tokio::select! {
                request = requests.message() => match request {
                    Ok(None) => break,
                    Ok(Some(request)) => tokio::select! {
                        result = answer(request) => result,
                        _ = answers.closed() => break,
                    },
                    Err(status) => Err(oversize_to_resource_exhausted(status, max_message_bytes)),
                },
                _ = answers.closed() => break,
            };
            let ends_stream = result.is_err();
            if answers.send(result).await.is_err() || ends_stream {
                break;
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// Runs `work` inline when small, else on the blocking pool — at most one
/// large computation per core at a time, so they cannot crowd out the async
/// workers that read requests, answer small calls and shed load.
pub async fn compute<T: Send + 'static>(
    elements: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    if elements <= INLINE_COMPUTE_MAX_ELEMENTS {
        return Ok(work());
    }
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Semaphore::new(cores))
    });
    let slot = slots.clone().acquire_owned().await.expect("never closed");
    // The slot moves into the computation: a cancelled call frees it only
    // when its computation has really ended.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|e| Error::Internal(format!("layer computation failed: {e}")))
}

/// tonic answers an oversize message with OUT_OF_RANGE; layerd answers every
/// exceeded limit with RESOURCE_EXHAUSTED naming the flag that sets it.
pub fn oversize_to_resource_exhausted(status: Status, max_message_bytes: u64) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        return Error::LimitExceeded {
            flag: "--max-message-bytes",
            limit: bytesize::ByteSize(max_message_bytes).to_string(),
            detail: status.message().to_string(),
        }
        .into();
    }
    status
}
