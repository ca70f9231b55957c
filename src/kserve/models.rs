//! The KServe models layerd serves: one per layer kind and pass.
//!
//! `relu`, `sigmoid`, `identity` run Forward (input `x`, output `y`), and
//! keep state when the request belongs to a sequence;
//! `relu_backward`, `sigmoid_backward`, `identity_backward` run Backward
//! (input `dout`, output `dx`) on the layer instance of the same kind in the
//! request's sequence. These advertise `sequence_batching`, so clients such as
//! perf_analyzer drive them as sequences.
//!
//! `relu_no_grad`, `sigmoid_no_grad`, `identity_no_grad` are Forward that
//! never keeps anything (the native API's `no_grad`): plain stateless models,
//! for tools that would otherwise treat every model as a sequence model.
//!
//! Every model has version "1" and accepts FP32, FP64, FP16 and BF16 of any
//! shape (metadata shape `[-1]`, `max_batch_size` 0; the half types in raw
//! contents only, as KServe has no typed contents for them), answering in
//! the input's datatype.

use std::time::Duration;

use crate::dtype::DType;
use crate::layers::{Chain, Kind, Spec};
use crate::pb::inference::{
    self, model_config::SchedulingChoice, model_metadata_response::TensorMetadata,
};
use crate::rpc::status::CallError;

/// The one version of every model.
pub const VERSION: &str = "1";

/// The `platform` and `backend` reported for every model.
pub const PLATFORM: &str = "layerd";

/// The datatype models advertise; FP64, FP16 and BF16 are accepted as well
/// and answered in kind (a KServe input has one advertised datatype).
const ADVERTISED: DType = DType::F32;

/// Which pass of its layer a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Forward; keeps state inside a sequence.
    Forward,
    /// Backward, from what the sequence's Forward kept.
    Backward,
    /// Forward that keeps nothing; a stateless model.
    NoGrad,
}

impl Pass {
    const ALL: [Pass; 3] = [Pass::Forward, Pass::Backward, Pass::NoGrad];

    /// The model name's suffix after the kind.
    fn suffix(self) -> &'static str {
        match self {
            Pass::Forward => "",
            Pass::Backward => "_backward",
            Pass::NoGrad => "_no_grad",
        }
    }
}

/// One served model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub kind: Kind,
    pub pass: Pass,
}

impl Model {
    /// Every model: Forward, Backward, then no-grad ones, in kind order.
    pub fn all() -> impl Iterator<Item = Model> {
        Pass::ALL.into_iter().flat_map(|pass| {
            Kind::ELEMENTWISE
                .into_iter()
                .map(move |kind| Model { kind, pass })
        })
    }

    /// A dense index over [`Model::all`], for per-model tables.
    pub fn index(self) -> usize {
        let position = |found: Option<usize>| found.unwrap_or(0);
        let pass = position(Pass::ALL.iter().position(|&d| d == self.pass));
        let kind = position(Kind::ELEMENTWISE.iter().position(|&k| k == self.kind));
        pass * Kind::ELEMENTWISE.len() + kind
    }

    /// The layer a model computes (one without parameters).
    pub fn chain(self) -> Chain {
        let spec = Spec::unconfigured(self.kind).expect("models are of elementwise kinds");
        Chain::single(spec, None)
    }

    pub fn count() -> usize {
        Pass::ALL.len() * Kind::ELEMENTWISE.len()
    }

    /// The model `name` at `version` ("" is the latest, "1").
    pub fn find(name: &str, version: &str) -> Result<Model, CallError> {
        // Parsed, not compared against every model's formatted name: this runs
        // on every ModelInfer.
        let model = Pass::ALL.into_iter().find_map(|pass| {
            let kind = Kind::from_name(name.strip_suffix(pass.suffix())?)
                .filter(|kind| Kind::ELEMENTWISE.contains(kind))?;
            Some(Model { kind, pass })
        });
        match model {
            Some(model) if version.is_empty() || version == VERSION => Ok(model),
            _ => Err(CallError::ModelNotFound {
                model: name.to_string(),
                version: version.to_string(),
                served: Model::all()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    pub fn name(self) -> String {
        format!("{}{}", self.kind.name(), self.pass.suffix())
    }

    /// Whether the model takes part in sequences (and says so in its config).
    pub fn is_stateful(self) -> bool {
        self.pass != Pass::NoGrad
    }

    /// The name of the model's one input.
    pub fn input(self) -> &'static str {
        match self.pass {
            Pass::Forward | Pass::NoGrad => "x",
            Pass::Backward => "dout",
        }
    }

    /// The name of the model's one output.
    pub fn output(self) -> &'static str {
        match self.pass {
            Pass::Forward | Pass::NoGrad => "y",
            Pass::Backward => "dx",
        }
    }

    pub fn metadata(self) -> inference::ModelMetadataResponse {
        let tensor = |name: &str| TensorMetadata {
            name: name.to_string(),
            datatype: ADVERTISED.kserve_name().to_string(),
            shape: vec![-1],
        };
        inference::ModelMetadataResponse {
            name: self.name(),
            versions: vec![VERSION.to_string()],
            platform: PLATFORM.to_string(),
            inputs: vec![tensor(self.input())],
            outputs: vec![tensor(self.output())],
        }
    }

    /// The model's configuration; `sequence_idle` is the session idle
    /// timeout sequences get.
    pub fn config(self, sequence_idle: Duration) -> inference::ModelConfig {
        let data_type = match ADVERTISED {
            DType::F32 => inference::DataType::TypeFp32,
            DType::F64 => inference::DataType::TypeFp64,
        } as i32;
        inference::ModelConfig {
            name: self.name(),
            platform: PLATFORM.to_string(),
            backend: PLATFORM.to_string(),
            max_batch_size: 0,
            input: vec![inference::ModelInput {
                name: self.input().to_string(),
                data_type,
                dims: vec![-1],
                optional: false,
            }],
            output: vec![inference::ModelOutput {
                name: self.output().to_string(),
                data_type,
                dims: vec![-1],
            }],
            scheduling_choice: self
                .is_stateful()
                .then_some(SchedulingChoice::SequenceBatching(
                    inference::ModelSequenceBatching {
                        max_sequence_idle_microseconds: sequence_idle.as_micros() as u64,
                    },
                )),
            model_transaction_policy: Some(inference::ModelTransactionPolicy { decoupled: false }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indexes_are_dense() {
        let models: Vec<Model> = Model::all().collect();
        assert_eq!(models.len(), Model::count());
        for (i, model) in models.iter().enumerate() {
            assert_eq!(model.index(), i);
            assert_eq!(Model::find(&model.name(), "").unwrap(), *model);
            assert_eq!(Model::find(&model.name(), "1").unwrap(), *model);
        }
        let names: Vec<String> = models.iter().map(|m| m.name()).collect();
        assert!(
            names.contains(&"relu".to_string()) && names.contains(&"sigmoid_backward".to_string())
        );
    }

    #[test]
    fn unknown_models_and_versions_are_not_found() {
        for (name, version) in [
            ("tanh", ""),
            ("relu", "2"),
            ("relu_backward_backward", ""),
            ("", ""),
            // Trainable kinds are not models.
            ("affine", ""),
            ("sequential_no_grad", ""),
        ] {
            let error = Model::find(name, version).unwrap_err();
            assert_eq!(error.reason(), "MODEL_NOT_FOUND", "{name} {version}");
        }
    }
}
