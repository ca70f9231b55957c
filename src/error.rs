//! The one error type of the service, and its one mapping to `tonic::Status`.
//!
//! Every status carries a message naming the field, what was expected and
//! what came, plus `google.rpc` details clients can branch on: an `ErrorInfo`
//! whose `reason` is stable (e.g. `SESSION_NOT_FOUND`, `NOTHING_KEPT`) in the
//! domain `layerd.v1`, and for bad arguments a `BadRequest` field violation.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every error.
pub const ERROR_DOMAIN: &str = "layerd.v1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("session {session_id:?} not found: unknown, closed or expired")]
    SessionNotFound { session_id: String },

    #[error("layer {layer_id:?} not found in session {session_id:?}")]
    LayerNotFound {
        session_id: String,
        layer_id: String,
    },

    /// A KServe request names a model (or version) layerd does not serve.
    #[error(
        "model {model:?} version {version:?} not found: layerd serves {served}, version \"1\""
    )]
    ModelNotFound {
        model: String,
        version: String,
        served: String,
    },

    /// A KServe `*_backward` request without a `sequence_id`: Backward needs
    /// what a Forward of the same sequence kept.
    #[error(
        "model {model:?} needs a sequence: send Forward with a sequence_id (and sequence_start), then Backward with the same sequence_id"
    )]
    SequenceRequired { model: String },

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

    /// A Step or TrainStep ordered by `x-layerd-after-steps` found its
    /// optimizer past the count it was to follow.
    #[error(
        "x-layerd-after-steps: this call was to follow update {expected} of optimizer {optimizer_id:?}, which has applied {got}"
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

    /// A configured limit would be exceeded; `flag` is the option that sets it.
    #[error("limit {flag} = {limit} exceeded: {detail}")]
    LimitExceeded {
        flag: &'static str,
        limit: String,
        detail: String,
    },

    /// No valid bearer token; `reason` is MISSING_TOKEN or INVALID_TOKEN.
    #[error("unauthenticated: {detail}")]
    Unauthenticated {
        reason: &'static str,
        detail: String,
    },

    /// Shed at `--max-concurrent-calls` before running: safe to retry.
    #[error(
        "server overloaded: {max_calls} calls in flight (--max-concurrent-calls); the call did not run, retry after a backoff"
    )]
    Overloaded { max_calls: usize },

    #[error("request did not finish within the server's request timeout of {0:?}")]
    Timeout(Duration),

    /// A shared-memory region name the caller has not registered.
    #[error("{field}: shared-memory region {region:?} is not registered (SystemSharedMemoryRegister it first)")]
    RegionNotFound { region: String, field: String },

    #[error("shared-memory region {region:?} is already registered; unregister it first or pick another name")]
    RegionExists { region: String },

    /// The object behind a registered region changed under it (shrunk or
    /// removed by its owner): the use did not happen.
    #[error("shared-memory region {region:?} cannot be used: {detail}")]
    RegionUnusable { region: String, detail: String },

    /// The server runs without `--allow-client-shm`.
    #[error("system shared memory is disabled on this server: start it with --allow-client-shm to register and use regions")]
    SharedMemoryDisabled,

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

    pub fn code(&self) -> Code {
        match self {
            Error::SessionNotFound { .. }
            | Error::LayerNotFound { .. }
            | Error::ModelNotFound { .. }
            | Error::OptimizerNotFound { .. }
            | Error::RegionNotFound { .. } => Code::NotFound,
            Error::SessionExists { .. }
            | Error::LayerExists { .. }
            | Error::OptimizerExists { .. }
            | Error::ParamsOwned { .. }
            | Error::RegionExists { .. } => Code::AlreadyExists,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NothingKept { .. }
            | Error::SequenceRequired { .. }
            | Error::NoGradients { .. }
            | Error::StepOutOfOrder { .. }
            | Error::RegionUnusable { .. }
            | Error::SharedMemoryDisabled => Code::FailedPrecondition,
            Error::LimitExceeded { .. } => Code::ResourceExhausted,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::Overloaded { .. } => Code::Unavailable,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The stable `ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SessionNotFound { .. } => "SESSION_NOT_FOUND",
            Error::LayerNotFound { .. } => "LAYER_NOT_FOUND",
            Error::SessionExists { .. } => "SESSION_EXISTS",
            Error::ModelNotFound { .. } => "MODEL_NOT_FOUND",
            Error::SequenceRequired { .. } => "SEQUENCE_REQUIRED",
            Error::LayerExists { .. } => "LAYER_EXISTS",
            Error::OptimizerNotFound { .. } => "OPTIMIZER_NOT_FOUND",
            Error::OptimizerExists { .. } => "OPTIMIZER_EXISTS",
            Error::ParamsOwned { .. } => "PARAMS_OWNED",
            Error::NoGradients { .. } => "NO_GRADIENTS",
            Error::StepOutOfOrder { .. } => "STEP_OUT_OF_ORDER",
            Error::InvalidArgument { reason, .. } | Error::Unauthenticated { reason, .. } => reason,
            Error::NothingKept { .. } => "NOTHING_KEPT",
            Error::LimitExceeded { .. } => "LIMIT_EXCEEDED",
            Error::Overloaded { .. } => "OVERLOADED",
            Error::Timeout(_) => "REQUEST_TIMEOUT",
            Error::RegionNotFound { .. } => "REGION_NOT_FOUND",
            Error::RegionExists { .. } => "REGION_EXISTS",
            Error::RegionUnusable { .. } => "REGION_UNUSABLE",
            Error::SharedMemoryDisabled => "SHARED_MEMORY_DISABLED",
            Error::Internal(_) => "INTERNAL",
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        // Numbers, formatted for the pairs below to borrow.
        let numbers: [String; 2];
        let pairs: Vec<(&str, &str)> = match self {
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
            Error::ModelNotFound { model, version, .. } => {
                vec![("model", model), ("version", version)]
            }
            Error::SequenceRequired { model } => vec![("model", model)],
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
                numbers = [expected.to_string(), got.to_string()];
                vec![
                    ("optimizer_id", optimizer_id),
                    ("expected", &numbers[0]),
                    ("got", &numbers[1]),
                ]
            }
            Error::InvalidArgument { field, .. } => vec![("field", field)],
            Error::NothingKept { layer_id } => vec![("layer_id", layer_id)],
            Error::LimitExceeded { flag, limit, .. } => vec![("limit", flag), ("value", limit)],
            Error::Overloaded { .. } => vec![("limit", "--max-concurrent-calls")],
            Error::RegionNotFound { region, field } => vec![("region", region), ("field", field)],
            Error::RegionExists { region } | Error::RegionUnusable { region, .. } => {
                vec![("region", region)]
            }
            Error::SharedMemoryDisabled => vec![("flag", "--allow-client-shm")],
            Error::Unauthenticated { .. } | Error::Timeout(_) | Error::Internal(_) => vec![],
        };
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let mut details = ErrorDetails::new();
        details.set_error_info(error.reason(), ERROR_DOMAIN, error.metadata());
        if let Error::InvalidArgument {
            field,
            expected,
            got,
            ..
        } = &error
        {
            details.add_bad_request_violation(field, format!("expected {expected}, got {got}"));
        }
        Status::with_error_details(error.code(), error.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_code_message_and_details() {
        let status = Status::from(Error::invalid(
            "x.dtype",
            "DTYPE_FLOAT32",
            "0",
            "INVALID_TENSOR",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "x.dtype: expected DTYPE_FLOAT32, got 0");
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_TENSOR", ERROR_DOMAIN)
        );
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "x.dtype"
        );

        let status = Status::from(Error::NothingKept {
            layer_id: "l1".into(),
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.get_error_details().error_info().unwrap().metadata["layer_id"],
            "l1"
        );
    }
}
