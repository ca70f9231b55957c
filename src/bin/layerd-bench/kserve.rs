//! `--protocol kserve`: the Forward and train workloads over the KServe v2 /
//! Triton protocol (`inference.GRPCInferenceService`), so one Rust client
//! drives layerd and Triton alike and is not the bottleneck at 1 Mi elements.
//!
//! Each worker owns a [`Link`]: ModelInfer calls to `--model` — stateless, or
//! in sequences of `--sequence-length` rounds (Forward, and in train mode
//! Backward to `--backward-model`; the first call of a sequence carries
//! `sequence_start`, the last `sequence_end`) — with its tensors in the
//! messages' raw contents or, with `--shared-memory system`, in two POSIX
//! shared-memory objects it creates and registers (inputs: x then dout,
//! written once; outputs: y then dx, checked in place through a read-only
//! mapping of the worker's own object, which the server never resizes).
//! ModelInfer calls are written and read by `layerd::kserve::wire`, as the
//! server reads them, without tonic's codec copies: at 1 Mi elements the
//! client must not be the bottleneck. Answers become `pb::Tensor`s (left in
//! the frame they arrived in) and are checked by the same reference as the
//! native modes, bit for bit.

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt, path::PathBuf};

use bytes::Bytes;
use layerd::dtype::Wire;
use layerd::kserve::wire::{self, MODEL_INFER_PATH};
use layerd::pb::{
    self,
    inference::{
        self as ki, grpc_inference_service_client::GrpcInferenceServiceClient,
        infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
        model_infer_request::InferRequestedOutputTensor, InferParameter,
    },
};
use tonic::{
    metadata::{MetadataMap, MetadataValue},
    service::interceptor::InterceptedService,
    transport::Channel,
    Status,
};

use crate::args::{Kind, Mode, RunArgs, SharedMemory};
use crate::reference::Reference;
use crate::workload::{unique, Op, Reply, SetupError, MAX_MESSAGE};

type KClient = GrpcInferenceServiceClient<InterceptedService<Channel, layerd::client::Bearer>>;

/// Where POSIX shared-memory objects live.
const SHM_DIR: &str = "/dev/shm";

/// One worker's way to the server.
pub struct Link {
    client: KClient,
    /// The same channel for ModelInfer, whose tensors bypass tonic's codec
    /// (`layerd::kserve::wire`): the client costs less CPU per call.
    direct: InterceptedService<Channel, layerd::client::Bearer>,
    forward_model: String,
    backward_model: String,
    session_header: bool,
    /// Rounds per sequence; `None`: stateless calls.
    sequence_length: Option<u64>,
    /// Ends a sequence on Backward (train mode) rather than on Forward.
    train: bool,
    sequence: Sequence,
    regions: Option<Regions>,
    /// x and dout as sent, and their KServe datatype.
    x: pb::Tensor,
    dout: Option<pb::Tensor>,
    datatype: &'static str,
}

/// The worker's current sequence.
#[derive(Default)]
struct Sequence {
    id: u64,
    /// Rounds sent in it; 0: none started.
    rounds: u64,
}

/// A worker's two registered shared-memory objects.
struct Regions {
    input: Object,
    output: Object,
    /// The output object, mapped read-only.
    answers: Mapping,
}

/// A read-only shared mapping of a whole object; cheap to clone, unmapped
/// with its last clone.
#[derive(Clone)]
struct Mapping(std::sync::Arc<RawMapping>);

struct RawMapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is only read, and lives until the last clone is dropped.
unsafe impl Send for RawMapping {}
unsafe impl Sync for RawMapping {}

impl Mapping {
    fn of(file: &File, len: usize) -> std::io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared read-only mapping of `len` bytes of an open
        // file this process created and sized; it is unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping(std::sync::Arc::new(RawMapping {
            ptr: ptr as *const u8,
            len,
        })))
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until RawMapping drops.
        unsafe { std::slice::from_raw_parts(self.0.ptr, self.0.len) }
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `Mapping::of` mapped, once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// One shared-memory object under /dev/shm, registered as `name`.
struct Object {
    name: String,
    path: PathBuf,
    file: File,
}

impl Object {
    /// Creates the object (`size` bytes, `contents` at its start) and registers it.
    async fn create(
        client: &mut KClient,
        name: String,
        size: u64,
        contents: &[&[u8]],
    ) -> Result<Object, SetupError> {
        let path = PathBuf::from(SHM_DIR).join(&name);
        let shown = path.display().to_string();
        let unfit = |e: std::io::Error| SetupError::Unfit(format!("{shown}: {e}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(unfit)?;
        let object = Object { name, path, file };
        object.file.set_len(size.max(1)).map_err(unfit)?;
        let mut at = 0;
        for part in contents {
            object.file.write_all_at(part, at).map_err(unfit)?;
            at += part.len() as u64;
        }
        let request = ki::SystemSharedMemoryRegisterRequest {
            name: object.name.clone(),
            key: format!("/{}", object.name),
            offset: 0,
            byte_size: size.max(1),
        };
        client
            .system_shared_memory_register(request)
            .await
            .map_err(SetupError::Rejected)?;
        Ok(object)
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The links of a run: one per worker, on `channels` in turn.
pub async fn links(
    args: &RunArgs,
    kind: Kind,
    reference: &Reference,
    channels: &[Channel],
    bearer: &layerd::client::Bearer,
    workers: usize,
) -> Result<Vec<Link>, SetupError> {
    if !Kind::ELEMENTWISE.contains(&kind) {
        return Err(SetupError::Unfit(format!(
            "--protocol kserve drives the elementwise kinds (identity, relu, sigmoid), not {}",
            kind.name()
        )));
    }
    if !matches!(args.mode, Mode::Forward | Mode::Train) {
        return Err(SetupError::Unfit(
            "--protocol kserve drives --mode forward and train".into(),
        ));
    }
    let train = args.mode == Mode::Train;
    let sequence_length = match (args.sequence_length, train) {
        (Some(0), true) => {
            return Err(SetupError::Unfit(
                "--mode train needs sequences: --sequence-length ≥ 1".into(),
            ))
        }
        (Some(0), false) | (None, false) => None,
        (Some(n), _) => Some(n),
        (None, true) => Some(10),
    };
    let wire =
        Wire::from_proto(reference.x.dtype, "x").map_err(|e| SetupError::Unfit(e.to_string()))?;
    let forward_model = args
        .model
        .clone()
        .unwrap_or_else(|| kind.name().to_string());
    let backward_model = args
        .backward_model
        .clone()
        .unwrap_or_else(|| format!("{forward_model}_backward"));
    let dout = train.then(|| reference.dout.clone()).flatten();
    let mut links = Vec::with_capacity(workers);
    for w in 0..workers {
        let channel = channels[w % channels.len()].clone();
        let direct = InterceptedService::new(channel.clone(), bearer.clone());
        let mut client = GrpcInferenceServiceClient::with_interceptor(channel, bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let regions = match args.shared_memory {
            SharedMemory::None => None,
            SharedMemory::System => {
                let stem = format!("layerd-bench-{}-{}", std::process::id(), unique());
                let x = &reference.x.data[..];
                let d = dout.as_ref().map_or(&[][..], |d| &d.data[..]);
                let size = (x.len() + d.len()) as u64;
                let input =
                    Object::create(&mut client, format!("{stem}-in"), size, &[x, d]).await?;
                let output = Object::create(&mut client, format!("{stem}-out"), size, &[]).await?;
                let answers = Mapping::of(&output.file, size.max(1) as usize)
                    .map_err(|e| SetupError::Unfit(format!("{}: {e}", output.path.display())))?;
                Some(Regions {
                    input,
                    output,
                    answers,
                })
            }
        };
        links.push(Link {
            client,
            direct,
            forward_model: forward_model.clone(),
            backward_model: backward_model.clone(),
            session_header: args.session_header,
            sequence_length,
            train,
            sequence: Sequence::default(),
            regions,
            x: reference.x.clone(),
            dout: dout.clone(),
            datatype: wire.kserve_name(),
        });
    }
    Ok(links)
}

impl Link {
    /// One call; its answer as the native modes' reply.
    pub async fn call(&mut self, op: Op) -> Result<Reply, Status> {
        let (model, input_name, output_name, tensor, offset) = match op {
            Op::Forward => (&self.forward_model, "x", "y", &self.x, 0),
            Op::Backward => match &self.dout {
                Some(dout) => (
                    &self.backward_model,
                    "dout",
                    "dx",
                    dout,
                    self.x.data.len() as u64,
                ),
                None => return Err(Status::internal("no dout to send")),
            },
        };
        let mut input = InferInputTensor {
            name: input_name.into(),
            datatype: self.datatype.into(),
            shape: tensor.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        let mut output = InferRequestedOutputTensor {
            name: output_name.into(),
            ..Default::default()
        };
        let byte_size = tensor.data.len() as u64;
        let raw_input_contents = match &self.regions {
            Some(regions) => {
                input.parameters = region_params(&regions.input.name, offset, byte_size);
                output.parameters = region_params(&regions.output.name, offset, byte_size);
                vec![]
            }
            None => vec![tensor.data.clone()],
        };
        let mut request = ki::ModelInferRequest {
            model_name: model.clone(),
            inputs: vec![input],
            outputs: vec![output],
            raw_input_contents,
            ..Default::default()
        };
        let ends = self.sequence_params(op, &mut request.parameters);
        let mut metadata = MetadataMap::new();
        if let (true, Some(_)) = (self.session_header, self.sequence_length) {
            let id = MetadataValue::from(self.sequence.id);
            metadata.insert(layerd::rpc::SESSION_HEADER, id);
        }
        let answer: Result<ki::ModelInferResponse, Status> = wire::unary(
            &mut self.direct,
            MODEL_INFER_PATH,
            metadata,
            request,
            MAX_MESSAGE,
        )
        .await;
        match &answer {
            // A new sequence next time: this one is over, or broken.
            Err(_) => self.sequence.rounds = 0,
            Ok(_) if ends => self.sequence.rounds = 0,
            Ok(_) => {}
        }
        let response = answer?;
        let y = self.answer(response, offset)?;
        Ok(match op {
            Op::Forward => Reply::Forward(Some(y)),
            Op::Backward => Reply::Backward(Some(y), HashMap::new()),
        })
    }

    /// Sets the sequence parameters of one call; true if it ends the sequence.
    fn sequence_params(
        &mut self,
        op: Op,
        parameters: &mut HashMap<String, InferParameter>,
    ) -> bool {
        let Some(length) = self.sequence_length else {
            return false;
        };
        let mut set = |name: &str, choice| {
            parameters.insert(
                name.into(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            );
        };
        if let Op::Forward = op {
            if self.sequence.rounds == 0 {
                // Non-zero, below 2^63, and apart from other processes' ids.
                let pid = u64::from(std::process::id()) & 0x7fff_ffff;
                self.sequence.id = (pid << 32) | (unique() & 0xffff_ffff);
                set("sequence_start", ParameterChoice::BoolParam(true));
            }
            self.sequence.rounds += 1;
        }
        // int64, which Triton requires (the ids stay below 2^63).
        set(
            "sequence_id",
            ParameterChoice::Int64Param(self.sequence.id as i64),
        );
        let last = self.sequence.rounds >= length;
        let ends = last
            && matches!(
                (op, self.train),
                (Op::Backward, true) | (Op::Forward, false)
            );
        if ends {
            set("sequence_end", ParameterChoice::BoolParam(true));
        }
        ends
    }

    /// The response's one output as a `pb::Tensor`, from its raw contents or
    /// the output region at `offset`.
    fn answer(
        &self,
        mut response: ki::ModelInferResponse,
        offset: u64,
    ) -> Result<pb::Tensor, Status> {
        let output = response
            .outputs
            .pop()
            .ok_or_else(|| Status::internal("an answer without outputs"))?;
        let wire = Wire::from_kserve(&output.datatype, "outputs[0]")
            .map_err(|e| Status::internal(e.to_string()))?;
        let shape: Vec<u64> = output.shape.iter().map(|&d| d.max(0) as u64).collect();
        let data = match &self.regions {
            Some(regions) => {
                let len = shape.iter().product::<u64>() as usize * wire.itemsize();
                let start = offset as usize;
                if start + len > regions.answers.as_ref().len() {
                    return Err(Status::internal(format!(
                        "an output of {len} bytes at {start}, past its region"
                    )));
                }
                Bytes::from_owner(regions.answers.clone()).slice(start..start + len)
            }
            None => response.raw_output_contents.pop().unwrap_or_default(),
        };
        Ok(pb::Tensor {
            dtype: wire.to_proto() as i32,
            shape,
            data,
        })
    }

    /// Ends an open sequence (an unmeasured Forward with `sequence_end`) and
    /// unregisters the regions; failures here are not the run's.
    pub async fn finish(mut self) {
        if self.sequence_length.is_some() && self.sequence.rounds > 0 {
            self.sequence_length = Some(self.sequence.rounds);
            let train = std::mem::replace(&mut self.train, false);
            let _ = self.call(Op::Forward).await;
            self.train = train;
        }
        if let Some(regions) = self.regions.take() {
            for object in [&regions.input, &regions.output] {
                let request = ki::SystemSharedMemoryUnregisterRequest {
                    name: object.name.clone(),
                };
                let _ = self.client.system_shared_memory_unregister(request).await;
            }
        }
    }
}

/// The shared-memory parameters of a tensor at `offset` in region `name`.
fn region_params(name: &str, offset: u64, byte_size: u64) -> HashMap<String, InferParameter> {
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    HashMap::from([
        (
            "shared_memory_region".to_string(),
            param(ParameterChoice::StringParam(name.to_string())),
        ),
        (
            "shared_memory_offset".to_string(),
            param(ParameterChoice::Int64Param(offset as i64)),
        ),
        (
            "shared_memory_byte_size".to_string(),
            param(ParameterChoice::Int64Param(byte_size as i64)),
        ),
    ])
}
