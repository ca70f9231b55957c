//! The one executor both protocols call (the native handlers in
//! [`crate::api`] and the KServe ones in [`crate::kserve`]): Forward and
//! Backward on a layer instance, a stateless Forward, a layer's values, and
//! where computations run. No transport here: the RPC plumbing (spans,
//! deadlines, metrics, headers, streams) is [`crate::rpc`]'s.
//!
//! Invariant: a call validates everything before it touches a session,
//! computes without holding any lock but its own layer instance's, and commits
//! kept state only after the computation succeeded — so a failed, timed-out
//! or cancelled call leaves the session as it was.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::dtype::Wire;
use crate::error::Error;
use crate::layers::{rng::Rng, Chain, Elementwise, Kind, MemberState};
use crate::session::{KeptEntry, LayerInstance, Session};
use crate::tensor::{Target, Tensor};

/// Tensors up to this many elements are computed on the async executor;
/// larger ones on the blocking pool, so small calls are not starved behind
/// them. At this size a ReLU or Sigmoid takes some tens of microseconds.
const INLINE_COMPUTE_MAX_ELEMENTS: usize = 16 * 1024;

/// Where a Forward or Backward spent its time, for the KServe statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    /// Waiting for earlier calls of its session: for the layer instance one
    /// holds, or (KServe) for their turn in arrival order.
    pub queue: Duration,
    /// The layer's computation.
    pub compute: Duration,
}

/// A Forward's options besides `x`.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// The target of a loss.
    pub t: Option<Target>,
    pub eval: bool,
    pub no_grad: bool,
}

/// Forward on one layer instance. Checks everything first (dtype, shapes,
/// target, sizes); unless `no_grad`, reserves the bytes to keep before
/// computing; commits kept state, buffers and generators only once the
/// computation succeeded.
pub async fn forward_on(
    session: &Session,
    layer: &LayerInstance,
    x: Tensor,
    options: ForwardOptions,
    phases: &mut Phases,
) -> Result<Tensor, Error> {
    let ForwardOptions { t, eval, no_grad } = options;
    let chain = layer.chain.clone();
    let plan = chain.plan(&x, t.as_ref(), eval)?;
    session.check_work(plan.work_bytes)?;
    let keep = !no_grad;
    let queued = Instant::now();
    let mut state = layer.state.lock().await;
    let computing = Instant::now();
    phases.queue = computing - queued;
    // Reserved before computing; both old and new state exist until the commit.
    let charge = keep.then(|| session.reserve(plan.kept_bytes)).transpose()?;
    let members = state.members.clone();
    let cost = cost(&chain, x.len(), plan.work_bytes);
    let out = compute(cost, move || {
        chain.forward(&members, &x, t.as_ref(), &plan, eval, keep)
    })
    .await?;
    commit_forward(&mut state.members, out.updates);
    if let (Some(kept), Some(charge)) = (out.kept, charge) {
        state.kept = Some(Arc::new(KeptEntry::new(kept, charge)));
        state.kept_lost = false;
    }
    phases.compute = computing.elapsed();
    Ok(out.y)
}

/// A Forward that belongs to no session and keeps nothing (KServe's models
/// called without a sequence): checked completely, then computed where its
/// size says, on the same chain code as a session's Forward.
pub async fn forward_stateless(
    chain: Chain,
    x: Tensor,
    phases: &mut Phases,
) -> Result<Tensor, Error> {
    let computing = Instant::now();
    let plan = chain.plan(&x, None, false)?;
    let y = compute(x.len(), move || {
        let stateless = [MemberState::default()];
        chain.forward(&stateless, &x, None, &plan, false, false).y
    })
    .await?;
    phases.compute = computing.elapsed();
    Ok(y)
}

/// Elements per part when a stateless Forward reads its input a part at a
/// time ([`forward_stateless_parts`]): 256 KiB of float32, which stays in a
/// core's cache between the read, the layer and the write.
pub const PART_ELEMENTS: usize = 64 << 10;

/// Where a stateless Forward computed a part at a time reads its input and
/// puts its answer: an input still in the request's frames or in a
/// shared-memory region, an answer into the response or into a region.
pub trait Parts: Send + 'static {
    type Error: From<Error> + Send + 'static;

    /// The input's bytes `from..from + len`, read front to back once, in one
    /// or more pieces (an element may be cut between two).
    fn read(&mut self, from: usize, len: usize) -> Result<Vec<Bytes>, Self::Error>;

    /// Whether the answer goes elsewhere, part by part ([`Parts::write`]),
    /// rather than into the bytes the Forward returns.
    fn writes_elsewhere(&self) -> bool;

    /// Writes the answer of the part that starts at byte `from`.
    fn write(&mut self, from: usize, answer: &[u8]) -> Result<(), Self::Error>;
}

/// A stateless Forward of an elementwise `kind` over `len` elements of `wire`
/// read a part at a time from `parts`: one pass over the elements, each part
/// answered while it is in cache. Returns the answer's bytes (empty when
/// [`Parts::writes_elsewhere`]).
pub async fn forward_stateless_parts<P: Parts>(
    kind: Kind,
    wire: Wire,
    len: usize,
    mut parts: P,
    phases: &mut Phases,
) -> Result<Bytes, P::Error> {
    let model = Elementwise::of(kind)
        .ok_or_else(|| Error::Internal(format!("{kind} has no stateless pass")))?;
    let computing = Instant::now();
    let answer = compute(len, move || {
        let total = len * wire.itemsize();
        let part = PART_ELEMENTS * wire.itemsize();
        let elsewhere = parts.writes_elsewhere();
        let mut answer = Vec::with_capacity(if elsewhere { part.min(total) } else { total });
        for from in (0..total).step_by(part) {
            let pieces = parts.read(from, part.min(total - from))?;
            model.forward_bytes(wire, pieces.iter().map(|p| &p[..]), &mut answer);
            if elsewhere {
                parts.write(from, &answer)?;
                answer.clear();
            }
        }
        Ok::<_, P::Error>(Bytes::from(answer))
    })
    .await??;
    phases.compute = computing.elapsed();
    Ok(answer)
}

/// Applies a Forward's new buffer values and generator positions to
/// `members` (those that ran).
pub fn commit_forward(members: &mut [MemberState], updates: Vec<(Vec<Tensor>, Option<Rng>)>) {
    for (member, (buffers, rng)) in members.iter_mut().zip(updates) {
        let first_buffer = member.values.len() - buffers.len();
        for (slot, value) in member.values[first_buffer..].iter_mut().zip(buffers) {
            *slot = value;
        }
        member.rng = rng;
    }
}

/// What a Backward answers: `dx`, and the parameter gradients by name when
/// asked for.
pub struct BackwardAnswer {
    pub dx: Tensor,
    pub grads: Vec<(String, Tensor)>,
}

/// Backward on one layer instance, from what its last keeping Forward kept.
/// Stores the parameter gradients (replacing earlier ones) once computed;
/// the kept state stays, so Backward may be repeated.
pub async fn backward_on(
    layer: &LayerInstance,
    layer_id: &str,
    dout: Option<Tensor>,
    return_grads: bool,
    phases: &mut Phases,
) -> Result<BackwardAnswer, Error> {
    let queued = Instant::now();
    let mut state = layer.state.lock().await;
    let computing = Instant::now();
    phases.queue = computing - queued;
    let entry = state.kept.clone().ok_or_else(|| {
        let layer_id = layer_id.to_string();
        if state.kept_lost {
            Error::KeptStateLost { layer_id }
        } else {
            Error::NothingKept { layer_id }
        }
    })?;
    let chain = layer.chain.clone();
    chain.check_dout(&entry.kept, dout.as_ref())?;
    let members = state.members.clone();
    let elements = dout.as_ref().map_or(1, Tensor::len);
    let cost = cost(&chain, elements, entry.kept.bytes());
    let out = compute(cost, move || {
        chain.backward(&members, &entry.kept, dout.as_ref())
    })
    .await?;
    let grads = if return_grads {
        layer
            .chain
            .named_param_grads(out.grads.iter().map(Option::as_ref))
    } else {
        Vec::new()
    };
    for (member, grads) in state.members.iter_mut().zip(out.grads) {
        if grads.is_some() {
            member.grads = grads;
        }
    }
    phases.compute = computing.elapsed();
    Ok(BackwardAnswer { dx: out.dx, grads })
}

/// A layer's values: parameters, buffers, and (if asked) its gradients.
pub struct Values {
    pub params: Vec<(String, Tensor)>,
    pub buffers: Vec<(String, Tensor)>,
    pub grads: Vec<(String, Tensor)>,
}

/// The layer's parameters and buffers, and its stored gradients if asked.
pub async fn values_of(layer: &LayerInstance, include_grads: bool) -> Values {
    let state = layer.state.lock().await;
    let (params, buffers) = layer.chain.named_values(&state.members);
    let grads = if include_grads {
        layer.chain.named_grads(&state.members)
    } else {
        Vec::new()
    };
    Values {
        params,
        buffers,
        grads,
    }
}

/// Replaces named parameters or buffers, all or nothing (checked before
/// anything changes); drops the kept state and the gradients.
pub async fn set_values(
    layer: &LayerInstance,
    values: HashMap<String, Tensor>,
) -> Result<(), Error> {
    layer.chain.check_values(&values, "values")?;
    let mut state = layer.state.lock().await;
    state.members = layer.chain.with_values(&state.members, values);
    state.kept = None;
    state.kept_lost = false;
    Ok(())
}

/// Roughly the elements a computation's time scales with, for [`compute`]:
/// its tensor's, its largest array's, and its parameters'.
pub fn cost(chain: &Chain, elements: usize, bytes: u64) -> usize {
    let arrays = bytes.max(chain.held_bytes() / 2) / 4;
    elements.max(usize::try_from(arrays).unwrap_or(usize::MAX))
}

/// Runs `work` inline when small, else on the blocking pool — at most one
/// large computation per core at a time, so they cannot crowd out the async
/// workers that read requests, answer small calls and shed load.
pub async fn compute<T: Send + 'static>(
    elements: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    if is_small(elements) {
        return Ok(work());
    }
    let slot = compute_slots()
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    // The slot moves into the computation: a cancelled call frees it only
    // when its computation has really ended.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|e| Error::Internal(format!("layer computation failed: {e}")))
}

/// [`compute`] for a thread already off the async workers (a training
/// step's runner): waits for a slot if the work is large, then runs it here.
/// Small work runs at once, so this may be called on an async worker then.
pub fn compute_here<T>(elements: usize, work: impl FnOnce() -> T) -> T {
    if is_small(elements) {
        return work();
    }
    let _slot = tokio::runtime::Handle::current()
        .block_on(compute_slots().acquire())
        .expect("never closed");
    work()
}

/// Whether work of this many elements is computed inline on the async
/// executor rather than on the blocking pool.
pub fn is_small(elements: usize) -> bool {
    elements <= INLINE_COMPUTE_MAX_ELEMENTS
}

/// One slot per core for large computations.
fn compute_slots() -> &'static Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Semaphore::new(cores))
    })
}
