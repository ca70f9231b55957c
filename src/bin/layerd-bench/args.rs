//! Command-line options of layerd-bench.

use std::{path::PathBuf, time::Duration};

use clap::{builder::TypedValueParser, Args, Parser, Subcommand, ValueEnum};

/// layerd-bench: drive real Forward/Backward traffic at a layerd server (or
/// anything speaking layerd.v1, or the KServe v2 / Triton protocol), verify
/// every answer, and report throughput and latency.
///
/// Exit codes: 0 all answers right; 2 the server cannot be reached;
/// 3 any answer differed from the local reference; 4 any call failed
/// (unless --allow-errors); 1 anything else.
#[derive(Debug, Parser)]
#[command(
    name = "layerd-bench",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Draw one chart from the JSON files of several sweeps (one line per server and kind).
    Chart(ChartArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward calls only.
    Forward,
    /// Forward then Backward on the same layer: the real use.
    Train,
    /// Forward and Backward steps over one Run stream per worker.
    Stream,
    /// TrainStep of a named network (--network) with the server's SGD,
    /// each step's loss checked against a float64 reference training.
    TrainStep,
}

/// The server's own list of kinds; the bench drives and verifies each but
/// `sequential` (`reference.rs` and `trainable.rs` have a reference for each).
pub use layerd::layers::Kind;

/// The kinds the bench drives.
pub fn driven_kinds() -> impl Iterator<Item = Kind> {
    Kind::ALL
        .into_iter()
        .filter(|&kind| kind != Kind::Sequential)
}

/// Parses a kind name; `--help` and errors list the kinds the bench drives.
fn kind_parser() -> impl clap::builder::TypedValueParser<Value = Kind> {
    clap::builder::PossibleValuesParser::new(driven_kinds().map(Kind::name))
        .map(|name| Kind::from_name(&name).expect("one of the possible values"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F64,
    /// float16 on the wire (relu and identity only: their answers are exact).
    F16,
    /// bfloat16 on the wire (relu and identity only).
    Bf16,
}

/// Which protocol the workers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// layerd.v1: sessions, layers, Forward / Backward / Run.
    Layerd,
    /// KServe v2 / Triton (inference.GRPCInferenceService): ModelInfer on
    /// --model, stateless or in sequences; layerd, Triton, or any server
    /// serving an elementwise model with input "x" and output "y".
    Kserve,
}

/// Where KServe tensors travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedMemory {
    /// In the messages (raw contents).
    None,
    /// In POSIX shared memory under /dev/shm that each worker registers
    /// (Triton's system shared-memory extension; same host only).
    System,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Protocol: layerd.v1, or KServe v2 / Triton (--mode forward and train,
    /// the elementwise kinds).
    #[arg(long, value_enum, default_value_t = Protocol::Layerd)]
    pub protocol: Protocol,

    /// With --protocol kserve: the model Forward calls go to (default: the
    /// kind's name, e.g. relu). Without sequences the calls are stateless.
    #[arg(long)]
    pub model: Option<String>,

    /// With --protocol kserve and --mode train: the model Backward calls go
    /// to (default: the forward model's name + "_backward").
    #[arg(long)]
    pub backward_model: Option<String>,

    /// With --protocol kserve: rounds (Forward, or Forward and Backward) per
    /// sequence; 0 sends no sequence ids (stateless calls). --mode train
    /// needs sequences: its default is 10.
    #[arg(long)]
    pub sequence_length: Option<u64>,

    /// With --protocol kserve: where the tensors travel.
    #[arg(long, value_enum, default_value_t = SharedMemory::None)]
    pub shared_memory: SharedMemory,

    /// Server address: host:port, or https://host:port for TLS (as do the --tls-* options).
    #[arg(long, env = "LAYERD_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,

    #[command(flatten)]
    pub tls: layerd::client::TlsArgs,

    /// What each worker does.
    #[arg(long, value_enum, default_value_t = Mode::Train)]
    pub mode: Mode,

    /// With --mode train-step: the network to train (the shapes of bench/train.py).
    #[arg(long, value_enum, default_value_t = crate::network::Network::Mlp)]
    pub network: crate::network::Network,

    /// With --mode train-step: steps per cycle. Each cycle restores the
    /// initial parameters (SetParams, not measured) and trains this many
    /// steps, so every answer can be checked against the reference.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64).map(|n| n as usize))]
    pub cycle_steps: usize,

    /// With --mode train-step: TrainSteps each worker keeps in flight,
    /// numbered by `expected_step` so the server applies them in order
    /// (1: one at a time, unnumbered).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16).map(|n| n as usize))]
    pub pipeline: usize,

    /// With --mode train-step: train the reference with this learning rate
    /// instead of the server's. Only useful to prove that the verifier
    /// catches wrong answers.
    #[arg(long, hide = true)]
    pub verify_lr: Option<f64>,

    /// Layer kind(s) to drive; several only with --sweep. The trainable kinds
    /// get fixed configurations, client-given parameters and, without --shape,
    /// the classic network's shapes (affine 100x784 -> 100, convolution
    /// 100x1x28x28 with 30 filters 5x5, pooling 100x30x24x24 2x2,
    /// batch_norm 100x100, softmax_with_loss 100x10 with labels).
    #[arg(long, value_parser = kind_parser(), value_delimiter = ',', default_value = "relu")]
    pub kind: Vec<Kind>,

    /// Check answers as if the layer were this kind (default: the kind itself).
    /// Only useful to prove that the verifier catches wrong answers.
    #[arg(long, value_parser = kind_parser())]
    pub verify_as: Option<Kind>,

    /// Element type.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,

    /// Tensor size in elements (a 1-D tensor; the elementwise kinds and
    /// dropout); see also --shape.
    #[arg(long, default_value_t = 1024, conflicts_with = "shape")]
    pub elements: u64,

    /// Tensor shape, e.g. 32x1024 (overrides --elements).
    #[arg(long, value_parser = parse_shape)]
    pub shape: Option<Shape>,

    /// TCP (HTTP/2) connections to open.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,

    /// Concurrent calls per connection; each is one worker with one call in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,

    /// Measured time (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Stop after this many measured calls instead of after --duration.
    #[arg(long)]
    pub requests: Option<u64>,

    /// Time run before measuring starts; its calls are not counted.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Open loop: calls per second in total, each latency measured from its
    /// scheduled send time (so queueing is not hidden). Default: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Sessions shared by all workers (each worker has its own layer in one);
    /// 0 gives every worker its own session.
    #[arg(long, default_value_t = 0)]
    pub shared_sessions: usize,

    /// Bearer token sent on every call (for a server started with --auth-tokens).
    #[arg(long, env = "LAYERD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Send the session id as `x-session-id` metadata, for load balancers.
    #[arg(long)]
    pub session_header: bool,

    /// Per-call deadline.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub call_timeout: Duration,

    /// Do not fail (exit 4) on gRPC errors; they are still counted and reported.
    #[arg(long)]
    pub allow_errors: bool,

    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Name of the server under test in reports and charts.
    #[arg(long, default_value = "layerd")]
    pub label: String,

    /// Sweep over these tensor sizes (elements), once per --kind, instead of one run.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_missing_value = "16,256,4096,65536,1048576,4194304")]
    pub sweep: Option<Vec<u64>>,

    /// With --sweep: write the chart to PREFIX.svg and PREFIX.png.
    #[arg(long)]
    pub chart: Option<PathBuf>,

    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ChartArgs {
    /// Sweep JSON files written by --sweep --json.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Write PREFIX.svg and PREFIX.png.
    #[arg(long)]
    pub out: PathBuf,
}

/// A tensor shape given as `32x1024` (or `scalar`).
#[derive(Debug, Clone)]
pub struct Shape(pub Vec<u64>);

fn parse_shape(text: &str) -> Result<Shape, String> {
    if text.is_empty() || text == "scalar" {
        return Ok(Shape(vec![]));
    }
    text.split(['x', ','])
        .map(|d| {
            d.trim()
                .parse::<u64>()
                .map_err(|e| format!("bad dimension {d:?}: {e}"))
        })
        .collect::<Result<_, _>>()
        .map(Shape)
}

impl RunArgs {
    pub fn shape(&self) -> Vec<u64> {
        self.shape
            .clone()
            .map_or_else(|| vec![self.elements], |shape| shape.0)
    }

    pub fn workers(&self) -> usize {
        self.connections * self.concurrency
    }
}
