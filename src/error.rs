//! The domain error of layers, sessions, training and checkpoints: what went
//! wrong, with no transport in it.
//!
//! Every variant names what a client needs to act: the field, what was
//! expected and what came (`InvalidArgument`), or the ids involved. Each has
//! a stable [`Error::reason`] (`SESSION_NOT_FOUND`, `NOTHING_KEPT`, …) and
//! [`Error::metadata`] pairs; the protocol edges ([`crate::rpc::status`]) map
//! them to gRPC codes and `google.rpc` details, and add the errors only they
//! raise (authentication, overload, timeouts, KServe models, shared memory).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("session {session_id:?} not found: unknown, closed or expired")]
    SessionNotFound { session_id: String },

    #[error("layer {layer_id:?} not found in session {session_id:?}")]
    LayerNotFound {
        session_id: String,
        layer_id: String,
    },

    #[error("session {session_id:?} already exists")]
    SessionExists { session_id: String },

    #[error("layer {layer_id:?} already exists in session {session_id:?}")]
    LayerExists {
        session_id: String,
        layer_id: String,
    },

    /// A request field is malformed; `reason` is the `ErrorInfo.reason`.
    #[error("{field}: expected {expected}, got {got}")]
    InvalidArgument {
        field: String,
        expected: String,
        got: String,
        reason: &'static str,
    },

    #[error("optimizer {optimizer_id:?} not found in session {session_id:?}")]
    OptimizerNotFound {
        session_id: String,
        optimizer_id: String,
    },

    #[error("optimizer {optimizer_id:?} already exists in session {session_id:?}")]
    OptimizerExists {
        session_id: String,
        optimizer_id: String,
    },

    /// A parameter belongs to one optimizer.
    #[error(
        "the parameters of layer {layer_id:?} in session {session_id:?} already belong to optimizer {optimizer_id:?}"
    )]
    ParamsOwned {
        session_id: String,
        layer_id: String,
        optimizer_id: String,
    },

    /// Step needs a gradient for every parameter the optimizer owns.
    #[error(
        "optimizer {optimizer_id:?} has no gradient for parameter {param:?} of layer {layer_id:?}: call Backward on it first"
    )]
    NoGradients {
        optimizer_id: String,
        layer_id: String,
        param: String,
    },

    /// A Step or TrainStep numbered by `expected_step` (or
    /// `x-layerd-after-steps`) found its optimizer past the count it was to
    /// follow, and is not a retry of the update that moved it there.
    #[error(
        "expected_step: this call was to follow update {expected} of optimizer {optimizer_id:?}, which has applied {got} (and the last update was not this request)"
    )]
    StepOutOfOrder {
        optimizer_id: String,
        expected: u64,
        got: u64,
    },

    #[error(
        "layer {layer_id:?} has nothing kept for Backward: call Forward without no_grad first"
    )]
    NothingKept { layer_id: String },

    /// Backward on a layer whose session was taken over (from a session
    /// store) from a replica that died after its last keeping Forward: what
    /// it kept died with it (a graceful handover moves kept state).
    #[error(
        "layer {layer_id:?} has nothing kept on this replica: its session was taken over from a replica that stopped without handing it over, after the last Forward; call Forward again, then Backward"
    )]
    KeptStateLost { layer_id: String },

    /// A configured limit would be exceeded; `flag` is the option that sets it.
    #[error("limit {flag} = {limit} exceeded: {detail}")]
    LimitExceeded {
        flag: &'static str,
        limit: String,
        detail: String,
    },

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A malformed field: `field: expected …, got …`.
    pub fn invalid(
        field: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
        reason: &'static str,
    ) -> Error {
        Error::InvalidArgument {
            field: field.into(),
            expected: expected.into(),
            got: got.into(),
            reason,
        }
    }

    /// The stable `ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SessionNotFound { .. } => "SESSION_NOT_FOUND",
            Error::LayerNotFound { .. } => "LAYER_NOT_FOUND",
            Error::SessionExists { .. } => "SESSION_EXISTS",
            Error::LayerExists { .. } => "LAYER_EXISTS",
            Error::OptimizerNotFound { .. } => "OPTIMIZER_NOT_FOUND",
            Error::OptimizerExists { .. } => "OPTIMIZER_EXISTS",
            Error::ParamsOwned { .. } => "PARAMS_OWNED",
            Error::NoGradients { .. } => "NO_GRADIENTS",
            Error::StepOutOfOrder { .. } => "STEP_OUT_OF_ORDER",
            Error::InvalidArgument { reason, .. } => reason,
            Error::NothingKept { .. } => "NOTHING_KEPT",
            Error::KeptStateLost { .. } => "KEPT_STATE_LOST",
            Error::LimitExceeded { .. } => "LIMIT_EXCEEDED",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// The `ErrorInfo.metadata` pairs: the ids and values involved.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        let pairs: Vec<(&'static str, &str)> = match self {
            Error::SessionNotFound { session_id } | Error::SessionExists { session_id } => {
                vec![("session_id", session_id)]
            }
            Error::LayerNotFound {
                session_id,
                layer_id,
            }
            | Error::LayerExists {
                session_id,
                layer_id,
            } => vec![("session_id", session_id), ("layer_id", layer_id)],
            Error::OptimizerNotFound {
                session_id,
                optimizer_id,
            }
            | Error::OptimizerExists {
                session_id,
                optimizer_id,
            } => vec![("session_id", session_id), ("optimizer_id", optimizer_id)],
            Error::ParamsOwned {
                session_id,
                layer_id,
                optimizer_id,
            } => vec![
                ("session_id", session_id),
                ("layer_id", layer_id),
                ("optimizer_id", optimizer_id),
            ],
            Error::NoGradients {
                optimizer_id,
                layer_id,
                param,
            } => vec![
                ("optimizer_id", optimizer_id),
                ("layer_id", layer_id),
                ("param", param),
            ],
            Error::StepOutOfOrder {
                optimizer_id,
                expected,
                got,
            } => {
                return vec![
                    ("optimizer_id", optimizer_id.clone()),
                    ("expected", expected.to_string()),
                    ("got", got.to_string()),
                ]
            }
            Error::InvalidArgument { field, .. } => vec![("field", field)],
            Error::NothingKept { layer_id } | Error::KeptStateLost { layer_id } => {
                vec![("layer_id", layer_id)]
            }
            Error::LimitExceeded { flag, limit, .. } => vec![("limit", flag), ("value", limit)],
            Error::Internal(_) => vec![],
        };
        pairs.into_iter().map(|(k, v)| (k, v.to_string())).collect()
    }
}
