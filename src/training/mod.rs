//! Training through the service: Step (one optimizer update from the stored
//! gradients) and TrainStep (Forward, Backward from the loss and Step in one
//! call), on the same compute path as Forward and Backward.
//!
//! Invariant, as in [`crate::engine`]: everything is checked first (ids,
//! ownership, tensors, shapes, gradients present, bytes to keep), the
//! computation works on copies without touching the session, and the new
//! parameters, gradients, buffers, generators, optimizer state, kept state
//! and step count are committed together at the end, under the locks taken
//! at the start (the optimizer's, then its layers' in id order). A failed,
//! timed-out or cancelled call therefore leaves all of them as they were.
//!
//! A TrainStep large enough for the blocking pool runs on its optimizer's
//! runner thread ([`crate::session::queue`]), which applies queued steps back to back; a
//! small one computes inline on the async worker that decoded it.

use std::sync::Arc;

use ndarray::{ArrayD, CowArray, IxDyn};
use tokio::sync::MutexGuard;

use crate::engine::{commit_forward, compute, compute_here, cost, is_small};
use crate::error::Error;
use crate::layers::chain::ForwardPlan;
use crate::layers::{with_float, Chain, Float, MemberState};
use crate::optimizers::Algorithm;
use crate::session::queue::{self, StepCall};
pub use crate::session::TrainAnswer;
use crate::session::{
    Applied, InstanceState, KeptEntry, LayerInstance, Optimizer, OptimizerState, Session, Steps,
    Turn,
};
use crate::tensor::{Target, Tensor};

/// Per member: its parameter gradients (None: no parameters, or none yet).
type Grads = Vec<Option<Vec<Tensor>>>;

/// What TrainStep is asked for besides x and t.
#[derive(Debug, Clone, Copy, Default, Hash)]
pub struct TrainOptions {
    pub return_dx: bool,
    pub return_scores: bool,
}

/// One update of every parameter `optimizer` owns from the gradients stored
/// by the last Backward of each layer; answers the updates applied so far.
/// `after`: run only as update `after + 1` ([`Optimizer::lock_steps`]); a
/// retry of the Step that was that update answers its count again.
pub async fn step_on(optimizer: &Arc<Optimizer>, after: Option<u64>) -> Result<u64, Error> {
    let mut steps = match optimizer.lock_steps(after, STEP_REQUEST).await? {
        Turn::Run(steps) => steps,
        Turn::Replay(applied) => return Ok(applied.after + 1),
    };
    check_live(optimizer, steps.live)?;
    let mut states = optimizer.lock_layers().await;
    let work = stored_updates(optimizer, &states, None)?;
    let (algorithm, t) = (optimizer.algorithm, steps.count + 1);
    let elements = work.iter().map(LayerUpdate::elements).sum();
    let updated = compute(elements, move || {
        work.into_iter()
            .map(|w| w.run(&algorithm, t))
            .collect::<Vec<_>>()
    })
    .await?;
    for (state, (members, optimizer_state)) in states.iter_mut().zip(updated) {
        state.members = members;
        state.optimizer = Some(optimizer_state);
    }
    let last = after.map(|after| Applied {
        after,
        request: STEP_REQUEST,
        answer: None,
        held: None,
    });
    optimizer.set_count(&mut steps, t, last);
    Ok(t)
}

/// A Step's fingerprint: every Step of an optimizer is the same request.
const STEP_REQUEST: u64 = 0;

/// Forward (keeping, training mode) of `x` with target `t` through
/// `layer_id`, Backward from its loss, and one update by `optimizer` of every
/// parameter it owns: `layer_id`'s from the new gradients, any other layer's
/// from its stored ones. The call is checked here; then a small one runs here
/// and a large one is queued for its optimizer's runner ([`queue`]).
/// `after`: run only as update `after + 1`; a retry of the same request
/// after it was applied answers the first attempt's answer and applies
/// nothing.
pub async fn train_step_on(
    session: &Arc<Session>,
    optimizer: &Arc<Optimizer>,
    layer_id: &str,
    x: Tensor,
    t: Target,
    options: TrainOptions,
    after: Option<u64>,
) -> Result<TrainAnswer, Error> {
    let Some(trained) = optimizer.layers.iter().position(|(id, _)| id == layer_id) else {
        let owned: Vec<&str> = optimizer.layers.iter().map(|(id, _)| id.as_str()).collect();
        return Err(Error::invalid(
            "layer_id",
            format!(
                "a layer optimizer {:?} owns ({})",
                optimizer.id,
                owned.join(", ")
            ),
            format!("{layer_id:?}"),
            "NOT_OWNED",
        ));
    };
    let chain = &optimizer.layers[trained].1.chain;
    let plan = chain.plan(&x, Some(&t), false)?;
    session.check_work(plan.work_bytes)?;
    let elements = cost(chain, x.len(), plan.work_bytes)
        + optimizer
            .layers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != trained)
            .map(|(_, (_, layer))| update_elements(&layer.chain))
            .sum::<usize>();
    let request = after.map_or(0, |_| fingerprint(layer_id, &x, &t, options));
    let call = TrainCall {
        session: session.clone(),
        after,
        request,
        trained,
        x,
        t,
        plan,
        options,
        elements,
    };
    if is_small(elements) {
        // Computed inline, like any small call: no thread to wake.
        let mut steps = match optimizer.lock_steps(after, request).await? {
            Turn::Run(steps) => steps,
            Turn::Replay(applied) => return Ok(TrainCall::replayed(&applied)),
        };
        let mut states = optimizer.lock_layers().await;
        return call.run(optimizer, &mut steps, &mut states, &|| false);
    }
    queue::submit(optimizer, after, request, call).await
}

/// A TrainStep's fingerprint: what it trains, on what, and what it answers;
/// odd, so never a Step's.
fn fingerprint(layer_id: &str, x: &Tensor, t: &Target, options: TrainOptions) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    (layer_id, options).hash(&mut hasher);
    x.fingerprint(&mut hasher);
    t.fingerprint(&mut hasher);
    hasher.finish() | 1
}

/// A checked TrainStep waiting for its turn.
struct TrainCall {
    session: Arc<Session>,
    /// The count it is to run after, if numbered.
    after: Option<u64>,
    /// Its fingerprint (numbered calls only).
    request: u64,
    /// Which of the optimizer's layers it trains.
    trained: usize,
    x: Tensor,
    t: Target,
    plan: ForwardPlan,
    options: TrainOptions,
    /// Its cost, for [`compute_here`].
    elements: usize,
}

impl StepCall for TrainCall {
    type Answer = TrainAnswer;

    fn run(
        self,
        optimizer: &Arc<Optimizer>,
        steps: &mut Steps,
        states: &mut [MutexGuard<'_, InstanceState>],
        abandoned: &dyn Fn() -> bool,
    ) -> Result<TrainAnswer, Error> {
        let TrainCall {
            session,
            after,
            request,
            trained,
            x,
            t,
            plan,
            options,
            elements,
        } = self;
        check_live(optimizer, steps.live)?;
        let others = stored_updates(optimizer, states, Some(trained))?;
        // Reserved before computing; old and new kept state both exist until the commit.
        let charge = session.reserve(plan.kept_bytes)?;
        let chain = optimizer.layers[trained].1.chain.clone();
        let (algorithm, step) = (optimizer.algorithm, steps.count + 1);
        let members = &states[trained].members;
        let (loss, dx, scores, kept, trained_update, others) = compute_here(elements, || {
            let forwarded = chain.forward(members, &x, Some(&t), &plan, false, true);
            let kept = forwarded.kept.expect("a keeping Forward keeps");
            let (dx, grads) = chain.backward_for_step(members, &kept, None, options.return_dx);
            let loss = scalar(&forwarded.y);
            let scores = options.return_scores.then(|| forwarded.scores.unwrap_or(x));
            // The new buffers and generator positions, then the update from the new gradients.
            let mut after_forward = members.clone();
            commit_forward(&mut after_forward, forwarded.updates);
            let update = LayerUpdate {
                chain: chain.clone(),
                members: after_forward,
                grads,
                state: states[trained].optimizer.clone(),
            };
            let trained = update.run(&algorithm, step);
            let others: Vec<_> = others
                .into_iter()
                .map(|w| w.run(&algorithm, step))
                .collect();
            (loss, dx, scores, kept, trained, others)
        });
        if abandoned() {
            return Err(Error::Internal("the caller went away".into()));
        }
        let mut trained_update = Some(trained_update);
        let mut others = others.into_iter();
        for (i, state) in states.iter_mut().enumerate() {
            let (members, optimizer_state) = if i == trained {
                trained_update.take().expect("one trained layer")
            } else {
                others.next().expect("one per other layer")
            };
            state.members = members;
            state.optimizer = Some(optimizer_state);
        }
        let answer = TrainAnswer {
            loss,
            dx,
            scores,
            steps: step,
        };
        // A numbered step keeps its answer for a retry (sharing its bytes).
        let last = match after {
            Some(after) => Some(Applied {
                after,
                request,
                answer: Some(answer.clone()),
                held: Some(session.reserve(answer.bytes())?),
            }),
            None => None,
        };
        states[trained].kept = Some(Arc::new(KeptEntry::new(kept, charge)));
        states[trained].kept_lost = false;
        optimizer.set_count(steps, step, last);
        Ok(answer)
    }

    fn replayed(applied: &Applied) -> TrainAnswer {
        applied
            .answer
            .clone()
            .expect("a TrainStep's fingerprint is never a Step's")
    }
}

/// Fails if the optimizer never came to own its layers (its creation lost a
/// race and was rolled back after this call found it).
fn check_live(optimizer: &Optimizer, live: bool) -> Result<(), Error> {
    if live {
        return Ok(());
    }
    Err(Error::Internal(format!(
        "optimizer {:?} was not created",
        optimizer.id
    )))
}

/// The updates of the optimizer's layers (but `except`) from their stored
/// gradients; `states` are the layers' locked states, in `layers` order.
fn stored_updates(
    optimizer: &Optimizer,
    states: &[MutexGuard<'_, InstanceState>],
    except: Option<usize>,
) -> Result<Vec<LayerUpdate>, Error> {
    let mut updates = Vec::with_capacity(states.len());
    for (i, ((layer_id, layer), state)) in optimizer.layers.iter().zip(states).enumerate() {
        if Some(i) != except {
            let grads = stored_grads(optimizer, layer_id, layer, &state.members)?;
            updates.push(LayerUpdate::new(
                layer,
                &state.members,
                grads,
                &state.optimizer,
            ));
        }
    }
    Ok(updates)
}

/// The stored gradients of `layer`, or which parameter has none.
fn stored_grads(
    optimizer: &Optimizer,
    layer_id: &str,
    layer: &LayerInstance,
    members: &[MemberState],
) -> Result<Grads, Error> {
    if let Some((_, _, name, _)) = layer
        .chain
        .params()
        .find(|(m, _, _, _)| members[*m].grads.is_none())
    {
        return Err(Error::NoGradients {
            optimizer_id: optimizer.id.clone(),
            layer_id: layer_id.to_string(),
            param: name.to_string(),
        });
    }
    Ok(members.iter().map(|m| m.grads.clone()).collect())
}

/// One layer's update, on copies, ready to run off the session's locks.
struct LayerUpdate {
    chain: Arc<Chain>,
    members: Vec<MemberState>,
    grads: Grads,
    state: Option<OptimizerState>,
}

impl LayerUpdate {
    fn new(
        layer: &LayerInstance,
        members: &[MemberState],
        grads: Grads,
        state: &Option<OptimizerState>,
    ) -> LayerUpdate {
        LayerUpdate {
            chain: layer.chain.clone(),
            members: members.to_vec(),
            grads,
            state: state.clone(),
        }
    }

    /// Elements it reads and writes, for [`compute`].
    fn elements(&self) -> usize {
        update_elements(&self.chain)
    }

    /// The members with updated parameters and the gradients they were
    /// updated from, and the new optimizer state.
    fn run(self, algorithm: &Algorithm, t: u64) -> (Vec<MemberState>, OptimizerState) {
        let LayerUpdate {
            chain,
            mut members,
            grads,
            state,
        } = self;
        let mut state = state.expect("an owned layer has optimizer state");
        for (m, s, _, _) in chain.params() {
            let grad = &grads[m]
                .as_ref()
                .expect("checked: every parameter has a gradient")[s];
            let param = &mut members[m].values[s];
            let slots = &mut state.values[m][s];
            with_float!(param.dtype(), F => update_one::<F>(algorithm, t, param, grad, slots));
        }
        for (member, grads) in members.iter_mut().zip(grads) {
            if grads.is_some() {
                member.grads = grads;
            }
        }
        (members, state)
    }
}

/// Elements an update of `chain`'s parameters reads and writes.
fn update_elements(chain: &Chain) -> usize {
    (chain.param_bytes() / 4) as usize
}

/// Replaces `param` and `slots` by their values after update `t`.
fn update_one<F: Float>(
    algorithm: &Algorithm,
    t: u64,
    param: &mut Tensor,
    grad: &Tensor,
    slots: &mut [Tensor],
) {
    let p = param.view::<F>();
    let g = grad.view::<F>();
    let (p, g) = (p.as_standard_layout(), g.as_standard_layout());
    let s: Vec<CowArray<'_, F, IxDyn>> = slots.iter().map(|s| s.view::<F>()).collect();
    let s: Vec<&[F]> = s
        .iter()
        .map(|s| s.as_slice().expect("stored values are contiguous"))
        .collect();
    let (p, s) = algorithm.update(
        t,
        p.as_slice().expect("standard layout"),
        g.as_slice().expect("standard layout"),
        &s,
    );
    let shape = IxDyn(param.shape());
    let array = |values: Vec<F>| {
        Tensor::from_array(ArrayD::from_shape_vec(shape.clone(), values).expect("same length"))
    };
    *param = array(p);
    for (slot, value) in slots.iter_mut().zip(s) {
        *slot = array(value);
    }
}

/// The value of a one-element tensor (a loss), widened to f64.
fn scalar(tensor: &Tensor) -> f64 {
    with_float!(tensor.dtype(), F => {
        let value: F = *tensor.view::<F>().iter().next().expect("a loss has one element");
        num_traits::ToPrimitive::to_f64(&value).expect("floats widen to f64")
    })
}
