//! A chain's Forward, once planned (`plan.rs`): the members in order
//! (and the half-precision hook of a lone member).

use ndarray::{ArcArray, ArrayD, ArrayViewD, CowArray, Ix2, IxDyn};

use super::{Chain, ChainForward, ForwardPlan, Kept, MemberState};
use crate::dtype::Wire;
use crate::layers::layer::Halved;
use crate::layers::{with_float, with_spec, Float, Inputs, KeptBy, KeptMembers, Layer, MemberKept};
use crate::tensor::{Target, Tensor};

impl Chain {
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
    ) -> ChainForward {
        if let Some(forwarded) = self.forward_on_halves(states, x, plan, eval, keep) {
            return forwarded;
        }
        with_float!(x.dtype(), F => self.forward_as::<F>(states, x, t, plan, eval, keep))
    }

    /// A lone member on a half x, if its kind computes half elements as they
    /// came ([`Layer::forward_halves`]: ReLU, exact in any float type); None
    /// for anything else, which widens them.
    fn forward_on_halves(
        &self,
        states: &[MemberState],
        x: &Tensor,
        plan: &ForwardPlan,
        eval: bool,
        keep: bool,
    ) -> Option<ChainForward> {
        let [member] = &self.members[..] else {
            return None;
        };
        let (wire, xs) = x.halves()?;
        let (y, kept) = with_spec!(&member.spec, l => forward_halves(l, wire, &xs, keep))?;
        let kept = kept.map(|kept| Kept {
            wire,
            x_shape: x.shape().to_vec(),
            eval,
            classes: false,
            y_shape: x.shape().to_vec(),
            ran_loss: false,
            members: KeptMembers::F32(vec![kept]),
            bytes: plan.kept_bytes,
        });
        Some(ChainForward {
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
    ) -> ChainForward {
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
                Target::Classes(ids) => crate::layers::TargetView::Classes(ids.view()),
                Target::Probabilities(_) => crate::layers::TargetView::Probabilities(
                    target_values
                        .as_ref()
                        .expect("made above")
                        .view()
                        .into_dimensionality::<Ix2>()
                        .expect("validated (N, C)"),
                ),
            });
            let out = with_spec!(&member.spec, l => run_forward(l, Inputs {
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
            x_shape: x.shape().to_vec(),
            eval,
            classes: t.is_some_and(Target::is_classes),
            y_shape: y.shape().to_vec(),
            ran_loss: plan.ran_loss,
            members: F::keep(kept),
            bytes: plan.kept_bytes,
        });
        ChainForward {
            y: Tensor::from_shared(y).answered_as(x_wire),
            kept,
            updates,
            scores,
        }
    }
}

type MemberForward<F> = (
    ArcArray<F, IxDyn>,
    Option<Box<dyn MemberKept<F>>>,
    Vec<ArrayD<F>>,
);

fn run_forward<L: Layer, F: Float>(layer: &L, inputs: Inputs<'_, F>) -> MemberForward<F> {
    let out = layer.forward(inputs);
    let kept = out.kept.map(|kept| KeptBy::boxed(layer, kept));
    (out.y, kept, out.buffers)
}

fn forward_halves<L: Layer>(
    layer: &L,
    wire: Wire,
    xs: &[u16],
    keep: bool,
) -> Option<Halved<Box<dyn MemberKept<f32>>>> {
    let (y, kept) = layer.forward_halves(wire, xs, keep)?;
    Some((y, kept.map(|kept| KeptBy::boxed(layer, kept))))
}
