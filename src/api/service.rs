//! The gRPC handlers of `layerd.v1.LayerService`: thin — each validates its
//! request completely (routing header, ids, tensor), finds the session and
//! layer instance, and hands the work to [`crate::engine`], which commits
//! nothing until the computation succeeded.

use std::{future::Future, sync::Arc, time::Duration};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Span;

use crate::api::codec::to_proto_map;
use crate::api::spec;
use crate::auth::Caller;
use crate::checkpoint;
use crate::durable::Durable;
use crate::engine::{backward_on, forward_on, set_values, values_of, ForwardOptions, Phases};
use crate::layers::Kind;
use crate::metrics;
use crate::pb::{self, layer_service_server};
use crate::rpc::status::CallError;
use crate::rpc::stream::answer_in_order;
use crate::rpc::{after_steps, check_routing, observe, rpc_span};
use crate::session::{check_id, LayerInstance, Optimizer, Session, Store};
use crate::tensor::{Target, Tensor};
use crate::training::{step_on, train_step_on, TrainOptions};

/// The layer service; cheap to clone.
#[derive(Clone)]
pub struct LayerService {
    store: Store,
    request_timeout: Duration,
    max_message_bytes: u64,
    /// This replica's name (`--replica-id`).
    replica_id: String,
    /// The shared session store (`--session-store`), if any.
    durable: Option<Durable>,
}

impl LayerService {
    pub fn new(
        store: Store,
        request_timeout: Duration,
        max_message_bytes: u64,
        replica_id: String,
        durable: Option<Durable>,
    ) -> LayerService {
        LayerService {
            store,
            request_timeout,
            max_message_bytes,
            replica_id,
            durable,
        }
    }

    /// The caller's session `session_id`: with a session store, taken over
    /// first if another replica holds it.
    async fn find(&self, caller: &Caller, session_id: &str) -> Result<Arc<Session>, CallError> {
        match &self.durable {
            Some(durable) => durable.session(&caller.principal, session_id).await,
            None => Ok(self.store.session(&caller.principal, session_id)?),
        }
    }

    /// After a call changed `session` (layers, parameters, optimizers): with
    /// a session store, written as `--durability` says.
    async fn changed(&self, caller: &Caller, session: &Session) -> Result<(), CallError> {
        match &self.durable {
            Some(durable) => durable.persist(&caller.principal, session).await,
            None => Ok(()),
        }
    }

    /// A session just made here (CreateSession, ImportSession): with a
    /// session store, registered there; closed again if that fails.
    async fn created(&self, caller: &Caller, session_id: &str) -> Result<(), CallError> {
        let Some(durable) = &self.durable else {
            return Ok(());
        };
        let session = self.store.session(&caller.principal, session_id)?;
        let registered = durable.create(&caller.principal, &session).await;
        if registered.is_err() {
            let _ = self.store.close(&caller.principal, session_id);
        }
        registered
    }

    /// The preamble every unary handler shares: the call's span (its method,
    /// and the session and layer its message names), the request timeout,
    /// the metrics and the status mapping around `body`, which gets the
    /// caller (principal and metadata) and the message.
    async fn unary<M, T, Fut>(
        &self,
        method: &'static str,
        request: Request<M>,
        body: impl FnOnce(Caller, M) -> Fut,
    ) -> ServiceResult<T>
    where
        M: Names,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let (metadata, extensions, message) = request.into_parts();
        let (session_id, layer_id) = message.names();
        let rpc = rpc_span(method, session_id, layer_id);
        let answer = observe(self.request_timeout, rpc, async move {
            body(Caller::from_parts(metadata, &extensions)?, message).await
        });
        Ok(Response::new(answer.await?))
    }

    /// Checks a request's routing header and session id, then finds the
    /// caller's session.
    async fn session_of(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<Arc<Session>, CallError> {
        check_routing(&caller.metadata, session_id)?;
        check_id("session_id", session_id)?;
        self.find(caller, session_id).await
    }

    /// Checks a request's routing header and ids, then finds its session and
    /// layer instance (the request's tensors are validated before this).
    async fn target(
        &self,
        caller: &Caller,
        session_id: &str,
        layer_id: &str,
    ) -> Result<(Arc<Session>, Arc<LayerInstance>), CallError> {
        check_routing(&caller.metadata, session_id)?;
        check_id("session_id", session_id)?;
        check_id("layer_id", layer_id)?;
        let session = self.find(caller, session_id).await?;
        let layer = session.layer(layer_id)?;
        let kind = layer.chain.kind().name();
        Span::current().record("kind", kind);
        metrics::note_kind(kind);
        Ok((session, layer))
    }

    /// Checks a request's routing header and ids, then finds the session and
    /// its optimizer.
    async fn optimizer_of(
        &self,
        caller: &Caller,
        session_id: &str,
        optimizer_id: &str,
    ) -> Result<(Arc<Session>, Arc<Optimizer>), CallError> {
        check_routing(&caller.metadata, session_id)?;
        check_id("session_id", session_id)?;
        check_id("optimizer_id", optimizer_id)?;
        let session = self.find(caller, session_id).await?;
        let optimizer = session.optimizer(optimizer_id)?;
        Ok((session, optimizer))
    }

    async fn forward_step(
        &self,
        caller: &Caller,
        request: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, CallError> {
        let x = Tensor::from_proto(request.x, "x")?;
        let t = Target::from_proto(request.t, "t")?;
        Span::current().record("elements", x.len());
        let (session, layer) = self
            .target(caller, &request.session_id, &request.layer_id)
            .await?;
        let options = ForwardOptions {
            t,
            eval: request.eval,
            no_grad: request.no_grad,
        };
        let y = forward_on(&session, &layer, x, options, &mut Phases::default()).await?;
        Ok(pb::ForwardResponse {
            y: Some(y.into_proto()),
        })
    }

    async fn backward_step(
        &self,
        caller: &Caller,
        request: pb::BackwardRequest,
    ) -> Result<pb::BackwardResponse, CallError> {
        // Absent only after a loss; the layer's kept state decides.
        let dout = match request.dout {
            None => None,
            dout => Some(Tensor::from_proto(dout, "dout")?),
        };
        Span::current().record("elements", dout.as_ref().map_or(0, Tensor::len));
        let (_session, layer) = self
            .target(caller, &request.session_id, &request.layer_id)
            .await?;
        let answer = backward_on(
            &layer,
            &request.layer_id,
            dout,
            request.return_grads,
            &mut Phases::default(),
        )
        .await?;
        Ok(pb::BackwardResponse {
            dx: Some(answer.dx.into_proto()),
            grads: to_proto_map(answer.grads),
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
                let answer = self.forward_step(caller, request);
                Answer::Forward(observe(self.request_timeout, span, answer).await?)
            }
            Some(Step::Backward(request)) => {
                let span = rpc_span("Run.Backward", &request.session_id, &request.layer_id);
                let answer = self.backward_step(caller, request);
                Answer::Backward(observe(self.request_timeout, span, answer).await?)
            }
            None => {
                return Err(CallError::invalid(
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

type ServiceResult<T> = Result<Response<T>, Status>;

/// The session and layer (or "") a request names, for its span.
trait Names {
    fn names(&self) -> (&str, &str);
}

macro_rules! names {
    ($($message:ident: $layer:ident),* $(,)?) => {
        $(impl Names for pb::$message {
            fn names(&self) -> (&str, &str) {
                (&self.session_id, names!(@layer self $layer))
            }
        })*
    };
    (@layer $self:ident none) => { "" };
    (@layer $self:ident $layer:ident) => { &$self.$layer };
}

names! {
    CreateSessionRequest: none,
    CloseSessionRequest: none,
    DescribeSessionRequest: none,
    CreateLayerRequest: layer_id,
    ForwardRequest: layer_id,
    BackwardRequest: layer_id,
    GetParamsRequest: layer_id,
    SetParamsRequest: layer_id,
    CreateOptimizerRequest: none,
    StepRequest: none,
    ExportSessionRequest: none,
    ImportSessionRequest: none,
    TrainStepRequest: layer_id,
}

#[tonic::async_trait]
impl layer_service_server::LayerService for LayerService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> ServiceResult<pb::CreateSessionResponse> {
        self.unary("CreateSession", request, |caller, message| async move {
            check_routing(&caller.metadata, &message.session_id)?;
            let (session_id, granted) = self.store.create(
                &caller.principal,
                &message.session_id,
                message.idle_timeout_seconds,
            )?;
            Span::current().record("session", session_id.as_str());
            self.created(&caller, &session_id).await?;
            Ok(pb::CreateSessionResponse {
                session_id,
                idle_timeout_seconds: granted.as_secs() as u32,
            })
        })
        .await
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> ServiceResult<pb::CloseSessionResponse> {
        self.unary("CloseSession", request, |caller, message| async move {
            if let Some(durable) = &self.durable {
                // Taken over first if another replica holds it.
                self.session_of(&caller, &message.session_id).await?;
                if durable
                    .close(&caller.principal, &message.session_id)
                    .await?
                {
                    return Ok(pb::CloseSessionResponse {});
                }
            }
            check_routing(&caller.metadata, &message.session_id)?;
            check_id("session_id", &message.session_id)?;
            self.store.close(&caller.principal, &message.session_id)?;
            Ok(pb::CloseSessionResponse {})
        })
        .await
    }

    async fn describe_session(
        &self,
        request: Request<pb::DescribeSessionRequest>,
    ) -> ServiceResult<pb::DescribeSessionResponse> {
        self.unary("DescribeSession", request, |caller, message| async move {
            let session = self.session_of(&caller, &message.session_id).await?;
            let stored = self
                .durable
                .as_ref()
                .and_then(|d| d.stored_steps(&caller.principal, &message.session_id));
            Ok(super::describe::describe(
                &session,
                &self.replica_id,
                stored,
            ))
        })
        .await
    }

    async fn create_layer(
        &self,
        request: Request<pb::CreateLayerRequest>,
    ) -> ServiceResult<pb::CreateLayerResponse> {
        self.unary("CreateLayer", request, |caller, message| async move {
            check_routing(&caller.metadata, &message.session_id)?;
            check_id("session_id", &message.session_id)?;
            check_id("layer_id", &message.layer_id)?;
            let layer = spec::new_layer(&message)?;
            let kind = layer.chain.kind().name();
            Span::current().record("kind", kind);
            metrics::note_kind(kind);
            let session = self.find(&caller, &message.session_id).await?;
            session.create_layer(&message.layer_id, layer)?;
            self.changed(&caller, &session).await?;
            Ok(pb::CreateLayerResponse {})
        })
        .await
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> ServiceResult<pb::ForwardResponse> {
        self.unary("Forward", request, |caller, message| async move {
            self.forward_step(&caller, message).await
        })
        .await
    }

    async fn backward(
        &self,
        request: Request<pb::BackwardRequest>,
    ) -> ServiceResult<pb::BackwardResponse> {
        self.unary("Backward", request, |caller, message| async move {
            self.backward_step(&caller, message).await
        })
        .await
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

    async fn get_params(
        &self,
        request: Request<pb::GetParamsRequest>,
    ) -> ServiceResult<pb::GetParamsResponse> {
        self.unary("GetParams", request, |caller, message| async move {
            let (_, layer) = self
                .target(&caller, &message.session_id, &message.layer_id)
                .await?;
            let values = values_of(&layer, message.include_grads).await;
            Ok(pb::GetParamsResponse {
                params: to_proto_map(values.params),
                buffers: to_proto_map(values.buffers),
                grads: to_proto_map(values.grads),
            })
        })
        .await
    }

    async fn set_params(
        &self,
        request: Request<pb::SetParamsRequest>,
    ) -> ServiceResult<pb::SetParamsResponse> {
        self.unary("SetParams", request, |caller, message| async move {
            let values = message
                .values
                .into_iter()
                .map(|(name, t)| {
                    let tensor = Tensor::from_proto(Some(t), &format!("values[{name:?}]"))?;
                    Ok((name, tensor.into_computed()))
                })
                .collect::<Result<_, CallError>>()?;
            let (session, layer) = self
                .target(&caller, &message.session_id, &message.layer_id)
                .await?;
            set_values(&layer, values).await?;
            self.changed(&caller, &session).await?;
            Ok(pb::SetParamsResponse {})
        })
        .await
    }

    async fn create_optimizer(
        &self,
        request: Request<pb::CreateOptimizerRequest>,
    ) -> ServiceResult<pb::CreateOptimizerResponse> {
        self.unary("CreateOptimizer", request, |caller, message| async move {
            let algorithm = spec::algorithm(&message)?;
            let session = self.session_of(&caller, &message.session_id).await?;
            session
                .create_optimizer(&message.optimizer_id, algorithm, &message.layer_ids)
                .await?;
            self.changed(&caller, &session).await?;
            Ok(pb::CreateOptimizerResponse {})
        })
        .await
    }

    async fn step(&self, request: Request<pb::StepRequest>) -> ServiceResult<pb::StepResponse> {
        self.unary("Step", request, |caller, message| async move {
            let after = after_steps(&caller.metadata, message.expected_step)?;
            let (session, optimizer) = self
                .optimizer_of(&caller, &message.session_id, &message.optimizer_id)
                .await?;
            let steps = step_on(&optimizer, after).await?;
            self.changed(&caller, &session).await?;
            Ok(pb::StepResponse { steps })
        })
        .await
    }

    async fn export_session(
        &self,
        request: Request<pb::ExportSessionRequest>,
    ) -> ServiceResult<pb::ExportSessionResponse> {
        self.unary("ExportSession", request, |caller, message| async move {
            let session = self.session_of(&caller, &message.session_id).await?;
            let file = checkpoint::export(&session).await?;
            Ok(pb::ExportSessionResponse { safetensors: file })
        })
        .await
    }

    async fn import_session(
        &self,
        request: Request<pb::ImportSessionRequest>,
    ) -> ServiceResult<pb::ImportSessionResponse> {
        self.unary("ImportSession", request, |caller, message| async move {
            check_routing(&caller.metadata, &message.session_id)?;
            // Everything is checked before the session exists.
            let checkpoint = checkpoint::parse(&message.safetensors)?;
            let owner = caller.principal.clone();
            let (session_id, granted) =
                self.store
                    .create(&owner, &message.session_id, message.idle_timeout_seconds)?;
            Span::current().record("session", session_id.as_str());
            let session = self.store.session(&owner, &session_id)?;
            checkpoint::restore_new(&self.store, &owner, &session, checkpoint).await?;
            self.created(&caller, &session_id).await?;
            Ok(pb::ImportSessionResponse {
                session_id,
                idle_timeout_seconds: granted.as_secs() as u32,
            })
        })
        .await
    }

    async fn train_step(
        &self,
        request: Request<pb::TrainStepRequest>,
    ) -> ServiceResult<pb::TrainStepResponse> {
        self.unary("TrainStep", request, |caller, message| async move {
            let after = after_steps(&caller.metadata, message.expected_step)?;
            let x = Tensor::from_proto(message.x, "x")?;
            let t = Target::from_proto(message.t, "t")?.ok_or_else(|| {
                CallError::invalid(
                    "t",
                    "a target: INT64 class ids (N,) or probabilities of the scores' shape",
                    "none (field not set)",
                    "MISSING_TENSOR",
                )
            })?;
            Span::current().record("elements", x.len());
            let (session, layer) = self
                .target(&caller, &message.session_id, &message.layer_id)
                .await?;
            drop(layer);
            check_id("optimizer_id", &message.optimizer_id)?;
            let optimizer = session.optimizer(&message.optimizer_id)?;
            let options = TrainOptions {
                return_dx: message.return_dx,
                return_scores: message.return_scores,
            };
            let answer = train_step_on(
                &session,
                &optimizer,
                &message.layer_id,
                x,
                t,
                options,
                after,
            )
            .await?;
            self.changed(&caller, &session).await?;
            Ok(pb::TrainStepResponse {
                loss: answer.loss,
                dx: answer.dx.map(Tensor::into_proto),
                scores: answer.scores.map(Tensor::into_proto),
                steps: answer.steps,
            })
        })
        .await
    }
}
