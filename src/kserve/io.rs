//! Where a request's input is and where its output goes: in the message, in
//! the request's frames, or in a shared-memory region; all checked before
//! anything runs. A stateless call whose input is still in its frames or
//! region is computed a chunk at a time as it is read ([`Streamed`]).

use bytes::{Buf, Bytes};

use super::codec::{first_typed_list, kserve_layout, kserve_raw_layout};
use super::models::{Model, VERSION};
use super::shm::{RegionUse, ShmRef};
use super::stats::Stages;
use super::wire::{Chunks, Start};
use super::InferenceService;
use crate::auth::Principal;
use crate::dtype::Wire;
use crate::engine::{compute, forward_stateless_parts, Parts};
use crate::error::Error;
use crate::metrics;
use crate::pb::inference as pb;
use crate::rpc::status::CallError;
use crate::tensor::Tensor;

/// A request's input, and where its output goes when not in the response.
pub(super) struct Io {
    pub(super) input: Input,
    pub(super) output_region: Option<RegionUse>,
}

/// A request's raw input content: in the message (tonic's codec decoded
/// it), or still in the frames it arrived in ([`wire::decode_framed`]).
pub(super) enum Raw {
    Message(Bytes),
    Frames(Chunks),
}

impl Raw {
    /// The bytes in one buffer, aligned for the math (copied once if they
    /// are in several frames or misaligned in one).
    pub(super) fn into_bytes(self) -> Bytes {
        match self {
            Raw::Message(bytes) => bytes,
            Raw::Frames(chunks) => chunks.into_bytes(Start::Aligned),
        }
    }
}

/// A request's input: decoded from the message, or validated and still
/// where it arrived (its region, or the request's frames).
pub(super) enum Input {
    Message(Tensor),
    Deferred {
        source: Source,
        tensor: Box<pb::model_infer_request::InferInputTensor>,
        wire: Wire,
        len: usize,
    },
}

/// Where a deferred input's bytes are.
pub(super) enum Source {
    Region(RegionUse),
    Frames(Chunks),
}

/// A streamed call's input and output, as the engine reads and writes them.
pub(super) struct StreamedParts {
    input: Source,
    output: Option<RegionUse>,
}

impl Parts for StreamedParts {
    type Error = CallError;

    fn read(&mut self, from: usize, len: usize) -> Result<Vec<Bytes>, CallError> {
        Ok(match &mut self.input {
            Source::Region(held) => vec![held.read_range(from as u64, len)?],
            Source::Frames(chunks) => chunks.split_to(len).into_pieces().collect(),
        })
    }

    fn writes_elsewhere(&self) -> bool {
        self.output.is_some()
    }

    fn write(&mut self, from: usize, answer: &[u8]) -> Result<(), CallError> {
        match &self.output {
            Some(region) => region.write_at(from as u64, answer),
            None => Ok(()),
        }
    }
}

impl Input {
    pub(super) fn len(&self) -> usize {
        match self {
            Input::Message(tensor) => tensor.len(),
            Input::Deferred { len, .. } => *len,
        }
    }

    /// The input as one tensor, read from where it is.
    pub(super) async fn read(self) -> Result<Tensor, CallError> {
        let (source, tensor, len) = match self {
            Input::Message(tensor) => return Ok(tensor),
            Input::Deferred {
                source,
                tensor,
                len,
                ..
            } => (source, tensor, len),
        };
        let (data, field) = match source {
            Source::Region(held) => (
                compute(len, move || held.read()).await??,
                SHM_BYTE_SIZE_FIELD,
            ),
            Source::Frames(chunks) => (
                compute(len, move || chunks.into_bytes(Start::Aligned)).await?,
                RAW_INPUT_FIELD,
            ),
        };
        Ok(Tensor::from_kserve(
            *tensor,
            Some(data),
            "inputs[0]",
            field,
        )?)
    }
}

/// A stateless call computed a chunk at a time as its input is read: from
/// its region, or from the request's frames, into the output's region or
/// the response.
pub(super) struct Streamed {
    pub(super) input: Source,
    pub(super) output: Option<RegionUse>,
    /// The input's (and output's) shape, as the request gave it.
    pub(super) shape: Vec<i64>,
    pub(super) wire: Wire,
    pub(super) len: usize,
}

/// The request's raw contents of its one input.
pub(super) const RAW_INPUT_FIELD: &str = "raw_input_contents[0]";

/// Where an input's byte size in a region is given.
pub(super) const SHM_BYTE_SIZE_FIELD: &str = "inputs[0].parameters.shared_memory_byte_size";

impl InferenceService {
    /// The request's input, from its message or held in its shared-memory
    /// region, and the region its output goes to: all checked before
    /// anything runs.
    pub(super) fn take_io(
        &self,
        model: Model,
        owner: &Principal,
        request: &mut pb::ModelInferRequest,
        frames: Option<Vec<Chunks>>,
    ) -> Result<Io, CallError> {
        let regions = &self.shared.regions;
        let (input, raw) = take_input_parts(model, request, frames)?;
        let output_ref = match request.outputs.first() {
            Some(output) => ShmRef::parse(&output.parameters, "outputs[0]")?,
            None => None,
        };
        let Some(input_ref) = ShmRef::parse(&input.parameters, "inputs[0]")? else {
            if let Some(Raw::Frames(chunks)) = raw {
                let (wire, shape, len) =
                    kserve_raw_layout(&input, chunks.remaining(), "inputs[0]", RAW_INPUT_FIELD)?;
                let output_region = self.output_region(owner, output_ref, wire, &shape)?;
                return Ok(Io {
                    input: Input::Deferred {
                        source: Source::Frames(chunks),
                        tensor: Box::new(input),
                        wire,
                        len,
                    },
                    output_region,
                });
            }
            let input = message_input(input, raw)?;
            let output_region =
                self.output_region(owner, output_ref, input.wire(), input.shape())?;
            return Ok(Io {
                input: Input::Message(input),
                output_region,
            });
        };
        if raw.is_some() {
            return Err(CallError::invalid(
                "raw_input_contents",
                format!(
                    "none: inputs[0] is in shared-memory region {:?}",
                    input_ref.region
                ),
                "1 entry",
                "INVALID_INPUTS",
            ));
        }
        if let Some(list) = first_typed_list(&input) {
            return Err(CallError::invalid(
                format!("inputs[0].contents.{list}"),
                format!(
                    "no elements: inputs[0] is in shared-memory region {:?}",
                    input_ref.region
                ),
                "elements",
                "INVALID_INPUTS",
            ));
        }
        let (wire, shape, len) = kserve_layout(&input, "inputs[0]")?;
        let want = len * wire.itemsize();
        if input_ref.byte_size != want as u64 {
            return Err(CallError::invalid(
                SHM_BYTE_SIZE_FIELD,
                format!(
                    "{want} bytes (shape {:?} of {})",
                    input.shape, input.datatype
                ),
                format!("{} bytes", input_ref.byte_size),
                "INVALID_TENSOR",
            ));
        }
        let held = regions.hold(owner, &input_ref, "inputs[0]")?;
        let output_region = self.output_region(owner, output_ref, wire, &shape)?;
        Ok(Io {
            input: Input::Deferred {
                source: Source::Region(held),
                tensor: Box::new(input),
                wire,
                len,
            },
            output_region,
        })
    }

    /// Holds the output's region, checked to fit the output (of the input's
    /// shape and datatype: every model is elementwise).
    pub(super) fn output_region(
        &self,
        owner: &Principal,
        output_ref: Option<ShmRef>,
        wire: Wire,
        shape: &[usize],
    ) -> Result<Option<RegionUse>, CallError> {
        let Some(output_ref) = output_ref else {
            return Ok(None);
        };
        let held = self.shared.regions.hold(owner, &output_ref, "outputs[0]")?;
        let need = (shape.iter().product::<usize>() * wire.itemsize()) as u64;
        if held.len() < need {
            return Err(CallError::invalid(
                "outputs[0].parameters.shared_memory_byte_size",
                format!(
                    "at least {need} bytes (the output: shape {shape:?} of {})",
                    wire.kserve_name()
                ),
                format!("{} bytes", held.len()),
                "OUT_OF_BOUNDS",
            ));
        }
        Ok(Some(held))
    }

    /// A stateless Forward from where the input is to where the output goes,
    /// in one pass ([`forward_stateless_parts`]: the models are elementwise,
    /// and every element's answer is the one the layer gives the whole
    /// tensor). The
    /// input is never copied whole: frames are read as they came; a region
    /// a chunk at a time, and into a region the server holds no memory of
    /// the tensor's size at all.
    pub(super) async fn stream_stateless(
        &self,
        model: Model,
        id: String,
        streamed: Streamed,
        stages: &mut Stages,
    ) -> Result<pb::ModelInferResponse, CallError> {
        let Streamed {
            input,
            output,
            shape,
            wire,
            len,
        } = streamed;
        let parts = StreamedParts { input, output };
        let raw = forward_stateless_parts(model.kind, wire, len, parts, &mut stages.layer).await?;
        let total = len * wire.itemsize();
        metrics::tensor_bytes(metrics::Direction::In, total);
        metrics::tensor_bytes(metrics::Direction::Out, total);
        Ok(pb::ModelInferResponse {
            model_name: model.name(),
            model_version: VERSION.to_string(),
            id,
            outputs: vec![pb::model_infer_response::InferOutputTensor {
                name: model.output().to_string(),
                datatype: wire.kserve_name().to_string(),
                shape,
                ..Default::default()
            }],
            // As Triton: an empty entry for an output in a region.
            raw_output_contents: vec![raw],
            ..Default::default()
        })
    }
}

/// Validates the request's one input (and requested outputs) for `model`,
/// with its elements in the message (raw or typed contents).
pub fn take_input(model: Model, request: &mut pb::ModelInferRequest) -> Result<Tensor, CallError> {
    let (input, raw) = take_input_parts(model, request, None)?;
    Ok(message_input(input, raw)?)
}

/// The input as a tensor, its elements in the message: typed contents, or
/// `raw` (the request's `raw_input_contents[0]`).
pub(super) fn message_input(
    input: pb::model_infer_request::InferInputTensor,
    raw: Option<Raw>,
) -> Result<Tensor, Error> {
    Tensor::from_kserve(
        input,
        raw.map(Raw::into_bytes),
        "inputs[0]",
        RAW_INPUT_FIELD,
    )
}

/// Checks the request's one input (and requested outputs) for `model`, and
/// takes the input with its raw contents, if any: from `frames` when the
/// message was decoded with its raw contents left in them, else from the
/// message.
pub(super) fn take_input_parts(
    model: Model,
    request: &mut pb::ModelInferRequest,
    frames: Option<Vec<Chunks>>,
) -> Result<(pb::model_infer_request::InferInputTensor, Option<Raw>), CallError> {
    if request.inputs.len() != 1 {
        return Err(CallError::invalid(
            "inputs",
            format!("one input, {:?}", model.input()),
            format!("{} inputs", request.inputs.len()),
            "INVALID_INPUTS",
        ));
    }
    let input = request.inputs.remove(0);
    if input.name != model.input() {
        return Err(CallError::invalid(
            "inputs[0].name",
            format!("{:?} (model {})", model.input(), model.name()),
            format!("{:?}", input.name),
            "INVALID_INPUTS",
        ));
    }
    for (i, output) in request.outputs.iter().enumerate() {
        if output.name != model.output() {
            return Err(CallError::invalid(
                format!("outputs[{i}].name"),
                format!("{:?} (model {})", model.output(), model.name()),
                format!("{:?}", output.name),
                "INVALID_OUTPUTS",
            ));
        }
    }
    let mut raw: Vec<Raw> = match frames {
        Some(frames) => frames.into_iter().map(Raw::Frames).collect(),
        None => std::mem::take(&mut request.raw_input_contents)
            .into_iter()
            .map(Raw::Message)
            .collect(),
    };
    let raw = match raw.len() {
        0 => None,
        1 => raw.pop(),
        n => {
            return Err(CallError::invalid(
                "raw_input_contents",
                "one entry per input (1), or none when inputs carry contents",
                format!("{n} entries"),
                "INVALID_INPUTS",
            ))
        }
    };
    Ok((input, raw))
}
