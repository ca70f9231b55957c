//! The KServe v2 / Triton inference protocol (`inference.GRPCInferenceService`),
//! served on the layer service's port, over the same sessions and limits.
//!
//! Models are layer kinds and directions ([`models`]); a request's
//! `sequence_id` names the session that keeps Forward's state for a later
//! `*_backward` request ([`sequence`]), its requests taking effect in the
//! order they arrived ([`arrival`]); per-model counts and durations back
//! `ModelStatistics` ([`stats`]); inputs and outputs may live in system
//! shared-memory regions instead of the messages ([`shm`]); uncompressed
//! `ModelInfer` messages are read and written by [`wire`], which moves their
//! raw contents without tonic's codec copies. Tensors are converted in
//! [`crate::tensor`]. Numerics are the native API's: both call
//! the same layer code.

pub mod arrival;
pub mod codec;
mod io;
pub mod models;
pub mod sequence;
pub mod shm;
pub mod stats;
pub mod wire;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{field, Span};

use crate::auth::{Caller, Principal};
use crate::config::Config;
use crate::engine::{backward_on, compute, forward_on, forward_stateless, ForwardOptions, Phases};
use crate::error::Error;
use crate::pb::inference::{self as pb, grpc_inference_service_server::GrpcInferenceService};
use crate::rpc::status::CallError;
use crate::rpc::stream::answer_in_order;
use crate::rpc::{observe, Rpc};
use crate::session::{CloseOnDrop, Store};
use crate::tensor::Tensor;
pub use io::take_input;
use io::{Input, Io, Streamed};

use arrival::Ticket;
use models::{Model, Pass, PLATFORM, VERSION};
use sequence::{SequenceId, SequenceParams};
use shm::Regions;
use stats::{ModelStats, Stages};
use wire::Chunks;

/// The request header with which a ModelStreamInfer client asks for errors as
/// a gRPC status (ending the stream) instead of `error_message` answers.
pub const GRPC_ERROR_HEADER: &str = "triton_grpc_error";

/// Protocol extensions layerd implements, as ServerMetadata names them
/// (and [`SHM_EXTENSION`] with `--allow-client-shm`).
const EXTENSIONS: [&str; 4] = [
    "model_configuration",
    "sequence",
    "statistics",
    "parameters",
];

/// The extension name of system shared memory.
const SHM_EXTENSION: &str = "system_shared_memory";

/// The inference service; cheap to clone.
#[derive(Clone)]
pub struct InferenceService {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    request_timeout: Duration,
    max_message_bytes: u64,
    sequence_idle: Duration,
    stats: Vec<ModelStats>,
    ready: AtomicBool,
    regions: Regions,
}

impl InferenceService {
    /// Serves `store` under `config`'s limits; sessions made by sequences get
    /// the default idle timeout, advertised in each model's configuration.
    pub fn new(store: Store, config: &Config) -> InferenceService {
        InferenceService {
            shared: Arc::new(Shared {
                store,
                request_timeout: config.request_timeout,
                max_message_bytes: config.max_message_bytes.as_u64(),
                sequence_idle: config.default_idle_timeout,
                stats: Model::all().map(|_| ModelStats::default()).collect(),
                ready: AtomicBool::new(true),
                regions: Regions::new(
                    config.allow_client_shm,
                    config.max_shm_regions,
                    config.max_work_bytes.as_u64(),
                ),
            }),
        }
    }

    /// `ModelInfer` of a request whose raw contents are still in `frames`
    /// when given ([`wire::decode_framed`]), else in the message.
    pub async fn model_infer_framed(
        &self,
        request: Request<pb::ModelInferRequest>,
        frames: Option<Vec<Chunks>>,
    ) -> ServiceResult<pb::ModelInferResponse> {
        let (metadata, extensions, message) = request.into_parts();
        let caller = Caller::from_parts(metadata, &extensions)?;
        let ticket = extensions.get::<Ticket>();
        Ok(Response::new(
            self.infer(&caller, ticket, message, frames).await?,
        ))
    }

    /// ServerReady answers false from now on (the server is draining).
    pub fn set_not_ready(&self) {
        self.shared.ready.store(false, Ordering::Relaxed);
    }

    /// One inference, recorded in its model's statistics.
    async fn infer(
        &self,
        caller: &Caller,
        ticket: Option<&Ticket>,
        request: pb::ModelInferRequest,
        frames: Option<Vec<Chunks>>,
    ) -> Result<pb::ModelInferResponse, CallError> {
        let method = "ModelInfer";
        let span = tracing::info_span!(
            "rpc",
            method,
            model = request.model_name.as_str(),
            session = field::Empty,
            layer = field::Empty,
            kind = field::Empty,
            elements = field::Empty,
            code = field::Empty,
        );
        let model = match Model::find(&request.model_name, &request.model_version) {
            Ok(model) => model,
            Err(error) => {
                let rpc = Rpc { method, span };
                return observe(self.shared.request_timeout, rpc, async { Err(error) }).await;
            }
        };
        let started = Instant::now();
        let mut stages = Stages::default();
        let result = observe(
            self.shared.request_timeout,
            Rpc { method, span },
            self.infer_model(model, caller, ticket, request, frames, &mut stages),
        )
        .await;
        self.shared.stats[model.index()].record(result.is_ok(), started.elapsed(), &stages);
        result
    }

    async fn infer_model(
        &self,
        model: Model,
        caller: &Caller,
        ticket: Option<&Ticket>,
        mut request: pb::ModelInferRequest,
        frames: Option<Vec<Chunks>>,
        stages: &mut Stages,
    ) -> Result<pb::ModelInferResponse, CallError> {
        crate::metrics::note_kind(model.kind.name());
        let decoding = Instant::now();
        let params = SequenceParams::parse(&request.parameters)?;
        let session_id = params.id.as_ref().map(SequenceId::session_id);
        if let Some(ticket) = ticket {
            ticket.declare(session_id.as_deref());
        }
        params.check_routing(&caller.metadata)?;
        let Io {
            input,
            output_region,
        } = self.take_io(model, &caller.principal, &mut request, frames)?;
        let span = Span::current();
        span.record("kind", model.kind.name());
        span.record("elements", input.len());

        let stateless = matches!(
            (&params.id, model.pass),
            (None, Pass::Forward | Pass::NoGrad)
        );
        let (input, output_region) = match (stateless, input, output_region) {
            (
                true,
                Input::Deferred {
                    source,
                    tensor,
                    wire,
                    len,
                },
                output,
            ) => {
                stages.input = decoding.elapsed();
                let streamed = Streamed {
                    input: source,
                    output,
                    shape: tensor.shape,
                    wire,
                    len,
                };
                return self
                    .stream_stateless(model, request.id, streamed, stages)
                    .await;
            }
            (_, input, output_region) => (input, output_region),
        };
        let input = input.read().await?;
        stages.input = decoding.elapsed();

        let output = match (session_id.as_deref(), model.pass) {
            (Some(_), Pass::NoGrad) => {
                return Err(CallError::invalid(
                    "parameters.sequence_id",
                    format!(
                        "none: model {} is stateless (sequences go to {})",
                        model.name(),
                        model.kind.name()
                    ),
                    "a sequence_id",
                    "STATELESS_MODEL",
                ))
            }
            (Some(session_id), _) => {
                // After the requests of this sequence that arrived before it
                // on its connection; the wait counts as queue time.
                let waiting = Instant::now();
                if let Some(ticket) = ticket {
                    ticket.wait_turn(session_id).await;
                }
                let waited = waiting.elapsed();
                let y = self
                    .infer_in_sequence(
                        &caller.principal,
                        model,
                        session_id,
                        &params,
                        input,
                        &mut stages.layer,
                    )
                    .await?;
                stages.layer.queue += waited;
                y
            }
            (None, Pass::Forward | Pass::NoGrad) => {
                forward_stateless(model.chain(), input, &mut stages.layer).await?
            }
            (None, Pass::Backward) => {
                return Err(CallError::SequenceRequired {
                    model: model.name(),
                })
            }
        };

        let encoding = Instant::now();
        let elements = output.len();
        let (tensor, mut raw) = output.into_kserve(model.output());
        if let Some(region) = output_region {
            // As Triton: the output's metadata, and an empty raw entry.
            let data = std::mem::take(&mut raw);
            compute(elements, move || region.write(&data)).await??;
        }
        let response = pb::ModelInferResponse {
            model_name: model.name(),
            model_version: VERSION.to_string(),
            id: request.id,
            outputs: vec![tensor],
            raw_output_contents: vec![raw],
            ..Default::default()
        };
        stages.output = encoding.elapsed();
        Ok(response)
    }

    /// A stateful call: Forward keeps, Backward uses, what the sequence's
    /// session holds for its layer instance.
    async fn infer_in_sequence(
        &self,
        owner: &Principal,
        model: Model,
        session_id: &str,
        params: &SequenceParams,
        input: Tensor,
        phases: &mut Phases,
    ) -> Result<Tensor, CallError> {
        let store = &self.shared.store;
        let layer_id = params.layer_id.as_deref().unwrap_or(model.kind.name());
        Span::current().record("session", session_id);
        Span::current().record("layer", layer_id);

        // A sequence_start that fails (or times out, or is cancelled) must
        // not leave its new session behind.
        let mut created = None;
        if params.start {
            store.create(owner, session_id, 0)?;
            created = Some(CloseOnDrop {
                store: store.clone(),
                owner: owner.clone(),
                session_id: Some(session_id.to_string()),
            });
        }
        let session = store.session(owner, session_id)?;
        let output = match model.pass {
            Pass::Forward => {
                let layer = session.layer_or_create(layer_id, model.chain())?;
                forward_on(&session, &layer, input, ForwardOptions::default(), phases).await?
            }
            Pass::NoGrad => {
                // infer_model rejects sequences on stateless models first.
                return Err(CallError::internal(format!(
                    "{} in a sequence",
                    model.name()
                )));
            }
            Pass::Backward => {
                let nothing_kept = || Error::NothingKept {
                    layer_id: layer_id.to_string(),
                };
                let layer = session.layer(layer_id).map_err(|_| nothing_kept())?;
                session.check_kind(layer_id, &layer, &model.chain())?;
                backward_on(&layer, layer_id, Some(input), false, phases)
                    .await?
                    .dx
            }
        };
        if params.end {
            // Answered: the sequence is over. It may have expired meanwhile.
            let _ = store.close(owner, session_id);
        }
        if let Some(guard) = created {
            guard.disarm();
        }
        Ok(output)
    }

    fn model_stats(&self, model: Model) -> pb::ModelStatistics {
        self.shared.stats[model.index()].snapshot(model)
    }
}

type ServiceResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<pb::ServerLiveRequest>,
    ) -> ServiceResult<pb::ServerLiveResponse> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<pb::ServerReadyRequest>,
    ) -> ServiceResult<pb::ServerReadyResponse> {
        let ready = self.shared.ready.load(Ordering::Relaxed);
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> ServiceResult<pb::ModelReadyResponse> {
        let request = request.get_ref();
        let ready = Model::find(&request.name, &request.version).is_ok()
            && self.shared.ready.load(Ordering::Relaxed);
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<pb::ServerMetadataRequest>,
    ) -> ServiceResult<pb::ServerMetadataResponse> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: PLATFORM.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: EXTENSIONS
                .iter()
                .chain(self.shared.regions.enabled().then_some(&SHM_EXTENSION))
                .map(|e| e.to_string())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> ServiceResult<pb::ModelMetadataResponse> {
        let request = request.get_ref();
        let model = Model::find(&request.name, &request.version)?;
        Ok(Response::new(model.metadata()))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> ServiceResult<pb::ModelConfigResponse> {
        let request = request.get_ref();
        let model = Model::find(&request.name, &request.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(model.config(self.shared.sequence_idle)),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> ServiceResult<pb::ModelStatisticsResponse> {
        let request = request.get_ref();
        let model_stats = if request.name.is_empty() {
            Model::all().map(|model| self.model_stats(model)).collect()
        } else {
            vec![self.model_stats(Model::find(&request.name, &request.version)?)]
        };
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        _request: Request<pb::RepositoryIndexRequest>,
    ) -> ServiceResult<pb::RepositoryIndexResponse> {
        let models = Model::all()
            .map(|model| pb::repository_index_response::ModelIndex {
                name: model.name(),
                version: VERSION.to_string(),
                state: "READY".to_string(),
                reason: String::new(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> ServiceResult<pb::ModelInferResponse> {
        self.model_infer_framed(request, None).await
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> ServiceResult<pb::SystemSharedMemoryStatusResponse> {
        let owner = Principal::of(request.extensions())?;
        let regions = self
            .shared
            .regions
            .status(&owner, &request.get_ref().name)?;
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse {
            regions,
        }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> ServiceResult<pb::SystemSharedMemoryRegisterResponse> {
        let owner = Principal::of(request.extensions())?;
        let r = request.get_ref();
        self.shared
            .regions
            .register(&owner, &r.name, &r.key, r.offset, r.byte_size)?;
        Ok(Response::new(pb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> ServiceResult<pb::SystemSharedMemoryUnregisterResponse> {
        let owner = Principal::of(request.extensions())?;
        let name = &request.get_ref().name;
        self.shared.regions.unregister(&owner, name).await?;
        Ok(Response::new(pb::SystemSharedMemoryUnregisterResponse {}))
    }

    type ModelStreamInferStream = ReceiverStream<Result<pb::ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> ServiceResult<Self::ModelStreamInferStream> {
        let (metadata, extensions, requests) = request.into_parts();
        let errors_as_status = metadata
            .get(GRPC_ERROR_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let caller = Arc::new(Caller::from_parts(metadata, &extensions)?);
        let service = self.clone();
        let answers = answer_in_order(requests, self.shared.max_message_bytes, move |request| {
            let (service, caller) = (service.clone(), caller.clone());
            async move {
                let (model_name, id) = (request.model_name.clone(), request.id.clone());
                // A stream's requests run one at a time, in order.
                match service.infer(&caller, None, request, None).await {
                    Ok(response) => Ok(pb::ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(response),
                    }),
                    Err(error) if errors_as_status => Err(Status::from(error)),
                    // In band, as Triton does: the stream goes on.
                    Err(error) => Ok(pb::ModelStreamInferResponse {
                        error_message: error.to_string(),
                        infer_response: Some(pb::ModelInferResponse {
                            model_name,
                            id,
                            ..Default::default()
                        }),
                    }),
                }
            }
        });
        Ok(Response::new(answers))
    }
}
