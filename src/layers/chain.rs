//! A layer instance's math, dtype-erased: a chain of configured members (one
//! for a plain layer, several for a `sequential`), run in order on Forward and
//! in reverse on Backward, over validated [`Tensor`]s.
//!
//! Invariant: every check a call needs — the dtype, each member's input
//! shape, the target, the bytes that will be kept and the largest array that
//! will be built — is made by [`Chain::plan`], [`Chain::check_dout`] or
//! [`Chain::check_values`] before anything is computed. [`Chain::forward`],
//! [`Chain::backward`] and [`Chain::with_values`] then cannot fail, and return
//! the new state for the caller to commit: they change nothing themselves.
//!
//! Names: a plain layer's slots are named as the kind declares them (`W`,
//! `b`); a sequential's as `<member>.<name>` (`fc1.W`), as in a PyTorch
//! state_dict.

use std::{any::Any, collections::HashMap, fmt};

use ndarray::{ArcArray, ArrayD, ArrayViewD, CowArray, Ix2, IxDyn};

use super::relu::{Mask, Relu};
use super::rng::Rng;
use super::{init, with_float, with_spec, Fill, Float, Kind, Layer, Plan, Role, Slot, Spec, Step};
use crate::dtype::{DType, Wire};
use crate::error::Error;
use crate::tensor::{Target, Tensor};

/// Tensors by name.
pub type Named = Vec<(String, Tensor)>;

/// One member of a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Unique in its sequential; empty for a plain layer.
    pub name: String,
    pub spec: Spec,
}

/// The configured math of one layer instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    members: Vec<Member>,
    sequential: bool,
    /// The dtype of its parameters, which x must have; None for a chain
    /// without parameters (it takes either float dtype).
    dtype: Option<DType>,
    /// Every slot: (member index, slot index, client-facing name, slot).
    slots: Vec<(usize, usize, String, Slot)>,
    /// Bytes of its parameters, their gradients and its buffers.
    held_bytes: u64,
}

/// What one member holds besides kept state.
#[derive(Debug, Clone, Default)]
pub struct MemberState {
    /// Its slots' values, in the order the kind declares them.
    pub values: Vec<Tensor>,
    /// The parameter gradients of the last Backward (None before one, and
    /// after SetParams).
    pub grads: Option<Vec<Tensor>>,
    /// Its generator (Dropout's), at the position the next draw starts from.
    pub rng: Option<Rng>,
}

/// What a Forward will do, checked before it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardPlan {
    /// Members that run: all, or all but the loss when no target is given.
    runs: usize,
    ran_loss: bool,
    /// Bytes the members keep, if the call keeps.
    pub kept_bytes: u64,
    /// The largest array the call builds (an output, or im2col's scratch).
    pub work_bytes: u64,
}

/// What a keeping Forward left for Backward.
pub struct Kept {
    /// How the keeping Forward's x (and so its y) traveled: Backward's dout
    /// must come, and its dx goes back, the same way; its compute dtype is
    /// the one the members kept their state in.
    wire: Wire,
    y_shape: Vec<usize>,
    ran_loss: bool,
    members: Vec<Box<dyn Any + Send + Sync>>,
    bytes: u64,
}

impl Kept {
    /// Heap bytes held, as [`ForwardPlan::kept_bytes`] declared.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl fmt::Debug for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kept")
            .field("wire", &self.wire)
            .field("y_shape", &self.y_shape)
            .field("ran_loss", &self.ran_loss)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// A Forward's results, to commit.
pub struct Forwarded {
    pub y: Tensor,
    pub kept: Option<Kept>,
    /// Per member that ran: new buffer values (empty: unchanged) and the
    /// generator's new position.
    pub updates: Vec<(Vec<Tensor>, Option<Rng>)>,
    /// The loss member's input (the scores), when a member before it made
    /// them; None when the loss ran on x itself or no loss ran.
    pub scores: Option<Tensor>,
}

/// A Backward's results, to commit.
pub struct Backwarded {
    pub dx: Tensor,
    /// Per member: its parameter gradients (None for a member without
    /// parameters or that did not run).
    pub grads: Vec<Option<Vec<Tensor>>>,
}

impl Chain {
    /// A plain layer.
    pub fn single(spec: Spec, dtype: Option<DType>) -> Chain {
        Chain::new(
            vec![Member {
                name: String::new(),
                spec,
            }],
            false,
            dtype,
        )
    }

    /// A sequential of `members` (validated by the caller: at least one,
    /// unique names, a loss only last).
    pub fn sequential(members: Vec<Member>, dtype: Option<DType>) -> Chain {
        Chain::new(members, true, dtype)
    }

    fn new(members: Vec<Member>, sequential: bool, dtype: Option<DType>) -> Chain {
        let mut slots = Vec::new();
        for (m, member) in members.iter().enumerate() {
            for (s, slot) in member.spec.slots().into_iter().enumerate() {
                let name = if sequential {
                    format!("{}.{}", member.name, slot.name)
                } else {
                    slot.name.to_string()
                };
                slots.push((m, s, name, slot));
            }
        }
        let dtype = if slots.is_empty() {
            dtype
        } else {
            Some(dtype.unwrap_or(DType::F32))
        };
        // Saturating: a config too large to address is refused by the budget.
        let itemsize = dtype.map_or(0, DType::itemsize) as u64;
        let held_bytes = slots
            .iter()
            .map(|(_, _, _, slot)| {
                let copies = if slot.role == Role::Param { 2 } else { 1 };
                slot.elements().saturating_mul(itemsize * copies)
            })
            .fold(0u64, u64::saturating_add);
        Chain {
            members,
            sequential,
            dtype,
            slots,
            held_bytes,
        }
    }

    pub fn kind(&self) -> Kind {
        if self.sequential {
            Kind::Sequential
        } else {
            self.members[0].spec.kind()
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Every slot with its member index, slot index and client-facing name
    /// (named once, when the chain is built).
    fn slots(&self) -> &[(usize, usize, String, Slot)] {
        &self.slots
    }

    /// Its parameters (learned slots): (member index, slot index, name,
    /// slot), in declaration order. A member's parameters come before its
    /// buffers, so the slot index is also the index of its gradient.
    pub fn params(&self) -> impl Iterator<Item = (usize, usize, &str, &Slot)> {
        self.slots
            .iter()
            .filter(|(_, _, _, slot)| slot.role == Role::Param)
            .map(|(m, s, name, slot)| (*m, *s, name.as_str(), slot))
    }

    /// Bytes of one copy of its parameters (an optimizer's state per name).
    pub fn param_bytes(&self) -> u64 {
        let itemsize = self.dtype.map_or(0, DType::itemsize) as u64;
        self.params()
            .map(|(_, _, _, slot)| slot.elements().saturating_mul(itemsize))
            .fold(0u64, u64::saturating_add)
    }

    /// The names of all its slots, parameters and buffers, in declaration order.
    pub fn slot_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|(_, _, name, _)| name.as_str())
    }

    /// The shapes of all its slots, in the order of [`Chain::slot_names`].
    pub fn slot_shapes(&self) -> impl Iterator<Item = &[usize]> {
        self.slots
            .iter()
            .map(|(_, _, _, slot)| slot.shape.as_slice())
    }

    /// Whether it has parameters (something an optimizer can own).
    pub fn has_params(&self) -> bool {
        self.params().next().is_some()
    }

    /// Bytes its parameters, their gradients and its buffers occupy
    /// (saturating: a config too large to address is refused by the budget).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Checks client-given values (`params`, SetParams' `values`): each
    /// name must be a slot, with its shape, in the chain's dtype. `field`
    /// names the map in errors.
    pub fn check_values(&self, values: &HashMap<String, Tensor>, field: &str) -> Result<(), Error> {
        let slots = self.slots();
        let mut names: Vec<&String> = values.keys().collect();
        names.sort();
        for name in names {
            let value = &values[name];
            let entry = format!("{field}[{name:?}]");
            let Some((_, _, _, slot)) = slots.iter().find(|(_, _, n, _)| n == name) else {
                let known: Vec<&str> = slots.iter().map(|(_, _, n, _)| n.as_str()).collect();
                let expected = if known.is_empty() {
                    format!("no values: a {} layer has no parameters", self.kind())
                } else {
                    format!("one of {}", known.join(", "))
                };
                return Err(Error::invalid(
                    entry,
                    expected,
                    format!("{name:?}"),
                    "UNKNOWN_PARAM",
                ));
            };
            let dtype = self.dtype.expect("a chain with slots has a dtype");
            if value.dtype() != dtype || value.shape() != slot.shape.as_slice() {
                return Err(Error::invalid(
                    entry,
                    format!("{}{:?}", dtype.proto_name(), slot.shape),
                    format!("{}{:?}", value.dtype().proto_name(), value.shape()),
                    "PARAM_MISMATCH",
                ));
            }
        }
        Ok(())
    }

    /// The members' first state: the given values (checked by
    /// [`Chain::check_values`]), the rest filled as the config says.
    pub fn initial_state(&self, mut given: HashMap<String, Tensor>) -> Vec<MemberState> {
        let mut states: Vec<MemberState> = self
            .members
            .iter()
            .map(|member| MemberState {
                values: Vec::new(),
                grads: None,
                rng: match member.spec {
                    Spec::Dropout(d) => Some(Rng::from_seed(d.seed)),
                    _ => None,
                },
            })
            .collect();
        let dtype = self.dtype.unwrap_or(DType::F32);
        let mut generators: HashMap<usize, Rng> = HashMap::new();
        for (m, _, name, slot) in self.slots() {
            let (m, slot) = (*m, slot.clone());
            let value = match given.remove(name) {
                Some(value) => with_float!(dtype, F => aligned::<F>(&value)),
                None => with_float!(dtype, F => {
                    let array: ArrayD<F> = match slot.fill {
                        Fill::Zeros => ArrayD::zeros(IxDyn(&slot.shape)),
                        Fill::Ones => ArrayD::ones(IxDyn(&slot.shape)),
                        Fill::Weights { fan_in, init } => {
                            let rng = generators
                                .entry(m)
                                .or_insert_with(|| Rng::from_seed(init.seed));
                            init::weights::<F>(&slot.shape, fan_in, init.method, rng)
                        }
                    };
                    Tensor::from_array(array)
                }),
            };
            states[m].values.push(value);
        }
        states
    }

    /// Checks a Forward of `x` (and target `t`) completely and says what it
    /// will keep and build.
    pub fn plan(&self, x: &Tensor, t: Option<&Target>, eval: bool) -> Result<ForwardPlan, Error> {
        if let Some(dtype) = self.dtype {
            if x.dtype() != dtype {
                let accepted = match dtype {
                    DType::F32 => "DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16",
                    DType::F64 => "DTYPE_FLOAT64",
                };
                return Err(Error::invalid(
                    "x.dtype",
                    format!(
                        "{accepted} (the layer's parameters are {})",
                        dtype.proto_name()
                    ),
                    x.wire().proto_name(),
                    "DTYPE_MISMATCH",
                ));
            }
        }
        let itemsize = x.dtype().itemsize();
        let mut shape = x.shape().to_vec();
        let mut plan = ForwardPlan {
            runs: 0,
            ran_loss: false,
            kept_bytes: 0,
            work_bytes: 0,
        };
        for member in &self.members {
            if member.spec.is_loss() && t.is_none() {
                if self.sequential {
                    break; // answers the scores
                }
                return Err(Error::invalid(
                    "t",
                    "a target: INT64 class ids (N,) or probabilities of the scores' shape",
                    "none (field not set)",
                    "MISSING_TENSOR",
                ));
            }
            let out =
                with_spec!(&member.spec, l => l.output_shape(&shape)).map_err(|expected| {
                    Error::invalid(
                        "x.shape",
                        self.at_member(member, &shape, expected),
                        format!("{:?}", x.shape()),
                        "SHAPE_MISMATCH",
                    )
                })?;
            if member.spec.is_loss() {
                check_target(t.expect("checked above"), x.dtype(), &shape)?;
                plan.ran_loss = true;
            }
            let step = Plan {
                x: &shape,
                itemsize,
                eval,
                classes: t.is_some_and(Target::is_classes),
            };
            let kept = with_spec!(&member.spec, l => l.kept_bytes(step));
            let scratch = with_spec!(&member.spec, l => l.scratch_elements(&shape));
            let out_elements = out.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
            plan.kept_bytes = plan.kept_bytes.saturating_add(kept as u64);
            plan.work_bytes = plan
                .work_bytes
                .max(out_elements.max(scratch).saturating_mul(itemsize as u64));
            plan.runs += 1;
            shape = out;
        }
        if t.is_some() && !plan.ran_loss {
            return Err(Error::invalid(
                "t",
                format!("no target: a {} layer has no loss layer", self.kind()),
                "a target",
                "UNEXPECTED_TARGET",
            ));
        }
        Ok(plan)
    }

    /// What to expect, for a sequential naming the member and its input.
    fn at_member(&self, member: &Member, input: &[usize], expected: String) -> String {
        if self.sequential {
            format!(
                "x such that member {:?} ({}) gets {expected}; it would get {input:?}",
                member.name,
                member.spec.kind()
            )
        } else {
            expected
        }
    }

    /// Forward as planned, from the members' current state; commits nothing.
    /// Without `keep`, buffers and generators stay as they were.
    pub fn forward(
        &self,
        states: &[MemberState],
        x: &Tensor,
        t: Option<&Target>,
        plan: &ForwardPlan,
        eval: bool,
        keep: bool,
    ) -> Forwarded {
        if let Some(forwarded) = self.relu_on_halves(states, x, plan, keep) {
            return forwarded;
        }
        with_float!(x.dtype(), F => self.forward_as::<F>(states, x, t, plan, eval, keep))
    }

    /// Whether this is one ReLU (a plain layer, or a sequential of it alone).
    fn is_lone_relu(&self) -> bool {
        matches!(&self.members[..], [member] if matches!(member.spec, Spec::Relu(_)))
    }

    /// A lone ReLU on a half x: computed on its 16-bit elements, never
    /// widened (exact, see `relu.rs`); None for anything else.
    fn relu_on_halves(
        &self,
        states: &[MemberState],
        x: &Tensor,
        plan: &ForwardPlan,
        keep: bool,
    ) -> Option<Forwarded> {
        if !self.is_lone_relu() {
            return None;
        }
        let (wire, xs) = x.halves()?;
        let (y, mask) = Relu::keep_halves(&xs, wire);
        let kept = keep.then(|| Kept {
            wire,
            y_shape: x.shape().to_vec(),
            ran_loss: false,
            members: vec![Box::new(mask) as Box<dyn Any + Send + Sync>],
            bytes: plan.kept_bytes,
        });
        Some(Forwarded {
            y: Tensor::from_halves(wire, x.shape(), y),
            kept,
            updates: vec![(Vec::new(), states[0].rng)],
            scores: None,
        })
    }

    fn forward_as<F: Float>(
        &self,
        states: &[MemberState],
        x: &Tensor,
        t: Option<&Target>,
        plan: &ForwardPlan,
        eval: bool,
        keep: bool,
    ) -> Forwarded {
        let x_wire = x.wire();
        // An aligned copy made for this call is held as a shared array, so a
        // first member that keeps its input (Affine) keeps that copy instead
        // of making another.
        let (x_borrowed, x_copied) = match x.view::<F>() {
            x if x.is_view() => (Some(x), None),
            x => (None, Some(x.into_owned().into_shared())),
        };
        let x = x_copied.as_ref().map_or_else(
            || x_borrowed.as_ref().expect("one of the two").view(),
            |x| x.view(),
        );
        let target_values = match t {
            Some(Target::Probabilities(p)) => Some(p.view::<F>()),
            _ => None,
        };
        let mut y: Option<ArcArray<F, IxDyn>> = None;
        let mut kept = Vec::new();
        let mut updates = Vec::new();
        let mut scores = None;
        for (member, state) in self.members.iter().zip(states).take(plan.runs) {
            if member.spec.is_loss() {
                scores = y
                    .clone()
                    .map(|y| Tensor::from_shared(y).answered_as(x_wire));
            }
            let values: Vec<CowArray<'_, F, IxDyn>> =
                state.values.iter().map(Tensor::view::<F>).collect();
            let views: Vec<ArrayViewD<'_, F>> = values.iter().map(|v| v.view()).collect();
            let mut rng = state.rng;
            let input = y.as_ref().map_or_else(|| x.view(), |y| y.view());
            let input_shared = y.as_ref().or(x_copied.as_ref());
            // Array views are invariant in their lifetime: the target is
            // viewed anew for each step.
            let target = t.filter(|_| member.spec.is_loss()).map(|t| match t {
                Target::Classes(ids) => super::Target::Classes(ids.view()),
                Target::Probabilities(_) => super::Target::Probabilities(
                    target_values
                        .as_ref()
                        .expect("made above")
                        .view()
                        .into_dimensionality::<Ix2>()
                        .expect("validated (N, C)"),
                ),
            });
            let out = with_spec!(&member.spec, l => run_forward(l, Step {
                x: input,
                x_shared: input_shared,
                values: &views,
                target,
                eval,
                keep,
                rng: rng.as_mut(),
            }));
            if let Some(state) = out.1 {
                kept.push(state);
            }
            let buffers = out.2.into_iter().map(Tensor::from_array).collect();
            updates.push((buffers, if keep { rng } else { state.rng }));
            y = Some(out.0);
        }
        // A sequential that is only a loss, without t, runs no member: its
        // scores are its input.
        let y = y.unwrap_or_else(|| x.to_owned().into_shared());
        let kept = keep.then(|| Kept {
            wire: x_wire,
            y_shape: y.shape().to_vec(),
            ran_loss: plan.ran_loss,
            members: kept,
            bytes: plan.kept_bytes,
        });
        Forwarded {
            y: Tensor::from_shared(y).answered_as(x_wire),
            kept,
            updates,
            scores,
        }
    }

    /// Checks Backward's `dout` against what the keeping Forward answered:
    /// its dtype and shape, or absent (= 1) after a loss.
    pub fn check_dout(&self, kept: &Kept, dout: Option<&Tensor>) -> Result<(), Error> {
        match dout {
            None if kept.ran_loss => Ok(()),
            None => Err(Error::invalid(
                "dout",
                format!(
                    "a tensor ({}{:?}, the kept Forward's output): only a loss may omit it",
                    kept.wire.proto_name(),
                    kept.y_shape
                ),
                "none (field not set)",
                "MISSING_TENSOR",
            )),
            Some(dout) if dout.wire() == kept.wire && dout.shape() == kept.y_shape => Ok(()),
            Some(dout) => Err(Error::invalid(
                "dout",
                format!(
                    "the kept Forward's {}{:?}",
                    kept.wire.proto_name(),
                    kept.y_shape
                ),
                format!("{}{:?}", dout.wire().proto_name(), dout.shape()),
                "DOUT_MISMATCH",
            )),
        }
    }

    /// Backward through the members that ran, in reverse, from what they
    /// kept (checked by [`Chain::check_dout`]); commits nothing.
    pub fn backward(
        &self,
        states: &[MemberState],
        kept: &Kept,
        dout: Option<&Tensor>,
    ) -> Backwarded {
        if let Some(backwarded) = self.relu_back_on_halves(kept, dout) {
            return backwarded;
        }
        with_float!(kept.wire.compute(), F => self.backward_as::<F>(states, kept, dout, true))
    }

    /// [`Chain::relu_on_halves`]'s Backward, from a half dout.
    fn relu_back_on_halves(&self, kept: &Kept, dout: Option<&Tensor>) -> Option<Backwarded> {
        if !self.is_lone_relu() {
            return None;
        }
        let dout = dout?;
        let (wire, ds) = dout.halves()?;
        let mask = kept.members[0]
            .downcast_ref::<Mask>()
            .expect("a ReLU keeps its mask");
        Some(Backwarded {
            dx: Tensor::from_halves(wire, dout.shape(), Relu::backward_halves(mask, &ds)),
            grads: vec![None],
        })
    }

    /// [`Chain::backward`] for a training step: without `need_dx`, the first
    /// member computes only its parameter gradients (affine and convolution
    /// then skip a matrix product) and `dx` is `None`.
    pub fn backward_for_step(
        &self,
        states: &[MemberState],
        kept: &Kept,
        dout: Option<&Tensor>,
        need_dx: bool,
    ) -> (Option<Tensor>, Vec<Option<Vec<Tensor>>>) {
        let out = with_float!(kept.wire.compute(), F => self.backward_as::<F>(states, kept, dout, need_dx));
        (need_dx.then_some(out.dx), out.grads)
    }

    fn backward_as<F: Float>(
        &self,
        states: &[MemberState],
        kept: &Kept,
        dout: Option<&Tensor>,
        need_dx: bool,
    ) -> Backwarded {
        let mut d: CowArray<'_, F, IxDyn> = match dout {
            Some(dout) => dout.view::<F>(),
            None => ArrayD::from_elem(IxDyn(&[]), F::one()).into(),
        };
        let runs = kept.members.len();
        let mut grads = vec![None; self.members.len()];
        for i in (0..runs).rev() {
            let (member, state) = (&self.members[i], &states[i]);
            let values: Vec<CowArray<'_, F, IxDyn>> =
                state.values.iter().map(Tensor::view::<F>).collect();
            let views: Vec<ArrayViewD<'_, F>> = values.iter().map(|v| v.view()).collect();
            if i == 0 && !need_dx {
                let out = with_spec!(&member.spec, l => run_param_grads(l, &views, kept.members[0].as_ref(), d.view()));
                if !out.is_empty() {
                    grads[0] = Some(out.into_iter().map(Tensor::from_array).collect());
                }
                // Not asked for: an empty placeholder, dropped by the caller.
                d = ArrayD::zeros(IxDyn(&[0])).into();
                break;
            }
            let out = with_spec!(&member.spec, l => run_backward(l, &views, kept.members[i].as_ref(), d.view()));
            if !out.grads.is_empty() {
                grads[i] = Some(out.grads.into_iter().map(Tensor::from_array).collect());
            }
            d = out.dx.into();
        }
        Backwarded {
            dx: Tensor::from_array(d.into_owned()).answered_as(kept.wire),
            grads,
        }
    }

    /// Parameters and buffers by name, in declaration order.
    pub fn named_values(&self, states: &[MemberState]) -> (Named, Named) {
        let (mut params, mut buffers) = (Vec::new(), Vec::new());
        for (m, s, name, slot) in self.slots() {
            let value = states[*m].values[*s].clone();
            match slot.role {
                Role::Param => params.push((name.clone(), value)),
                Role::Buffer => buffers.push((name.clone(), value)),
            }
        }
        (params, buffers)
    }

    /// The stored gradients by name (members with none are left out).
    pub fn named_grads(&self, states: &[MemberState]) -> Vec<(String, Tensor)> {
        self.named_param_grads(states.iter().map(|s| s.grads.as_ref()))
    }

    /// `grads` (one entry per member) by parameter name.
    pub fn named_param_grads<'a>(
        &self,
        grads: impl Iterator<Item = Option<&'a Vec<Tensor>>>,
    ) -> Vec<(String, Tensor)> {
        let names = self.slots();
        let mut out = Vec::new();
        for (m, grads) in grads.enumerate() {
            let Some(grads) = grads else { continue };
            let params = names
                .iter()
                .filter(|(member, _, _, slot)| *member == m && slot.role == Role::Param);
            for ((_, _, name, _), grad) in params.zip(grads) {
                out.push((name.clone(), grad.clone()));
            }
        }
        out
    }

    /// New member states with `values` (checked by [`Chain::check_values`])
    /// in place of the old, and no gradients.
    pub fn with_values(
        &self,
        states: &[MemberState],
        mut values: HashMap<String, Tensor>,
    ) -> Vec<MemberState> {
        let mut states = states.to_vec();
        let dtype = self.dtype.unwrap_or(DType::F32);
        for (m, s, name, _) in self.slots() {
            if let Some(value) = values.remove(name) {
                states[*m].values[*s] = with_float!(dtype, F => aligned::<F>(&value));
            }
        }
        for state in &mut states {
            state.grads = None;
        }
        states
    }
}

/// `t` against scores of `shape` (N, C) in `dtype`.
fn check_target(t: &Target, dtype: DType, shape: &[usize]) -> Result<(), Error> {
    let (n, c) = (shape[0], shape[1]);
    match t {
        Target::Classes(ids) => {
            if ids.len() != n {
                return Err(Error::invalid(
                    "t.shape",
                    format!("({n},): one class id per row of the ({n}, {c}) scores"),
                    format!("[{}]", ids.len()),
                    "INVALID_TARGET",
                ));
            }
            if let Some((i, id)) = ids
                .iter()
                .enumerate()
                .find(|(_, &id)| !(0..c as i64).contains(&id))
            {
                return Err(Error::invalid(
                    "t",
                    format!("class ids in [0, {c})"),
                    format!("{id} at index {i}"),
                    "INVALID_TARGET",
                ));
            }
        }
        Target::Probabilities(p) => {
            if p.dtype() != dtype || p.shape() != shape {
                return Err(Error::invalid(
                    "t",
                    format!(
                        "INT64 class ids ({n},) or probabilities {}{shape:?} (the scores' shape and dtype)",
                        dtype.proto_name()
                    ),
                    format!("{}{:?}", p.dtype().proto_name(), p.shape()),
                    "INVALID_TARGET",
                ));
            }
        }
    }
    Ok(())
}

/// An aligned copy of a client's value (the request buffer may not be).
fn aligned<F: Float>(value: &Tensor) -> Tensor {
    Tensor::from_array(value.view::<F>().into_owned())
}

type MemberForward<F> = (
    ArcArray<F, IxDyn>,
    Option<Box<dyn Any + Send + Sync>>,
    Vec<ArrayD<F>>,
);

fn run_forward<L: Layer, F: Float>(layer: &L, step: Step<'_, F>) -> MemberForward<F> {
    let out = layer.forward(step);
    let kept = out.kept.map(|k| Box::new(k) as Box<dyn Any + Send + Sync>);
    (out.y, kept, out.buffers)
}

fn run_param_grads<L: Layer, F: Float>(
    layer: &L,
    values: &[ArrayViewD<'_, F>],
    kept: &(dyn Any + Send + Sync),
    dout: ArrayViewD<'_, F>,
) -> Vec<ArrayD<F>> {
    let kept = kept
        .downcast_ref::<L::Kept<F>>()
        .expect("kept state was made by this member at this dtype");
    layer.param_grads(values, kept, dout)
}

fn run_backward<L: Layer, F: Float>(
    layer: &L,
    values: &[ArrayViewD<'_, F>],
    kept: &(dyn Any + Send + Sync),
    dout: ArrayViewD<'_, F>,
) -> super::Backwarded<F> {
    let kept = kept
        .downcast_ref::<L::Kept<F>>()
        .expect("kept state was made by this member at this dtype");
    layer.backward(values, kept, dout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::SoftmaxWithLoss;

    #[test]
    fn a_sequential_of_a_loss_alone_answers_its_input_without_t() {
        let chain = Chain::sequential(
            vec![Member {
                name: "loss".into(),
                spec: Spec::SoftmaxWithLoss(SoftmaxWithLoss),
            }],
            None,
        );
        let x = Tensor::from_array(ndarray::ArrayD::from_elem(IxDyn(&[2, 3]), 1.5f32));
        let plan = chain.plan(&x, None, false).unwrap();
        let states = [MemberState::default()];
        let out = chain.forward(&states, &x, None, &plan, false, true);
        assert_eq!(out.y, x);
        let kept = out.kept.unwrap();
        assert!(chain.check_dout(&kept, None).is_err(), "no loss ran");
        chain.check_dout(&kept, Some(&x)).unwrap();
        assert_eq!(chain.backward(&states, &kept, Some(&x)).dx, x);
    }
}
