//! `--mode train-step`: a named network (`two-layer`, `mlp`, `convnet`)
//! trained by TrainStep with the server's SGD, every answer checked.
//!
//! Each worker has a session with the network (a sequential ending in
//! softmax_with_loss, parameters the bench gives) and an SGD optimizer
//! (lr 0.1, no state). It trains in cycles: SetParams back to the initial
//! values (not measured), then `--cycle-steps` TrainSteps on one fixed batch
//! (measured). Every cycle is therefore the same computation, so every
//! answer can be checked, with the discipline of the other modes: the loss of
//! step i must be within 1e-4 (float32) / 1e-10 (float64) relative of the
//! float64 reference training (the layers of `trainable.rs` — plain loops,
//! no code shared with the server — and SGD in float64), and the first
//! accepted loss of each step is pinned: every later cycle must answer the
//! same bits. The step count must grow by one per step.
//!
//! With `--pipeline N` a worker keeps N TrainSteps in flight, numbered by
//! `expected_step` (the server applies them in that order) and answered in
//! order, so the checks are the same.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, OnceLock,
    },
    time::Instant,
};

use bytes::Bytes;
use layerd::pb;
use ndarray::{ArrayD, IxDyn};

use crate::args::{Dtype, RunArgs};
use crate::reference::{tensor, Element};
use crate::trainable::{self, Expected};
use crate::workload::{self, Measured, SetupError};

/// The networks `--network` names (the shapes of bench/train.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// affine 64→50, relu, affine 50→10 (the digits' shape), batch 100.
    TwoLayer,
    /// affine 784→100, relu, affine 100→10, batch 100.
    Mlp,
    /// convolution 30×5×5 on 1×28×28, relu, max pool 2, affine 4320→100,
    /// relu, affine 100→10, batch 100.
    Convnet,
}

const LR: f64 = 0.1;
const BATCH: usize = 100;
const CLASSES: usize = 10;

/// One layer of a network, for the reference.
#[derive(Debug, Clone, Copy)]
enum Part {
    Affine(&'static str),
    Convolution(&'static str),
    Relu,
    Pool,
}

impl Network {
    pub fn name(self) -> &'static str {
        match self {
            Network::TwoLayer => "two-layer",
            Network::Mlp => "mlp",
            Network::Convnet => "convnet",
        }
    }

    /// The input's shape.
    pub fn x_shape(self) -> Vec<u64> {
        match self {
            Network::TwoLayer => vec![BATCH as u64, 64],
            Network::Mlp => vec![BATCH as u64, 784],
            Network::Convnet => vec![BATCH as u64, 1, 28, 28],
        }
    }

    fn parts(self) -> Vec<Part> {
        let head = [Part::Affine("fc1"), Part::Relu, Part::Affine("fc2")];
        match self {
            Network::Convnet => [Part::Convolution("conv"), Part::Relu, Part::Pool]
                .into_iter()
                .chain(head)
                .collect(),
            _ => head.to_vec(),
        }
    }

    /// The parameters' shapes by name.
    fn param_shapes(self) -> Vec<(String, Vec<usize>)> {
        let (inputs, hidden) = match self {
            Network::TwoLayer => (64, 50),
            Network::Mlp => (784, 100),
            Network::Convnet => (30 * 12 * 12, 100),
        };
        let mut shapes = Vec::new();
        if self == Network::Convnet {
            shapes.push(("conv.W".to_string(), vec![30, 1, 5, 5]));
            shapes.push(("conv.b".to_string(), vec![30]));
        }
        shapes.push(("fc1.W".to_string(), vec![inputs, hidden]));
        shapes.push(("fc1.b".to_string(), vec![hidden]));
        shapes.push(("fc2.W".to_string(), vec![hidden, CLASSES]));
        shapes.push(("fc2.b".to_string(), vec![CLASSES]));
        shapes
    }

    fn config(self) -> pb::LayerConfig {
        use pb::layer_config::Config;
        let member = |name: &str, kind: &str, config: Option<Config>| pb::LayerSpec {
            name: name.into(),
            kind: kind.into(),
            config: config.map(|config| pb::LayerConfig {
                config: Some(config),
            }),
            params: HashMap::new(),
        };
        let affine = |name: &str, shape: &[usize]| {
            member(
                name,
                "affine",
                Some(Config::Affine(pb::AffineConfig {
                    in_features: shape[0] as u64,
                    out_features: shape[1] as u64,
                    init: None,
                })),
            )
        };
        let shapes: HashMap<String, Vec<usize>> = self.param_shapes().into_iter().collect();
        let mut layers = Vec::new();
        if self == Network::Convnet {
            layers.push(member(
                "conv",
                "convolution",
                Some(Config::Convolution(pb::ConvolutionConfig {
                    in_channels: 1,
                    out_channels: 30,
                    kernel_h: 5,
                    kernel_w: 5,
                    ..Default::default()
                })),
            ));
            layers.push(member("relu0", "relu", None));
            layers.push(member(
                "pool",
                "pooling",
                Some(Config::Pooling(pb::PoolingConfig {
                    pool_h: 2,
                    pool_w: 2,
                    ..Default::default()
                })),
            ));
        }
        layers.push(affine("fc1", &shapes["fc1.W"]));
        layers.push(member("relu1", "relu", None));
        layers.push(affine("fc2", &shapes["fc2.W"]));
        layers.push(member("loss", "softmax_with_loss", None));
        pb::LayerConfig {
            config: Some(Config::Sequential(pb::SequentialConfig { layers })),
        }
    }
}

/// A network's workload: what to create and send, and what must come back.
pub struct Workload {
    pub create: pb::CreateLayerRequest,
    pub x: pb::Tensor,
    pub t: pb::Tensor,
    /// The initial parameters, restored (SetParams) at each cycle's start.
    pub initial: HashMap<String, pb::Tensor>,
    /// The reference loss of each step of a cycle.
    losses: Vec<f64>,
    tolerance: f64,
    /// The first accepted loss of each step, as bits.
    pinned: Vec<OnceLock<u64>>,
}

impl Workload {
    /// `reference_lr`: the learning rate the reference trains with (the
    /// server's, unless a test wants wrong answers).
    pub fn new(
        network: Network,
        dtype: Dtype,
        steps: usize,
        reference_lr: f64,
    ) -> Result<Workload, SetupError> {
        match dtype {
            Dtype::F32 => Ok(build::<f32>(network, steps, reference_lr)),
            Dtype::F64 => Ok(build::<f64>(network, steps, reference_lr)),
            Dtype::F16 | Dtype::Bf16 => Err(SetupError::Unfit(
                "--mode train-step trains float32 or float64 networks (--dtype f32 or f64)".into(),
            )),
        }
    }

    /// Whether `loss`, answered for step `step` of a cycle, is right.
    pub fn check(&self, step: usize, loss: f64) -> bool {
        let want = self.losses[step];
        if let Some(&pinned) = self.pinned[step].get() {
            return loss.to_bits() == pinned;
        }
        if (loss - want).abs() > self.tolerance * want.abs().max(f64::MIN_POSITIVE) {
            return false;
        }
        *self.pinned[step].get_or_init(|| loss.to_bits()) == loss.to_bits()
    }

    pub fn steps(&self) -> usize {
        self.losses.len()
    }
}

fn build<F: Element>(network: Network, steps: usize, reference_lr: f64) -> Workload {
    let x_shape = network.x_shape();
    let len: u64 = x_shape.iter().product();
    let (xf, x64) = trainable::rounded::<F>(trainable::values(len as usize, 11, 1.0));
    let labels: Vec<i64> = (0..BATCH).map(|i| ((i * 7 + 3) % CLASSES) as i64).collect();
    let mut params64 = HashMap::new();
    let mut initial = HashMap::new();
    for (salt, (name, shape)) in network.param_shapes().into_iter().enumerate() {
        let fan_in: usize = if shape.len() == 4 {
            shape[1..].iter().product()
        } else {
            shape[0]
        };
        let scale = (6.0 / fan_in as f64).sqrt();
        let count: usize = shape.iter().product();
        let values = if name.ends_with(".b") {
            trainable::values(count, 100 + salt as u64, 0.1)
        } else {
            trainable::values(count, 100 + salt as u64, scale)
        };
        let (as_f, back) = trainable::rounded::<F>(values);
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        initial.insert(name.clone(), tensor(&dims, &as_f));
        params64.insert(
            name,
            ArrayD::from_shape_vec(IxDyn(&shape), back).expect("len"),
        );
    }
    let x = ArrayD::from_shape_vec(
        IxDyn(&x_shape.iter().map(|&d| d as usize).collect::<Vec<_>>()),
        x64,
    )
    .expect("len");
    let losses = reference_training(network, &x, &labels, params64, steps, reference_lr);
    Workload {
        create: pb::CreateLayerRequest {
            kind: "sequential".into(),
            config: Some(network.config()),
            params: initial.clone(),
            dtype: F::DTYPE.into(),
            ..Default::default()
        },
        x: tensor(&x_shape, &xf),
        t: pb::Tensor {
            dtype: pb::DType::DtypeInt64.into(),
            shape: vec![BATCH as u64],
            data: Bytes::copy_from_slice(bytemuck::cast_slice(&labels)),
        },
        initial,
        losses,
        tolerance: if F::DTYPE == pb::DType::DtypeFloat32 {
            1e-4
        } else {
            1e-10
        },
        pinned: (0..steps).map(|_| OnceLock::new()).collect(),
    }
}

/// `steps` SGD steps of the network in float64 on one batch: the loss of each
/// (computed before its update).
fn reference_training(
    network: Network,
    x: &ArrayD<f64>,
    labels: &[i64],
    mut params: HashMap<String, ArrayD<f64>>,
    steps: usize,
    lr: f64,
) -> Vec<f64> {
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut h = x.clone();
        let mut trail: Vec<(Part, Expected)> = Vec::new();
        for part in network.parts() {
            let expected = match part {
                Part::Affine(name) => trainable::affine(
                    &h,
                    params[&format!("{name}.W")].clone(),
                    params[&format!("{name}.b")].clone(),
                ),
                Part::Convolution(name) => trainable::convolution(
                    &h,
                    params[&format!("{name}.W")].clone(),
                    params[&format!("{name}.b")].clone(),
                ),
                Part::Pool => trainable::pooling(&h),
                Part::Relu => relu(&h),
            };
            h = expected.y.clone();
            trail.push((part, expected));
        }
        let loss = trainable::softmax_with_loss(&h, labels);
        losses.push(*loss.y.first().expect("a scalar"));
        let (mut d, _) = (loss.backward)(&ArrayD::from_elem(IxDyn(&[]), 1.0));
        for (part, expected) in trail.into_iter().rev() {
            let (dx, grads) = (expected.backward)(&d);
            if let Part::Affine(name) | Part::Convolution(name) = part {
                for (param, grad) in grads {
                    let p = params.get_mut(&format!("{name}.{param}")).expect("known");
                    p.zip_mut_with(&grad, |p, g| *p -= lr * g);
                }
            }
            d = dx;
        }
    }
    losses
}

fn relu(x: &ArrayD<f64>) -> Expected {
    let y = x.mapv(|v| if v > 0.0 { v } else { 0.0 });
    let mask = x.mapv(|v| v > 0.0);
    Expected {
        y,
        backward: Box::new(move |dout| {
            let mut dx = dout.clone();
            dx.zip_mut_with(&mask, |d, &keep| {
                if !keep {
                    *d = 0.0
                }
            });
            (dx, Vec::new())
        }),
    }
}

/// Runs the train-step workload and returns its figures (calls = TrainSteps).
pub async fn run(args: &RunArgs, network: Network) -> Result<Measured, SetupError> {
    let reference_lr = args.verify_lr.unwrap_or(LR);
    let workload = Arc::new(Workload::new(
        network,
        args.dtype,
        args.cycle_steps,
        reference_lr,
    )?);
    // With --requests: measured steps still to make, shared by the workers.
    let remaining = Arc::new(AtomicI64::new(args.requests.map_or(i64::MAX, |n| n as i64)));
    let clients = workload::connect(args).await?;
    let workers = args.workers().max(1);
    let mut sessions = Vec::with_capacity(workers);
    let mut setup = clients[0].clone();
    for w in 0..workers {
        let session_id = format!("bench-{}-{}-{w}", std::process::id(), workload::unique());
        let routed = |message| workload::routed(args, &session_id, message);
        setup
            .create_session(routed(pb::CreateSessionRequest {
                session_id: session_id.clone(),
                idle_timeout_seconds: 0,
            }))
            .await
            .map_err(SetupError::Rejected)?;
        let mut create = workload.create.clone();
        create.session_id = session_id.clone();
        create.layer_id = "net".into();
        setup
            .create_layer(workload::routed(args, &session_id, create))
            .await
            .map_err(SetupError::Rejected)?;
        setup
            .create_optimizer(workload::routed(
                args,
                &session_id,
                pb::CreateOptimizerRequest {
                    session_id: session_id.clone(),
                    optimizer_id: "sgd".into(),
                    layer_ids: vec!["net".into()],
                    algorithm: Some(pb::create_optimizer_request::Algorithm::Sgd(pb::Sgd {
                        lr: Some(LR),
                    })),
                },
            ))
            .await
            .map_err(SetupError::Rejected)?;
        sessions.push(session_id);
    }
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let measure_until = match args.requests {
        Some(_) => measure_from + std::time::Duration::from_secs(365 * 24 * 3600),
        None => measure_from + args.duration,
    };
    let mut tasks = Vec::with_capacity(workers);
    for (index, session_id) in sessions.iter().cloned().enumerate() {
        let mut client = clients[index % clients.len()].clone();
        let (args, workload, remaining) = (args.clone(), workload.clone(), remaining.clone());
        tasks.push(tokio::spawn(async move {
            let mut measured = Measured::new();
            let mut last_steps = 0;
            'cycles: while Instant::now() < measure_until && remaining.load(Ordering::Relaxed) > 0 {
                let reset = pb::SetParamsRequest {
                    session_id: session_id.clone(),
                    layer_id: "net".into(),
                    values: workload.initial.clone(),
                };
                if let Err(status) = client
                    .set_params(workload::routed(&args, &session_id, reset))
                    .await
                {
                    measured.error(Instant::now(), &status, Instant::now());
                    continue;
                }
                // Up to --pipeline steps in flight, answered in order.
                let (base, mut in_flight) = (last_steps, VecDeque::new());
                let (mut next, mut stop, mut failed) = (0, false, false);
                loop {
                    while !stop
                        && !failed
                        && next < workload.steps()
                        && in_flight.len() < args.pipeline
                    {
                        let sent = Instant::now();
                        if sent >= measure_from && remaining.fetch_sub(1, Ordering::Relaxed) <= 0 {
                            stop = true;
                            break;
                        }
                        let request = pb::TrainStepRequest {
                            session_id: session_id.clone(),
                            layer_id: "net".into(),
                            optimizer_id: "sgd".into(),
                            x: Some(workload.x.clone()),
                            t: Some(workload.t.clone()),
                            return_dx: false,
                            return_scores: false,
                            expected_step: (args.pipeline > 1).then_some(base + next as u64),
                        };
                        let (mut client, request) = (
                            client.clone(),
                            workload::routed(&args, &session_id, request),
                        );
                        let call = tokio::spawn(async move { client.train_step(request).await });
                        in_flight.push_back((next, sent, call));
                        next += 1;
                    }
                    let Some((step, sent, call)) = in_flight.pop_front() else {
                        break;
                    };
                    let answer = call.await.expect("a call does not panic");
                    let done = Instant::now();
                    let measuring = sent >= measure_from && sent < measure_until;
                    match answer {
                        Err(status) => {
                            if measuring {
                                measured.error(sent, &status, done);
                            }
                            failed = true;
                        }
                        Ok(answer) => {
                            let answer = answer.into_inner();
                            let right = workload.check(step, answer.loss)
                                && (last_steps == 0 || answer.steps == last_steps + 1);
                            last_steps = answer.steps;
                            if measuring {
                                measured.call(
                                    sent,
                                    done,
                                    workload.x.data.len() + workload.t.data.len(),
                                    8,
                                    right,
                                );
                            }
                        }
                    }
                }
                if stop {
                    break 'cycles;
                }
            }
            measured
        }));
    }
    let mut total = Measured::new();
    for task in tasks {
        total.merge(task.await.expect("worker did not panic"));
    }
    total.seconds = Instant::now()
        .min(measure_until)
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    workload::close_sessions(args, clients[0].clone(), sessions).await;
    Ok(total)
}
