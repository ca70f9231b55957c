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
//!
//! Files: this one holds the chain, its slots and values; `plan.rs` checks a
//! Forward before it runs, `forward.rs` runs it, `backward.rs` checks and runs
//! Backward, `record.rs` turns kept state into plain arrays and back.

mod backward;
mod forward;
mod plan;
mod record;

pub use record::{KeptRecord, MemberParts};

use std::{collections::HashMap, fmt};

use ndarray::{ArrayD, IxDyn};

use super::rng::Rng;
use super::{init, with_float, Fill, Float, KeptMembers, Kind, Role, Slot, Spec};
use crate::dtype::{DType, Wire};
use crate::error::Error;
use crate::tensor::Tensor;

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
    /// The keeping Forward's x shape, mode and kind of target: what its plan
    /// was made from, to check kept state moved from another replica
    /// against (`record.rs`).
    x_shape: Vec<usize>,
    eval: bool,
    classes: bool,
    y_shape: Vec<usize>,
    ran_loss: bool,
    /// The kept state of each member that ran, able to run its own Backward.
    members: KeptMembers,
    bytes: u64,
}

impl Kept {
    /// Heap bytes held, as [`ForwardPlan::kept_bytes`] declared.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How the keeping Forward's x traveled, and so Backward's dout must.
    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// The keeping Forward's output shape, which dout must have.
    pub fn y_shape(&self) -> &[usize] {
        &self.y_shape
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
pub struct ChainForward {
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
pub struct ChainBackward {
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
                rng: member.spec.seed().map(Rng::from_seed),
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

/// An aligned copy of a client's value (the request buffer may not be).
fn aligned<F: Float>(value: &Tensor) -> Tensor {
    Tensor::from_array(value.view::<F>().into_owned())
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
