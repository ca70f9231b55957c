//! Runs one workload: opens the connections and sessions, drives the workers
//! for the warm-up and the measured period, and gathers their figures.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use layerd::pb::{self, layer_service_client::LayerServiceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, transport::Channel, Request,
    Status, Streaming,
};

use crate::args::{Kind, Mode, Protocol, RunArgs};
use crate::kserve::Link;
pub use crate::measured::Measured;
use crate::reference::Reference;

pub(crate) type Client = LayerServiceClient<InterceptedService<Channel, layerd::client::Bearer>>;

/// Largest message the bench sends or accepts.
pub(crate) const MAX_MESSAGE: usize = 1 << 30;

/// What went wrong before any traffic could be measured.
#[derive(Debug)]
pub enum SetupError {
    /// The server could not be reached.
    Unreachable(String),
    /// A session or layer could not be created.
    Rejected(Status),
    /// The kind cannot be driven at this shape.
    Unfit(String),
}

/// Connects to the server: a clear error, not a hang, when it is down.
pub async fn connect(args: &RunArgs) -> Result<Vec<Client>, SetupError> {
    let (channels, bearer) = channels(args).await?;
    Ok(channels
        .iter()
        .map(|channel| native_client(channel, &bearer))
        .collect())
}

/// A layerd.v1 client on `channel`, sending `bearer`'s token.
fn native_client(channel: &Channel, bearer: &layerd::client::Bearer) -> Client {
    LayerServiceClient::with_interceptor(channel.clone(), bearer.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// The run's connections (`--connections`), and the bearer for their calls.
async fn channels(args: &RunArgs) -> Result<(Vec<Channel>, layerd::client::Bearer), SetupError> {
    let bearer =
        layerd::client::Bearer::new(args.token.as_deref()).map_err(SetupError::Unreachable)?;
    let endpoint = layerd::client::endpoint(&args.addr, Duration::from_secs(5), &args.tls)
        .map_err(SetupError::Unreachable)?
        .timeout(args.call_timeout)
        // Large tensors need larger HTTP/2 windows than the 64 KiB default;
        // frames up to HTTP/2's largest let a server send a 4 MiB answer in
        // one, which the KServe mode then checks where it landed, uncopied.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(Some((16 << 20) - 1));
    let connections = args.connections.max(1);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = layerd::client::connect(&endpoint)
            .await
            .map_err(SetupError::Unreachable)?;
        channels.push(channel);
    }
    Ok((channels, bearer))
}

/// Where each worker sends its native calls.
#[derive(Clone, Default)]
struct Target {
    session_id: String,
    layer_id: String,
}

/// State shared by the workers of one run.
struct Shared {
    args: RunArgs,
    reference: Reference,
    measure_from: Instant,
    measure_until: Option<Instant>,
    /// Measured calls still to make, with --requests.
    remaining: Option<AtomicI64>,
    progress_calls: AtomicU64,
    progress_errors: AtomicU64,
    progress_mismatches: AtomicU64,
}

impl Shared {
    fn measuring(&self, at: Instant) -> bool {
        at >= self.measure_from
    }

    /// Whether a worker may start another round (one call, or Forward and
    /// Backward in train and stream modes); takes its calls from --requests.
    fn go_on(&self) -> bool {
        let now = Instant::now();
        if let Some(until) = self.measure_until {
            return now < until;
        }
        match &self.remaining {
            Some(remaining) if self.measuring(now) => {
                let calls = if self.args.mode == Mode::Forward {
                    1
                } else {
                    2
                };
                remaining.fetch_sub(calls, Ordering::Relaxed) > 0
            }
            _ => true,
        }
    }

    fn request<T>(&self, target: &Target, message: T) -> Request<T> {
        routed(&self.args, &target.session_id, message)
    }
}

/// Runs one workload with `kind` and `shape` and returns its figures.
pub async fn run(args: &RunArgs, kind: Kind, shape: &[u64]) -> Result<Measured, SetupError> {
    let layer = Reference::new(kind, args.dtype, shape).map_err(SetupError::Unfit)?;
    // With --verify-as, the layer is `kind`'s and the answers are checked
    // as the other kind's (fed that kind's inputs).
    let verify_as = match args.verify_as {
        Some(other) if other != kind => {
            Some(Reference::new(other, args.dtype, shape).map_err(SetupError::Unfit)?)
        }
        _ => None,
    };
    let (channels, bearer) = channels(args).await?;
    let clients: Vec<Client> = channels
        .iter()
        .map(|channel| native_client(channel, &bearer))
        .collect();
    let workers = args.workers().max(1);
    let (session_ids, targets, links) = match args.protocol {
        Protocol::Layerd => {
            let (session_ids, targets) =
                open_sessions(args, clients[0].clone(), kind, &layer, workers).await?;
            (
                session_ids,
                targets,
                std::iter::repeat_with(|| None).take(workers).collect(),
            )
        }
        Protocol::Kserve => {
            let links =
                crate::kserve::links(args, kind, &layer, &channels, &bearer, workers).await?;
            (
                Vec::new(),
                vec![Target::default(); workers],
                links.into_iter().map(Some).collect::<Vec<_>>(),
            )
        }
    };

    let started = Instant::now();
    let measure_from = started + args.warmup;
    let shared = Arc::new(Shared {
        args: args.clone(),
        reference: verify_as.unwrap_or(layer),
        measure_from,
        measure_until: args
            .requests
            .is_none()
            .then(|| measure_from + args.duration),
        remaining: args.requests.map(|n| AtomicI64::new(n as i64)),
        progress_calls: AtomicU64::new(0),
        progress_errors: AtomicU64::new(0),
        progress_mismatches: AtomicU64::new(0),
    });
    let progress = (!args.quiet).then(|| spawn_progress(shared.clone(), started));

    let per_worker_rate = args.rate.map(|r| r / workers as f64);
    let mut tasks = Vec::with_capacity(workers);
    for (index, (target, link)) in targets.into_iter().zip(links).enumerate() {
        let client = clients[index % clients.len()].clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = Worker {
                shared,
                client,
                target,
                measured: Measured::new(),
                schedule: per_worker_rate.map(|rate| Schedule::new(rate, started, index, workers)),
                stream: None,
                link,
                last_y: bytes::Bytes::new(),
            };
            worker.run().await;
            (worker.measured, worker.link)
        }));
    }
    let mut total = Measured::new();
    let mut links = Vec::new();
    for task in tasks {
        let (measured, link) = task.await.expect("worker did not panic");
        total.merge(measured);
        links.extend(link);
    }
    let ended = Instant::now();
    total.seconds = match shared.measure_until {
        Some(until) => until
            .min(ended)
            .saturating_duration_since(measure_from)
            .as_secs_f64(),
        None => ended.saturating_duration_since(measure_from).as_secs_f64(),
    };
    if let Some((bar, task)) = progress {
        task.abort();
        bar.finish_and_clear();
    }
    close_sessions(args, clients[0].clone(), session_ids).await;
    for link in links {
        link.finish().await;
    }
    Ok(total)
}

/// One session per worker, or `--shared-sessions` sessions with one layer per worker.
async fn open_sessions(
    args: &RunArgs,
    mut client: Client,
    kind: Kind,
    layer: &Reference,
    workers: usize,
) -> Result<(Vec<String>, Vec<Target>), SetupError> {
    let sessions = if args.shared_sessions == 0 {
        workers
    } else {
        args.shared_sessions
    };
    let nonce = std::process::id();
    let mut session_ids = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let session_id = format!("bench-{nonce}-{}-{s}", unique());
        let request = routed(
            args,
            &session_id,
            pb::CreateSessionRequest {
                session_id: session_id.clone(),
                idle_timeout_seconds: 0,
            },
        );
        client
            .create_session(request)
            .await
            .map_err(SetupError::Rejected)?;
        session_ids.push(session_id);
    }
    let mut targets = Vec::with_capacity(workers);
    for w in 0..workers {
        let target = Target {
            session_id: session_ids[w % sessions].clone(),
            layer_id: format!("w{w}"),
        };
        let request = routed(
            args,
            &target.session_id,
            pb::CreateLayerRequest {
                session_id: target.session_id.clone(),
                layer_id: target.layer_id.clone(),
                kind: kind.name().into(),
                config: layer.config.clone(),
                params: layer.params.clone(),
                dtype: layer.x.dtype,
            },
        );
        client
            .create_layer(request)
            .await
            .map_err(SetupError::Rejected)?;
        targets.push(target);
    }
    Ok((session_ids, targets))
}

/// A request carrying `x-session-id` when --session-header is set.
pub(crate) fn routed<T>(args: &RunArgs, session_id: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if args.session_header {
        let value = MetadataValue::try_from(session_id).expect("session ids are ASCII");
        request
            .metadata_mut()
            .insert(layerd::rpc::SESSION_HEADER, value);
    }
    request
}

/// A value that differs between runs of one process (sweeps open many sessions).
pub(crate) fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Closes the run's sessions so a sweep does not pile them up; a failure here
/// is not the run's (they would expire anyway).
pub(crate) async fn close_sessions(args: &RunArgs, mut client: Client, session_ids: Vec<String>) {
    for session_id in session_ids {
        let request = routed(
            args,
            &session_id,
            pb::CloseSessionRequest {
                session_id: session_id.clone(),
            },
        );
        let _ = client.close_session(request).await;
    }
}

fn spawn_progress(
    shared: Arc<Shared>,
    started: Instant,
) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    let task = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = Instant::now();
                let calls = shared.progress_calls.load(Ordering::Relaxed);
                let rate = (calls - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, calls);
                let phase = if shared.measuring(now) {
                    "measuring"
                } else {
                    "warming up"
                };
                bar.set_message(format!(
                    "{phase} {:>6.1}s | {:>9.0} calls/s | errors {} | mismatches {}",
                    now.duration_since(started).as_secs_f64(),
                    rate,
                    shared.progress_errors.load(Ordering::Relaxed),
                    shared.progress_mismatches.load(Ordering::Relaxed),
                ));
                bar.tick();
            }
        })
    };
    (bar, task)
}

/// Open-loop send times for one worker: evenly spaced, workers interleaved.
struct Schedule {
    interval: Duration,
    next: Instant,
}

impl Schedule {
    fn new(rate: f64, start: Instant, index: usize, workers: usize) -> Schedule {
        let interval = Duration::from_secs_f64(1.0 / rate);
        Schedule {
            interval,
            next: start + interval.mul_f64(index as f64 / workers as f64),
        }
    }

    /// Waits for the next slot and returns it: the time latency counts from.
    async fn wait(&mut self) -> Instant {
        let slot = self.next;
        self.next += self.interval;
        tokio::time::sleep_until(slot.into()).await;
        slot
    }
}

type Steps = (mpsc::Sender<pb::RunRequest>, Streaming<pb::RunResponse>);

struct Worker {
    shared: Arc<Shared>,
    client: Client,
    target: Target,
    measured: Measured,
    schedule: Option<Schedule>,
    stream: Option<Steps>,
    /// With --protocol kserve: where the calls go instead.
    link: Option<Link>,
    /// The last checked Forward answer, which Backward is checked against.
    last_y: bytes::Bytes,
}

/// What a call answered.
pub(crate) enum Reply {
    Forward(Option<pb::Tensor>),
    Backward(Option<pb::Tensor>, HashMap<String, pb::Tensor>),
}

impl Reply {
    /// Bytes received: the tensors' data.
    fn bytes(&self) -> usize {
        match self {
            Reply::Forward(y) => y.as_ref().map_or(0, |t| t.data.len()),
            Reply::Backward(dx, grads) => {
                dx.as_ref().map_or(0, |t| t.data.len())
                    + grads.values().map(|t| t.data.len()).sum::<usize>()
            }
        }
    }
}

/// Which pass a call runs.
#[derive(Clone, Copy)]
pub(crate) enum Op {
    Forward,
    Backward,
}

impl Worker {
    async fn run(&mut self) {
        while self.shared.go_on() {
            let forward_ok = self.call(Op::Forward).await;
            if self.shared.args.mode != Mode::Forward && forward_ok {
                self.call(Op::Backward).await;
            }
        }
        if let Some((steps, _)) = self.stream.take() {
            drop(steps);
        }
    }

    /// One call, timed and checked; true if it answered right.
    async fn call(&mut self, op: Op) -> bool {
        let scheduled = match &mut self.schedule {
            Some(schedule) => schedule.wait().await,
            None => Instant::now(),
        };
        let shared = self.shared.clone();
        let reference = &shared.reference;
        let sent = match op {
            Op::Forward => reference.x.data.len(),
            Op::Backward => reference.dout.as_ref().map_or(0, |d| d.data.len()),
        };
        let answer = match (&mut self.link, shared.args.mode) {
            (Some(link), _) => link.call(op).await,
            (None, Mode::Stream) => self.step(op).await,
            (None, _) => match op {
                Op::Forward => {
                    let message = forward_request(&self.target, reference);
                    let answer = self
                        .client
                        .forward(shared.request(&self.target, message))
                        .await;
                    answer.map(|r| Reply::Forward(r.into_inner().y))
                }
                Op::Backward => {
                    let message = backward_request(&self.target, reference);
                    let answer = self
                        .client
                        .backward(shared.request(&self.target, message))
                        .await;
                    answer.map(|r| {
                        let r = r.into_inner();
                        Reply::Backward(r.dx, r.grads)
                    })
                }
            },
        };
        let done = Instant::now();
        let measuring = shared.measuring(scheduled)
            && shared.measure_until.is_none_or(|until| scheduled < until);
        let right = match &answer {
            Ok(Reply::Forward(y)) => {
                let right = reference.check_y(y.as_ref());
                if let (true, Some(y)) = (right, y) {
                    self.last_y = y.data.clone();
                }
                right
            }
            Ok(Reply::Backward(dx, grads)) => {
                reference.check_backward(dx.as_ref(), grads, &self.last_y)
            }
            Err(_) => false,
        };
        shared.progress_calls.fetch_add(1, Ordering::Relaxed);
        match &answer {
            Err(status) => {
                shared.progress_errors.fetch_add(1, Ordering::Relaxed);
                if measuring {
                    self.measured.error(scheduled, status, done);
                }
            }
            Ok(reply) => {
                if !right {
                    shared.progress_mismatches.fetch_add(1, Ordering::Relaxed);
                }
                if measuring {
                    self.measured
                        .call(scheduled, done, sent, reply.bytes(), right);
                }
            }
        }
        right
    }

    /// One step over this worker's Run stream (opened on first use, and again after an error).
    async fn step(&mut self, op: Op) -> Result<Reply, Status> {
        if self.stream.is_none() {
            let (steps, receiver) = mpsc::channel(1);
            let request = self
                .shared
                .request(&self.target, ReceiverStream::new(receiver));
            let answers = self.client.run(request).await?.into_inner();
            self.stream = Some((steps, answers));
        }
        let reference = &self.shared.reference;
        let step = match op {
            Op::Forward => pb::run_request::Step::Forward(forward_request(&self.target, reference)),
            Op::Backward => {
                pb::run_request::Step::Backward(backward_request(&self.target, reference))
            }
        };
        let (steps, answers) = self.stream.as_mut().expect("opened above");
        let answer = async {
            steps
                .send(pb::RunRequest { step: Some(step) })
                .await
                .map_err(|_| Status::unavailable("the Run stream closed"))?;
            answers
                .message()
                .await?
                .ok_or_else(|| Status::unavailable("the Run stream ended"))
        }
        .await;
        match answer {
            Ok(pb::RunResponse {
                result: Some(pb::run_response::Result::Forward(f)),
            }) => Ok(Reply::Forward(f.y)),
            Ok(pb::RunResponse {
                result: Some(pb::run_response::Result::Backward(b)),
            }) => Ok(Reply::Backward(b.dx, b.grads)),
            Ok(_) => Err(Status::internal("a Run answer with no result")),
            Err(status) => {
                self.stream = None;
                Err(status)
            }
        }
    }
}

/// The Forward every call of a workload sends.
fn forward_request(target: &Target, reference: &Reference) -> pb::ForwardRequest {
    pb::ForwardRequest {
        session_id: target.session_id.clone(),
        layer_id: target.layer_id.clone(),
        x: Some(reference.x.clone()),
        t: reference.t.clone(),
        ..Default::default()
    }
}

/// The Backward every call of a workload sends (no dout after a loss).
fn backward_request(target: &Target, reference: &Reference) -> pb::BackwardRequest {
    pb::BackwardRequest {
        session_id: target.session_id.clone(),
        layer_id: target.layer_id.clone(),
        dout: reference.dout.clone(),
        return_grads: reference.return_grads(),
    }
}
