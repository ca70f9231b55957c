//! The gRPC handlers of `layerd.v1.LayerService`, and what the KServe service
//! shares with them: Forward and Backward on a layer instance, the timeout and
//! tracing wrapper, and in-order stream answering.
//!
//! Each handler validates its request completely (routing header, ids,
//! tensor) before it touches a session, computes without holding any lock but
//! its own layer instance's, and commits kept state only after the
//! computation succeeded — so a failed, timed-out or cancelled call leaves the
//! session as it was.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataMap, Code, Request, Response, Status, Streaming};
use tracing::{field, Instrument, Span};

use crate::auth::{Caller, Principal};
use crate::error::Error;
use crate::layers::Kind;
use crate::metrics;
use crate::pb::{self, layer_service_server};
use crate::session::{check_id, KeptEntry, LayerInstance, Session, Store};
use crate::tensor::Tensor;

/// The metadata key load balancers hash on to route a session to its replica.
pub const SESSION_HEADER: &str = "x-session-id";

/// Tensors up to this many elements are computed on the async executor;
/// larger ones on the blocking pool, so small calls are not starved behind
/// them. At this size a ReLU or Sigmoid takes some tens of microseconds.
const INLINE_COMPUTE_MAX_ELEMENTS: usize = 16 * 1024;

/// Answers a stream (Run, ModelStreamInfer) may compute ahead of a slow reader.
const STREAM_BUFFER: usize = 4;

/// The layer service; cheap to clone.
#[derive(Clone)]
pub struct LayerService {
    store: Store,
    request_timeout: Duration,
    max_message_bytes: u64,
}

impl LayerService {
    pub fn new(store: Store, request_timeout: Duration, max_message_bytes: u64) -> LayerService {
        LayerService {
            store,
            request_timeout,
            max_message_bytes,
        }
    }

    /// [`observe`] under this service's request timeout.
    async fn observe<T>(
        &self,
        rpc: Rpc,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        observe(self.request_timeout, rpc, call).await
    }

    /// Validates a Forward or Backward request completely, then finds its
    /// session and layer instance.
    fn target(
        &self,
        caller: &Caller,
        session_id: &str,
        layer_id: &str,
        tensor: Option<pb::Tensor>,
        field: &str,
    ) -> Result<(Arc<Session>, Arc<LayerInstance>, Tensor), Error> {
        check_routing(&caller.metadata, session_id)?;
        check_id("session_id", session_id)?;
        check_id("layer_id", layer_id)?;
        let tensor = Tensor::from_proto(tensor, field)?;
        Span::current().record("elements", tensor.len());
        let session = self.store.session(&caller.principal, session_id)?;
        let layer = session.layer(layer_id)?;
        Span::current().record("kind", layer.kind.name());
        metrics::note_kind(layer.kind);
        Ok((session, layer, tensor))
    }

    async fn forward_step(
        &self,
        caller: &Caller,
        request: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, Error> {
        let (session, layer, x) = self.target(
            caller,
            &request.session_id,
            &request.layer_id,
            request.x,
            "x",
        )?;
        let y = forward_on(&session, &layer, x, request.no_grad, &mut Phases::default()).await?;
        Ok(pb::ForwardResponse {
            y: Some(y.into_proto()),
        })
    }

    async fn backward_step(
        &self,
        caller: &Caller,
        request: pb::BackwardRequest,
    ) -> Result<pb::BackwardResponse, Error> {
        let (_session, layer, dout) = self.target(
            caller,
            &request.session_id,
            &request.layer_id,
            request.dout,
            "dout",
        )?;

        let dx = backward_on(&layer, &request.layer_id, dout, &mut Phases::default()).await?;
        Ok(pb::BackwardResponse {
            dx: Some(dx.into_proto()),
        })
    }

    async fn run_step(
        &self,
        caller: &Caller,
        step: pb::RunRequest,
    ) -> Result<pb::RunResponse, Status> {
        use pb::run_request::Step;
        use pb::run_response::Result as Answer;
        let answer = match step.step {
            Some(Step::Forward(request)) => {
                let span = rpc_span("Run.Forward", &request.session_id, &request.layer_id);
                Answer::Forward(
                    self.observe(span, self.forward_step(caller, request))
                        .await?,
                )
            }
            Some(Step::Backward(request)) => {
                let span = rpc_span("Run.Backward", &request.session_id, &request.layer_id);
                Answer::Backward(
                    self.observe(span, self.backward_step(caller, request))
                        .await?,
                )
            }
            None => {
                return Err(Error::invalid(
                    "step",
                    "forward or backward",
                    "neither (step not set)",
                    "MISSING_STEP",
                )
                .into());
            }
        };
        Ok(pb::RunResponse {
            result: Some(answer),
        })
    }
}

/// A span for one RPC; `kind`, `elements` and `code` are filled in as known.
fn rpc_span(method: &'static str, session_id: &str, layer_id: &str) -> Rpc {
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
fn check_routing(metadata: &MetadataMap, session_id: &str) -> Result<(), Error> {
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

type ServiceResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl layer_service_server::LayerService for LayerService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> ServiceResult<pb::CreateSessionResponse> {
        let span = rpc_span("CreateSession", &request.get_ref().session_id, "");
        let response = self.observe(span, async {
            check_routing(request.metadata(), &request.get_ref().session_id)?;
            let owner = Principal::of(request.extensions())?;
            let request = request.get_ref();
            let (session_id, granted) =
                self.store
                    .create(&owner, &request.session_id, request.idle_timeout_seconds)?;
            Span::current().record("session", session_id.as_str());
            Ok(pb::CreateSessionResponse {
                session_id,
                idle_timeout_seconds: granted.as_secs() as u32,
            })
        });
        Ok(Response::new(response.await?))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> ServiceResult<pb::CloseSessionResponse> {
        let session_id = &request.get_ref().session_id;
        let span = rpc_span("CloseSession", session_id, "");
        let response = self.observe(span, async {
            check_routing(request.metadata(), session_id)?;
            check_id("session_id", session_id)?;
            self.store
                .close(&Principal::of(request.extensions())?, session_id)?;
            Ok(pb::CloseSessionResponse {})
        });
        Ok(Response::new(response.await?))
    }

    async fn create_layer(
        &self,
        request: Request<pb::CreateLayerRequest>,
    ) -> ServiceResult<pb::CreateLayerResponse> {
        let message = request.get_ref();
        let span = rpc_span("CreateLayer", &message.session_id, &message.layer_id);
        let response = self.observe(span, async {
            check_routing(request.metadata(), &message.session_id)?;
            check_id("session_id", &message.session_id)?;
            check_id("layer_id", &message.layer_id)?;
            let kind = Kind::from_name(&message.kind).ok_or_else(|| {
                Error::invalid(
                    "kind",
                    format!("one of {}", Kind::names()),
                    format!("{:?}", message.kind),
                    "UNKNOWN_KIND",
                )
            })?;
            Span::current().record("kind", kind.name());
            metrics::note_kind(kind);
            self.store
                .session(&Principal::of(request.extensions())?, &message.session_id)?
                .create_layer(&message.layer_id, kind)?;
            Ok(pb::CreateLayerResponse {})
        });
        Ok(Response::new(response.await?))
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> ServiceResult<pb::ForwardResponse> {
        let (metadata, extensions, message) = request.into_parts();
        let span = rpc_span("Forward", &message.session_id, &message.layer_id);
        Ok(Response::new(
            self.observe(span, async {
                let caller = Caller::from_parts(metadata, &extensions)?;
                self.forward_step(&caller, message).await
            })
            .await?,
        ))
    }

    async fn backward(
        &self,
        request: Request<pb::BackwardRequest>,
    ) -> ServiceResult<pb::BackwardResponse> {
        let (metadata, extensions, message) = request.into_parts();
        let span = rpc_span("Backward", &message.session_id, &message.layer_id);
        Ok(Response::new(
            self.observe(span, async {
                let caller = Caller::from_parts(metadata, &extensions)?;
                self.backward_step(&caller, message).await
            })
            .await?,
        ))
    }

    type RunStream = ReceiverStream<Result<pb::RunResponse, Status>>;

    async fn run(
        &self,
        request: Request<Streaming<pb::RunRequest>>,
    ) -> ServiceResult<Self::RunStream> {
        let (metadata, extensions, steps) = request.into_parts();
        let caller = Arc::new(Caller::from_parts(metadata, &extensions)?);
        let service = self.clone();
        let answers = answer_in_order(steps, self.max_message_bytes, move |step| {
            let (service, caller) = (service.clone(), caller.clone());
            async move { service.run_step(&caller, step).await }
        });
        Ok(Response::new(answers))
    }

    async fn list_layer_kinds(
        &self,
        _request: Request<pb::ListLayerKindsRequest>,
    ) -> ServiceResult<pb::ListLayerKindsResponse> {
        let kinds = Kind::ALL
            .into_iter()
            .map(|kind| pb::LayerKind {
                name: kind.name().to_string(),
                description: kind.description().to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListLayerKindsResponse { kinds }))
    }
}
