//! Why a call failed, as the protocols answer it: a domain [`Error`], or one
//! that only the protocol edges raise (authentication, overload, the request
//! timeout, KServe models and shared memory); and the one mapping of both to
//! `tonic::Status`.
//!
//! Every status carries a message naming the field, what was expected and
//! what came, plus `google.rpc` details clients can branch on: an `ErrorInfo`
//! whose `reason` is stable (e.g. `SESSION_NOT_FOUND`, `NOTHING_KEPT`) in the
//! domain `layerd.v1`, and for bad arguments a `BadRequest` field violation.
//! The mapping is exhaustive: a new variant does not compile until it has a
//! code.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// The `ErrorInfo.domain` of every error.
pub const ERROR_DOMAIN: &str = "layerd.v1";

/// A failed call: the domain's error, or the edges' own.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Domain(#[from] Error),

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

    /// The session store (`--session-store`) did not answer: nothing was
    /// committed there; the call may be retried.
    #[error("the session store is unavailable ({detail}); retry")]
    StoreUnavailable { detail: String },

    /// Another replica holds the session now (this one's write was fenced,
    /// or it is handing the session over, or its live holder did not hand
    /// it over in time): the call did not take effect here; retry.
    #[error(
        "session {session_id:?} is held by another replica{}; the call did not take effect, retry",
        holder_named(holder)
    )]
    SessionMoved { session_id: String, holder: String },

    /// What the session store holds for the session is not a session of
    /// layerd's (truncated, foreign, another owner's): the session is lost.
    #[error(
        "session {session_id:?} is lost: its stored state is invalid ({detail}); create it again"
    )]
    SessionLost { session_id: String, detail: String },

    /// The server runs without `--allow-client-shm`.
    #[error("system shared memory is disabled on this server: start it with --allow-client-shm to register and use regions")]
    SharedMemoryDisabled,
}

impl CallError {
    /// A malformed field: `field: expected …, got …` (a domain error).
    pub fn invalid(
        field: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
        reason: &'static str,
    ) -> CallError {
        Error::invalid(field, expected, got, reason).into()
    }

    /// A server fault (a domain error: it is one whatever raised it).
    pub fn internal(detail: impl Into<String>) -> CallError {
        Error::Internal(detail.into()).into()
    }

    pub fn code(&self) -> Code {
        match self {
            CallError::Domain(error) => domain_code(error),
            CallError::ModelNotFound { .. } | CallError::RegionNotFound { .. } => Code::NotFound,
            CallError::RegionExists { .. } => Code::AlreadyExists,
            CallError::SequenceRequired { .. }
            | CallError::RegionUnusable { .. }
            | CallError::SharedMemoryDisabled => Code::FailedPrecondition,
            CallError::Unauthenticated { .. } => Code::Unauthenticated,
            CallError::Overloaded { .. }
            | CallError::StoreUnavailable { .. }
            | CallError::SessionMoved { .. } => Code::Unavailable,
            CallError::SessionLost { .. } => Code::DataLoss,
            CallError::Timeout(_) => Code::DeadlineExceeded,
        }
    }

    /// The stable `ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            CallError::Domain(error) => error.reason(),
            CallError::ModelNotFound { .. } => "MODEL_NOT_FOUND",
            CallError::SequenceRequired { .. } => "SEQUENCE_REQUIRED",
            CallError::Unauthenticated { reason, .. } => reason,
            CallError::Overloaded { .. } => "OVERLOADED",
            CallError::Timeout(_) => "REQUEST_TIMEOUT",
            CallError::RegionNotFound { .. } => "REGION_NOT_FOUND",
            CallError::RegionExists { .. } => "REGION_EXISTS",
            CallError::RegionUnusable { .. } => "REGION_UNUSABLE",
            CallError::SharedMemoryDisabled => "SHARED_MEMORY_DISABLED",
            CallError::StoreUnavailable { .. } => "STORE_UNAVAILABLE",
            CallError::SessionMoved { .. } => "SESSION_MOVED",
            CallError::SessionLost { .. } => "SESSION_LOST",
        }
    }

    /// Whether this is a server fault (logged as an error, not a client's).
    pub fn is_internal(&self) -> bool {
        matches!(self, CallError::Domain(Error::Internal(_)))
    }

    fn metadata(&self) -> Vec<(&'static str, String)> {
        let pairs: Vec<(&'static str, &str)> = match self {
            CallError::Domain(error) => return error.metadata(),
            CallError::ModelNotFound { model, version, .. } => {
                vec![("model", model), ("version", version)]
            }
            CallError::SequenceRequired { model } => vec![("model", model)],
            CallError::Overloaded { .. } => vec![("limit", "--max-concurrent-calls")],
            CallError::RegionNotFound { region, field } => {
                vec![("region", region), ("field", field)]
            }
            CallError::RegionExists { region } | CallError::RegionUnusable { region, .. } => {
                vec![("region", region)]
            }
            CallError::SharedMemoryDisabled => vec![("flag", "--allow-client-shm")],
            CallError::StoreUnavailable { .. } => vec![("flag", "--session-store")],
            CallError::SessionMoved { session_id, holder } => {
                vec![("session_id", session_id), ("holder", holder)]
            }
            CallError::SessionLost { session_id, .. } => vec![("session_id", session_id)],
            CallError::Unauthenticated { .. } | CallError::Timeout(_) => vec![],
        };
        pairs.into_iter().map(|(k, v)| (k, v.to_string())).collect()
    }
}

/// ` (replica "name")`, or nothing when the holder is not known.
fn holder_named(holder: &str) -> String {
    if holder.is_empty() {
        String::new()
    } else {
        format!(" (replica {holder:?})")
    }
}

/// The gRPC code of a domain error.
fn domain_code(error: &Error) -> Code {
    match error {
        Error::SessionNotFound { .. }
        | Error::LayerNotFound { .. }
        | Error::OptimizerNotFound { .. } => Code::NotFound,
        Error::SessionExists { .. }
        | Error::LayerExists { .. }
        | Error::OptimizerExists { .. }
        | Error::ParamsOwned { .. } => Code::AlreadyExists,
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NothingKept { .. }
        | Error::KeptStateLost { .. }
        | Error::NoGradients { .. }
        | Error::StepOutOfOrder { .. } => Code::FailedPrecondition,
        Error::LimitExceeded { .. } => Code::ResourceExhausted,
        Error::Internal(_) => Code::Internal,
    }
}

impl From<CallError> for Status {
    fn from(error: CallError) -> Status {
        let mut details = ErrorDetails::new();
        let metadata: std::collections::HashMap<String, String> = error
            .metadata()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        details.set_error_info(error.reason(), ERROR_DOMAIN, metadata);
        if let CallError::Domain(Error::InvalidArgument {
            field,
            expected,
            got,
            ..
        }) = &error
        {
            details.add_bad_request_violation(field, format!("expected {expected}, got {got}"));
        }
        Status::with_error_details(error.code(), error.to_string(), details)
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        CallError::from(error).into()
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
