//! A chain's plan: every check a Forward needs (dtype, each member's input
//! shape, the target) and what it will keep and build, before anything is
//! computed.

use super::{Chain, ForwardPlan, Member};
use crate::dtype::DType;
use crate::error::Error;
use crate::layers::{with_spec, Layer, Plan};
use crate::tensor::{Target, Tensor};

impl Chain {
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
            let member_plan = Plan {
                x: &shape,
                itemsize,
                eval,
                classes: t.is_some_and(Target::is_classes),
            };
            let kept = with_spec!(&member.spec, l => l.kept_bytes(member_plan));
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
