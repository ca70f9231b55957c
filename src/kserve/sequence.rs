//! Request parameters that tie KServe calls to layerd sessions.
//!
//! A non-zero `sequence_id` (uint64, int64 — read as its two's-complement
//! uint64, as Triton does — or a non-empty string) names a session:
//! `seq:<decimal>` for numbers, `seq:s:<string>` for strings, so the two kinds
//! never collide with each other. `sequence_start` creates it,
//! `sequence_end` closes it after the answer, and `layer_id` picks the layer
//! instance inside it (default: the model's kind). Every other parameter is
//! ignored, as the protocol asks.

use std::collections::HashMap;

use tonic::metadata::MetadataMap;

use crate::error::Error;
use crate::pb::inference::{infer_parameter::ParameterChoice, InferParameter};
use crate::rpc::SESSION_HEADER;
use crate::session::check_id;

/// A sequence id as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceId {
    Number(u64),
    Text(String),
}

impl SequenceId {
    /// The id of the layerd session that holds this sequence.
    pub fn session_id(&self) -> String {
        match self {
            SequenceId::Number(n) => format!("seq:{n}"),
            SequenceId::Text(s) => format!("seq:s:{s}"),
        }
    }

    /// Whether an `x-session-id` value routes this sequence: the id as the
    /// client wrote it (a number in decimal, signed or not) or the session id.
    fn routed_by(&self, header: &[u8]) -> bool {
        let header = String::from_utf8_lossy(header);
        let as_sent = match self {
            SequenceId::Number(n) => header == n.to_string() || header == (*n as i64).to_string(),
            SequenceId::Text(s) => header == s.as_str(),
        };
        as_sent || header == self.session_id()
    }
}

/// The parameters of one request that layerd acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SequenceParams {
    /// `None`: a stateless call.
    pub id: Option<SequenceId>,
    pub start: bool,
    pub end: bool,
    pub layer_id: Option<String>,
}

impl SequenceParams {
    /// Reads the sequence parameters of a request, checking their types.
    pub fn parse(parameters: &HashMap<String, InferParameter>) -> Result<SequenceParams, Error> {
        let id = match choice(parameters, "sequence_id") {
            None => None,
            Some(ParameterChoice::Uint64Param(0) | ParameterChoice::Int64Param(0)) => None,
            Some(ParameterChoice::Uint64Param(n)) => Some(SequenceId::Number(*n)),
            Some(ParameterChoice::Int64Param(n)) => Some(SequenceId::Number(*n as u64)),
            Some(ParameterChoice::StringParam(s)) if s.is_empty() => None,
            Some(ParameterChoice::StringParam(s)) => {
                // The session id adds 6 characters to the 128 a session id may have.
                check_id("parameters.sequence_id", s).and_then(|()| match s.len() <= 120 {
                    true => Ok(()),
                    false => Err(Error::invalid(
                        "parameters.sequence_id",
                        "at most 120 characters",
                        format!("{} characters", s.len()),
                        "INVALID_ID",
                    )),
                })?;
                Some(SequenceId::Text(s.clone()))
            }
            Some(other) => return Err(wrong_type("sequence_id", "uint64, int64 or string", other)),
        };
        let start = flag(parameters, "sequence_start")?;
        let end = flag(parameters, "sequence_end")?;
        let layer_id = match choice(parameters, "layer_id") {
            None => None,
            Some(ParameterChoice::StringParam(s)) => {
                check_id("parameters.layer_id", s)?;
                Some(s.clone())
            }
            Some(other) => return Err(wrong_type("layer_id", "string", other)),
        };
        if id.is_none() && (start || end) {
            let name = if start {
                "sequence_start"
            } else {
                "sequence_end"
            };
            return Err(Error::invalid(
                format!("parameters.{name}"),
                "a non-zero sequence_id alongside it",
                "no sequence_id (or 0, or \"\")",
                "SEQUENCE_ID_MISSING",
            ));
        }
        Ok(SequenceParams {
            id,
            start,
            end,
            layer_id,
        })
    }

    /// If the call carries `x-session-id`, it must route this sequence.
    pub fn check_routing(&self, metadata: &MetadataMap) -> Result<(), Error> {
        let (Some(id), Some(header)) = (&self.id, metadata.get(SESSION_HEADER)) else {
            return Ok(());
        };
        if id.routed_by(header.as_bytes()) {
            return Ok(());
        }
        Err(Error::invalid(
            SESSION_HEADER,
            format!(
                "the request's sequence_id ({}) or its session id {:?} (the header routes the call)",
                match id {
                    SequenceId::Number(n) => n.to_string(),
                    SequenceId::Text(s) => format!("{s:?}"),
                },
                id.session_id()
            ),
            format!("{:?}", String::from_utf8_lossy(header.as_bytes())),
            "SESSION_HEADER_MISMATCH",
        ))
    }
}

fn choice<'a>(
    parameters: &'a HashMap<String, InferParameter>,
    name: &str,
) -> Option<&'a ParameterChoice> {
    parameters
        .get(name)
        .and_then(|p| p.parameter_choice.as_ref())
}

fn flag(parameters: &HashMap<String, InferParameter>, name: &str) -> Result<bool, Error> {
    match choice(parameters, name) {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(*b),
        Some(other) => Err(wrong_type(name, "bool", other)),
    }
}

fn wrong_type(name: &str, expected: &str, got: &ParameterChoice) -> Error {
    Error::invalid(
        format!("parameters.{name}"),
        format!("a {expected} parameter"),
        describe(got),
        "INVALID_PARAMETER",
    )
}

/// A parameter's type and value, for errors.
pub(super) fn describe(choice: &ParameterChoice) -> String {
    match choice {
        ParameterChoice::BoolParam(v) => format!("bool_param {v}"),
        ParameterChoice::Int64Param(v) => format!("int64_param {v}"),
        ParameterChoice::StringParam(v) => format!("string_param {v:?}"),
        ParameterChoice::DoubleParam(v) => format!("double_param {v}"),
        ParameterChoice::Uint64Param(v) => format!("uint64_param {v}"),
    }
}

/// Request parameters from pairs, for tests.
#[cfg(test)]
pub(super) fn params(pairs: &[(&str, ParameterChoice)]) -> HashMap<String, InferParameter> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                InferParameter {
                    parameter_choice: Some(v.clone()),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_id_zero_or_empty_is_stateless_and_other_parameters_are_ignored() {
        for p in [
            params(&[]),
            params(&[("sequence_id", ParameterChoice::Uint64Param(0))]),
            params(&[("sequence_id", ParameterChoice::Int64Param(0))]),
            params(&[("sequence_id", ParameterChoice::StringParam(String::new()))]),
            params(&[
                ("priority", ParameterChoice::Uint64Param(3)),
                ("timeout", ParameterChoice::DoubleParam(1.5)),
            ]),
        ] {
            assert_eq!(
                SequenceParams::parse(&p).unwrap(),
                SequenceParams::default()
            );
        }
    }

    #[test]
    fn ids_cover_the_full_range_and_int64_reads_as_its_uint64() {
        let read = |c| {
            SequenceParams::parse(&params(&[("sequence_id", c)]))
                .unwrap()
                .id
                .unwrap()
        };
        assert_eq!(
            read(ParameterChoice::Uint64Param(u64::MAX)),
            SequenceId::Number(u64::MAX)
        );
        assert_eq!(
            read(ParameterChoice::Int64Param(-1)),
            SequenceId::Number(u64::MAX)
        );
        assert_eq!(
            read(ParameterChoice::Int64Param(i64::MIN)),
            SequenceId::Number(1 << 63)
        );
        assert_eq!(read(ParameterChoice::Uint64Param(7)).session_id(), "seq:7");
        assert_eq!(
            read(ParameterChoice::StringParam("7".into())).session_id(),
            "seq:s:7"
        );
        assert!(SequenceId::Number(u64::MAX).routed_by(b"-1"));
        assert!(SequenceId::Number(u64::MAX).routed_by(b"18446744073709551615"));
        assert!(SequenceId::Number(7).routed_by(b"seq:7"));
        assert!(!SequenceId::Number(7).routed_by(b"8"));
    }

    #[test]
    fn wrong_types_and_flags_without_an_id_are_rejected() {
        for (p, field) in [
            (
                params(&[("sequence_id", ParameterChoice::BoolParam(true))]),
                "parameters.sequence_id",
            ),
            (
                params(&[("sequence_id", ParameterChoice::StringParam("a b".into()))]),
                "parameters.sequence_id",
            ),
            (
                params(&[
                    ("sequence_id", ParameterChoice::Uint64Param(1)),
                    ("sequence_start", ParameterChoice::Int64Param(1)),
                ]),
                "parameters.sequence_start",
            ),
            (
                params(&[("sequence_start", ParameterChoice::BoolParam(true))]),
                "parameters.sequence_start",
            ),
            (
                params(&[
                    ("sequence_id", ParameterChoice::Uint64Param(1)),
                    ("layer_id", ParameterChoice::Int64Param(1)),
                ]),
                "parameters.layer_id",
            ),
        ] {
            match SequenceParams::parse(&p).unwrap_err() {
                Error::InvalidArgument { field: f, .. } => assert_eq!(f, field),
                other => panic!("{other}"),
            }
        }
    }
}
