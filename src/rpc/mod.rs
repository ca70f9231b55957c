//! The RPC plumbing both protocols share, beside their handlers: a span,
//! the request timeout and the metrics around each call ([`observe`]), the
//! routing and ordering headers, in-order answers for streams ([`stream`]),
//! and the one mapping of errors to statuses ([`status`]).
//!
//! Nothing here computes: the handlers validate and decode, then hand the work
//! to [`crate::engine`].

pub mod status;
pub mod stream;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use tonic::{metadata::MetadataMap, Code};
use tracing::{field, Instrument, Span};

use crate::error::Error;
use crate::metrics;
use status::CallError;

/// The metadata key load balancers hash on to route a session to its replica.
pub const SESSION_HEADER: &str = "x-session-id";

/// Metadata that orders a Step or TrainStep: the call runs as its
/// optimizer's update N + 1, after N updates (waiting for them if they have
/// not all been applied yet), and fails with STEP_OUT_OF_ORDER if the
/// optimizer is already past N. A client may then send its next steps
/// without waiting for the answers of the earlier ones.
pub const AFTER_STEPS_HEADER: &str = "x-layerd-after-steps";

/// The number of the step a Step or TrainStep is to run after: its
/// `expected_step` field or its `x-layerd-after-steps` header (both must
/// agree when both are given), if it carries one.
pub fn after_steps(metadata: &MetadataMap, field: Option<u64>) -> Result<Option<u64>, Error> {
    let Some(value) = metadata.get(AFTER_STEPS_HEADER) else {
        return Ok(field);
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let header = text.parse::<u64>().map_err(|_| {
        Error::invalid(
            AFTER_STEPS_HEADER,
            "the optimizer's update count this call follows, a decimal integer ≥ 0",
            format!("{text:?}"),
            "INVALID_HEADER",
        )
    })?;
    match field {
        Some(field) if field != header => Err(Error::invalid(
            "expected_step",
            format!("the same count as the {AFTER_STEPS_HEADER} header ({header}), or unset"),
            field.to_string(),
            "INVALID_HEADER",
        )),
        _ => Ok(Some(header)),
    }
}

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
    call: impl Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    let Rpc { method, span } = rpc;
    let started = Instant::now();
    let (result, kind) = metrics::with_kind(tokio::time::timeout(
        request_timeout,
        call.instrument(span.clone()),
    ))
    .await;
    let result = result.unwrap_or(Err(CallError::Timeout(request_timeout)));
    let code = result.as_ref().map_or_else(CallError::code, |_| Code::Ok);
    span.record("code", field::debug(code));
    let elapsed = started.elapsed();
    metrics::call(method, kind, code, elapsed);
    let micros = elapsed.as_micros() as u64;
    span.in_scope(|| match &result {
        Ok(_) => tracing::debug!(micros, "ok"),
        Err(error) if error.is_internal() => tracing::error!(micros, %error, "failed"),
        Err(error) => tracing::info!(micros, %error, "failed"),
    });
    result
}
