//! A chain's Backward: `dout` checked against what the keeping Forward
//! kept, then each member's kept state runs its own Backward, in reverse
//! (and the half-precision hook of a lone member).

use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn};

use super::{Chain, ChainBackward, Kept, MemberState};
use crate::error::Error;
use crate::layers::{with_float, Float};
use crate::tensor::Tensor;

impl Chain {
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
    ) -> ChainBackward {
        if let Some(backwarded) = self.backward_on_halves(kept, dout) {
            return backwarded;
        }
        with_float!(kept.wire.compute(), F => self.backward_as::<F>(states, kept, dout, true))
    }

    /// The Backward of a lone member from a half dout as it came, when what
    /// it kept computes one ([`crate::layers::Layer::backward_halves`]: ReLU's
    /// mask).
    fn backward_on_halves(&self, kept: &Kept, dout: Option<&Tensor>) -> Option<ChainBackward> {
        if self.members.len() != 1 {
            return None;
        }
        let [member] = f32::kept(&kept.members)? else {
            return None;
        };
        let dout = dout?;
        let (wire, ds) = dout.halves()?;
        let dx = member.backward_halves(&ds)?;
        Some(ChainBackward {
            dx: Tensor::from_halves(wire, dout.shape(), dx),
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
    ) -> ChainBackward {
        let mut d: CowArray<'_, F, IxDyn> = match dout {
            Some(dout) => dout.view::<F>(),
            None => ArrayD::from_elem(IxDyn(&[]), F::one()).into(),
        };
        let kept_members = F::kept(&kept.members).expect("kept in the dtype it computed in");
        let runs = kept_members.len();
        let mut grads = vec![None; self.members.len()];
        for i in (0..runs).rev() {
            let state = &states[i];
            let values: Vec<CowArray<'_, F, IxDyn>> =
                state.values.iter().map(Tensor::view::<F>).collect();
            let views: Vec<ArrayViewD<'_, F>> = values.iter().map(|v| v.view()).collect();
            if i == 0 && !need_dx {
                let out = kept_members[0].param_grads(&views, d.view());
                if !out.is_empty() {
                    grads[0] = Some(out.into_iter().map(Tensor::from_array).collect());
                }
                // Not asked for: an empty placeholder, dropped by the caller.
                d = ArrayD::zeros(IxDyn(&[0])).into();
                break;
            }
            let out = kept_members[i].backward(&views, d.view());
            if !out.grads.is_empty() {
                grads[i] = Some(out.grads.into_iter().map(Tensor::from_array).collect());
            }
            d = out.dx.into();
        }
        ChainBackward {
            dx: Tensor::from_array(d.into_owned()).answered_as(kept.wire),
            grads,
        }
    }
}
