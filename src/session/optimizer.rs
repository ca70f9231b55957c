//! Optimizers in a session: which layers each owns, its step count, and the
//! state (v, h, m) it keeps beside each owned layer's parameters.
//!
//! Invariants:
//! - a layer belongs to at most one optimizer (its `InstanceState::optimizer`
//!   names it), so a parameter is updated by one optimizer only;
//! - a call that updates parameters locks the optimizer's step count first,
//!   then its layers in id order: two such calls cannot deadlock, and a
//!   Forward or Backward (one layer lock) never waits on an optimizer;
//! - a call ordered by `x-layerd-after-steps: N` runs only as update N + 1,
//!   so calls sent without waiting for each other's answers (a pipelining
//!   client) apply in the order the client numbered them, whatever order
//!   they arrive in: a Step or a small TrainStep waits (unlocked) until
//!   `progress` shows N, then checks the count again under the lock; a large
//!   TrainStep waits in the optimizer's `queue` for its runner
//!   ([`super::queue`]), which every change of the count wakes;
//! - exactly once: the last numbered update is kept with its answer
//!   ([`Applied`]) until the next commit; a call numbered N that finds the
//!   count at N + 1 and that update to be the same request (its fingerprint)
//!   is a retry whose first answer was lost: it gets that answer again and
//!   applies nothing. The count and the last update are published together
//!   ([`Progress`]), so a reader never sees one without the other;
//! - the state's bytes are charged to the session's budgets when the
//!   optimizer is created, before the zeros are allocated, and released with
//!   the optimizer.

use std::sync::Arc;

use super::queue::{self, StepQueue};
use super::{Charge, InstanceState, LayerInstance, Session};
use crate::error::Error;
use crate::layers::{with_float, Float};
use crate::optimizers::Algorithm;
use crate::tensor::Tensor;

/// One optimizer of a session.
pub struct Optimizer {
    pub id: String,
    pub algorithm: Algorithm,
    /// The layers it owns, sorted by id: the order calls lock them in.
    pub layers: Vec<(String, Arc<LayerInstance>)>,
    /// Updates applied so far; locked for the whole of a Step or TrainStep.
    pub steps: tokio::sync::Mutex<Steps>,
    /// The count and the last numbered update as of the last commit, for
    /// calls waiting for their turn and retries (set only through
    /// [`Optimizer::set_count`], under `steps`' lock).
    progress: tokio::sync::watch::Sender<Progress>,
    /// TrainSteps waiting for their turn.
    pub(crate) queue: StepQueue,
    /// The bytes of its state.
    _held: Charge,
}

/// An optimizer's progress, changed only by a call's commit.
pub struct Steps {
    /// Updates applied.
    pub count: u64,
    /// False until it owns its layers (and for good if claiming them
    /// failed): a call that got hold of it meanwhile must not run.
    pub live: bool,
}

/// An optimizer's committed progress.
#[derive(Clone, Default)]
pub struct Progress {
    /// Updates applied.
    pub count: u64,
    /// The last update, if it was numbered.
    pub last: Option<Arc<Applied>>,
    /// Restored from a store and not stepped since: the count may be behind
    /// what clients saw (steps lost with a crashed replica), so a call
    /// numbered ahead of it fails at once instead of waiting for updates
    /// that will not come.
    pub resumed: bool,
}

/// A numbered update that was applied, and what it answered.
pub struct Applied {
    /// The count it ran after (its `expected_step`).
    pub after: u64,
    /// The request's fingerprint: a retry is the same request again.
    pub request: u64,
    /// A TrainStep's answer (None: a Step, whose answer is the count).
    pub answer: Option<TrainAnswer>,
    /// The answer's bytes, charged to the session's kept budgets.
    pub held: Option<Charge>,
}

/// What a TrainStep answers.
#[derive(Clone)]
pub struct TrainAnswer {
    pub loss: f64,
    pub dx: Option<Tensor>,
    pub scores: Option<Tensor>,
    pub steps: u64,
}

impl TrainAnswer {
    /// The bytes its tensors hold.
    pub fn bytes(&self) -> u64 {
        [&self.dx, &self.scores]
            .into_iter()
            .flatten()
            .map(|t| t.byte_len() as u64)
            .sum()
    }
}

/// Whose turn it is when a call gets hold of the step count.
pub enum Turn<'a> {
    /// The call's: it runs as the next update.
    Run(tokio::sync::MutexGuard<'a, Steps>),
    /// The call is a retry of the last update, which was applied.
    Replay(Arc<Applied>),
}

/// An owned layer's optimizer state: which optimizer, and per member, per
/// parameter, one tensor per [`Algorithm::state_names`] (parameter-shaped).
#[derive(Clone)]
pub struct OptimizerState {
    pub optimizer_id: String,
    pub values: Vec<Vec<Vec<Tensor>>>,
}

impl Optimizer {
    /// Locks the step count for an update; with `after` (the call's
    /// `expected_step` or `x-layerd-after-steps`), first waits until `after`
    /// updates are applied, then answers [`Turn::Replay`] if the call is a
    /// retry of the last one (`request`: its fingerprint), and fails if more
    /// updates are applied: the call was to be update `after + 1`. The wait
    /// ends with the call (its deadline, or the client cancelling).
    pub async fn lock_steps(&self, after: Option<u64>, request: u64) -> Result<Turn<'_>, Error> {
        if let Some(after) = after {
            self.check_not_lost(after)?;
            let mut progress = self.progress.subscribe();
            // The sender lives as long as `self`, so this cannot fail.
            let _ = progress.wait_for(|p| p.count >= after).await;
        }
        let steps = self.steps.lock().await;
        match after {
            Some(expected) if steps.count != expected => self
                .retried(expected, request, steps.count)
                .map(Turn::Replay),
            _ => Ok(Turn::Run(steps)),
        }
    }

    /// The last update if it was the call numbered `after` with fingerprint
    /// `request` and nothing was applied since.
    fn replay(&self, after: u64, request: u64) -> Option<Arc<Applied>> {
        let progress = self.progress.borrow();
        let last = progress.last.as_ref()?;
        (progress.count == after + 1 && last.after == after && last.request == request)
            .then(|| last.clone())
    }

    /// A call numbered `after` (`request`: its fingerprint) found the count
    /// at `got`, past it: the last update, if the call is its retry
    /// (the same request, nothing applied since), else STEP_OUT_OF_ORDER.
    pub fn retried(&self, after: u64, request: u64, got: u64) -> Result<Arc<Applied>, Error> {
        self.replay(after, request)
            .ok_or_else(|| self.out_of_order(after, got))
    }

    /// Fails a call numbered `after` ahead of the count of an optimizer just
    /// restored from a store: the updates it follows were lost.
    pub fn check_not_lost(&self, after: u64) -> Result<(), Error> {
        let progress = self.progress.borrow();
        if progress.resumed && after > progress.count {
            return Err(self.out_of_order(after, progress.count));
        }
        Ok(())
    }

    /// Marks the optimizer as restored from a store ([`Progress::resumed`]).
    pub fn mark_resumed(&self) {
        self.progress
            .send_modify(|progress| progress.resumed = true);
    }

    /// STEP_OUT_OF_ORDER for a call numbered `expected` at count `got`.
    pub fn out_of_order(&self, expected: u64, got: u64) -> Error {
        Error::StepOutOfOrder {
            optimizer_id: self.id.clone(),
            expected,
            got,
        }
    }

    /// Commits a new step count and the update that made it (`last`: if the
    /// call was numbered), and wakes the calls waiting for it.
    pub fn set_count(self: &Arc<Self>, steps: &mut Steps, count: u64, last: Option<Applied>) {
        steps.count = count;
        self.progress.send_replace(Progress {
            count,
            last: last.map(Arc::new),
            resumed: false,
        });
        queue::kick(self, count);
    }

    /// The count as of the last commit (read without the lock).
    pub fn committed_count(&self) -> u64 {
        self.progress.borrow().count
    }

    /// The last update, if it was numbered (read without the lock).
    pub fn last_applied(&self) -> Option<Arc<Applied>> {
        self.progress.borrow().last.clone()
    }

    /// Puts back the last numbered update of a session restored from a
    /// store, under the step lock (`_steps`), its count unchanged.
    pub fn restore_last(&self, _steps: &Steps, last: Arc<Applied>) {
        self.progress
            .send_modify(|progress| progress.last = Some(last));
    }

    /// Locks every layer it owns, in id order (the order that keeps two
    /// updating calls from deadlocking); the guards are in `layers` order.
    pub async fn lock_layers(&self) -> Vec<tokio::sync::MutexGuard<'_, InstanceState>> {
        let mut states = Vec::with_capacity(self.layers.len());
        for (_, layer) in &self.layers {
            states.push(layer.state.lock().await);
        }
        states
    }

    /// [`Optimizer::lock_layers`] for a thread off the async workers.
    pub fn lock_layers_blocking(&self) -> Vec<tokio::sync::MutexGuard<'_, InstanceState>> {
        self.layers
            .iter()
            .map(|(_, layer)| layer.state.blocking_lock())
            .collect()
    }
}

impl Session {
    /// Adds optimizer `optimizer_id` over `layer_ids` (all layers with
    /// parameters if empty): checks the ids, that each layer has
    /// parameters and no optimizer, and charges the state's bytes, before it
    /// claims any layer.
    pub async fn create_optimizer(
        &self,
        optimizer_id: &str,
        algorithm: Algorithm,
        layer_ids: &[String],
    ) -> Result<(), Error> {
        super::check_id("optimizer_id", optimizer_id)?;
        if self.optimizer(optimizer_id).is_ok() {
            return Err(Error::OptimizerExists {
                session_id: self.id.clone(),
                optimizer_id: optimizer_id.to_string(),
            });
        }
        let mut layers = self.owned_layers(layer_ids)?;
        layers.sort_by(|a, b| a.0.cmp(&b.0));
        let copies = algorithm.state_names().len() as u64;
        let bytes = layers
            .iter()
            .map(|(_, layer)| layer.chain.param_bytes().saturating_mul(copies))
            .fold(0u64, u64::saturating_add);
        let held = self.reserve(bytes)?;
        let optimizer = Arc::new(Optimizer {
            id: optimizer_id.to_string(),
            algorithm,
            layers,
            steps: tokio::sync::Mutex::new(Steps {
                count: 0,
                live: false,
            }),
            progress: tokio::sync::watch::Sender::new(Progress::default()),
            queue: StepQueue::default(),
            _held: held,
        });
        // Named first (under its own lock, so no call runs on it before it
        // owns its layers), then the layers claimed, all or none.
        let mut steps = optimizer.steps.lock().await;
        {
            let mut optimizers = self.optimizers.lock().unwrap_or_else(|p| p.into_inner());
            if optimizers.contains_key(optimizer_id) {
                return Err(Error::OptimizerExists {
                    session_id: self.id.clone(),
                    optimizer_id: optimizer_id.to_string(),
                });
            }
            optimizers.insert(optimizer_id.to_string(), optimizer.clone());
        }
        let mut states = optimizer.lock_layers().await;
        let taken = optimizer
            .layers
            .iter()
            .zip(&states)
            .find_map(|((id, _), state)| state.optimizer.as_ref().map(|o| (id, o)));
        if let Some((layer_id, owner)) = taken {
            let error = Error::ParamsOwned {
                session_id: self.id.clone(),
                layer_id: layer_id.clone(),
                optimizer_id: owner.optimizer_id.clone(),
            };
            drop(states);
            self.optimizers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(optimizer_id);
            return Err(error);
        }
        for ((_, layer), state) in optimizer.layers.iter().zip(states.iter_mut()) {
            state.optimizer = Some(OptimizerState {
                optimizer_id: optimizer_id.to_string(),
                values: zero_state(&layer.chain, &state.members, copies as usize),
            });
        }
        steps.live = true;
        Ok(())
    }

    /// The layers an optimizer over `layer_ids` would own, checked.
    fn owned_layers(
        &self,
        layer_ids: &[String],
    ) -> Result<Vec<(String, Arc<LayerInstance>)>, Error> {
        if layer_ids.is_empty() {
            let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
            let owned: Vec<_> = layers
                .iter()
                .filter(|(_, layer)| layer.chain.has_params())
                .map(|(id, layer)| (id.clone(), layer.clone()))
                .collect();
            if owned.is_empty() {
                return Err(Error::invalid(
                    "layer_ids",
                    "layers with parameters (empty: every such layer of the session)",
                    format!(
                        "empty, and session {:?} has no layer with parameters",
                        self.id
                    ),
                    "NO_PARAMS",
                ));
            }
            return Ok(owned);
        }
        let mut owned = Vec::with_capacity(layer_ids.len());
        for (i, layer_id) in layer_ids.iter().enumerate() {
            let field = format!("layer_ids[{i}]");
            super::check_id(&field, layer_id)?;
            if layer_ids[..i].contains(layer_id) {
                return Err(Error::invalid(
                    field,
                    "each layer once",
                    format!("{layer_id:?} again"),
                    "DUPLICATE_LAYER",
                ));
            }
            let layer = self.layer(layer_id)?;
            if !layer.chain.has_params() {
                return Err(Error::invalid(
                    field,
                    "a layer with parameters",
                    format!(
                        "{layer_id:?}, a {} layer, which has none",
                        layer.chain.kind()
                    ),
                    "NO_PARAMS",
                ));
            }
            owned.push((layer_id.clone(), layer));
        }
        Ok(owned)
    }

    /// The optimizer `optimizer_id`.
    pub fn optimizer(&self, optimizer_id: &str) -> Result<Arc<Optimizer>, Error> {
        let optimizers = self.optimizers.lock().unwrap_or_else(|p| p.into_inner());
        optimizers
            .get(optimizer_id)
            .cloned()
            .ok_or_else(|| Error::OptimizerNotFound {
                session_id: self.id.clone(),
                optimizer_id: optimizer_id.to_string(),
            })
    }
}

/// Zeros of each parameter's shape and dtype, `copies` per parameter.
fn zero_state(
    chain: &crate::layers::Chain,
    members: &[crate::layers::MemberState],
    copies: usize,
) -> Vec<Vec<Vec<Tensor>>> {
    let mut values: Vec<Vec<Vec<Tensor>>> = vec![Vec::new(); members.len()];
    for (m, s, _, _) in chain.params() {
        let param = &members[m].values[s];
        let zeros = with_float!(param.dtype(), F => zeros_like::<F>(param));
        values[m].push(vec![zeros; copies]);
    }
    values
}

fn zeros_like<F: Float>(tensor: &Tensor) -> Tensor {
    Tensor::from_array(ndarray::ArrayD::<F>::zeros(ndarray::IxDyn(tensor.shape())))
}
