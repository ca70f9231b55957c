//! A chain's kept state as plain arrays ([`KeptRecord`]) and back, to move
//! what a Forward kept to another replica with its session.
//!
//! Loading replays the keeping Forward's plan from the record's x shape, mode
//! and target kind — each member's input shape checked by the kind, as
//! [`Chain::plan`] checks it — and has each member that ran build its state
//! from its parts ([`crate::layers::Layer::load_kept`], which checks them).
//! So a record that loads is one this chain could have kept: its Backward
//! runs as it would have on the replica that kept it, and its bytes are the
//! ones a Forward would have declared.

use super::{Chain, Kept};
use crate::dtype::{DType, Wire};
use crate::layers::{with_spec, Float, KeptBy, KeptMembers, Layer, MemberKept, Part, Parts, Plan};

/// Each member's parts, in the compute type the members kept them in.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberParts {
    F32(Vec<Vec<Part<f32>>>),
    F64(Vec<Vec<Part<f64>>>),
}

impl MemberParts {
    pub fn dtype(&self) -> DType {
        match self {
            MemberParts::F32(_) => DType::F32,
            MemberParts::F64(_) => DType::F64,
        }
    }

    /// Parts per member, in member order.
    pub fn counts(&self) -> Vec<usize> {
        match self {
            MemberParts::F32(m) => m.iter().map(Vec::len).collect(),
            MemberParts::F64(m) => m.iter().map(Vec::len).collect(),
        }
    }
}

/// What a keeping Forward kept, as plain data.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptRecord {
    pub wire: Wire,
    pub x_shape: Vec<usize>,
    pub eval: bool,
    /// Whether the loss's target was class ids (else probabilities).
    pub classes: bool,
    pub ran_loss: bool,
    pub members: MemberParts,
}

impl Chain {
    /// `kept` as a record (copies of its arrays).
    pub fn save_kept(&self, kept: &Kept) -> KeptRecord {
        fn save<F: Float>(members: &[Box<dyn MemberKept<F>>]) -> Vec<Vec<Part<F>>> {
            members.iter().map(|m| m.save()).collect()
        }
        KeptRecord {
            wire: kept.wire,
            x_shape: kept.x_shape.clone(),
            eval: kept.eval,
            classes: kept.classes,
            ran_loss: kept.ran_loss,
            members: match &kept.members {
                KeptMembers::F32(m) => MemberParts::F32(save(m)),
                KeptMembers::F64(m) => MemberParts::F64(save(m)),
            },
        }
    }

    /// Kept state from `record`, checked against this chain (see the
    /// module's doc); the error says what does not fit.
    pub fn load_kept(&self, record: KeptRecord) -> Result<Kept, String> {
        let compute = record.wire.compute();
        if record.members.dtype() != compute {
            return Err(format!(
                "members computed in {}, but x traveled as {} (computed in {})",
                record.members.dtype().proto_name(),
                record.wire.proto_name(),
                compute.proto_name()
            ));
        }
        if let Some(dtype) = self.dtype {
            if dtype != compute {
                return Err(format!(
                    "kept state computed in {}, but the layer's parameters are {}",
                    compute.proto_name(),
                    dtype.proto_name()
                ));
            }
        }
        let elements = record
            .x_shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= isize::MAX as usize / 16);
        if elements.is_none() {
            return Err(format!("x shape {:?}: too many elements", record.x_shape));
        }
        let KeptRecord {
            wire,
            x_shape,
            eval,
            classes,
            ran_loss,
            members,
        } = record;
        let itemsize = compute.itemsize();
        let (members, y_shape, bytes) = match members {
            MemberParts::F32(parts) => {
                let (m, y, b) =
                    self.load_members::<f32>(&x_shape, itemsize, eval, classes, ran_loss, parts)?;
                (KeptMembers::F32(m), y, b)
            }
            MemberParts::F64(parts) => {
                let (m, y, b) =
                    self.load_members::<f64>(&x_shape, itemsize, eval, classes, ran_loss, parts)?;
                (KeptMembers::F64(m), y, b)
            }
        };
        Ok(Kept {
            wire,
            x_shape,
            eval,
            classes,
            y_shape,
            ran_loss,
            members,
            bytes,
        })
    }

    /// The members' kept state, the last output's shape and the bytes kept.
    fn load_members<F: Float>(
        &self,
        x_shape: &[usize],
        itemsize: usize,
        eval: bool,
        classes: bool,
        ran_loss: bool,
        parts: Vec<Vec<Part<F>>>,
    ) -> Result<LoadedMembers<F>, String> {
        let runs = self
            .members
            .iter()
            .take_while(|m| ran_loss || !m.spec.is_loss())
            .count();
        let ends_in_loss = self.members.last().is_some_and(|m| m.spec.is_loss());
        if ran_loss && !ends_in_loss {
            return Err(format!("a loss ran, but a {} layer has none", self.kind()));
        }
        if !ran_loss && ends_in_loss && !self.sequential {
            return Err("a loss layer kept state without its target".into());
        }
        if parts.len() != runs {
            return Err(format!(
                "expected the kept state of {runs} members, got {}",
                parts.len()
            ));
        }
        let mut shape = x_shape.to_vec();
        let (mut kept, mut bytes) = (Vec::with_capacity(runs), 0u64);
        for (member, parts) in self.members.iter().zip(parts) {
            let at = |e: String| format!("member {:?} ({}): {e}", member.name, member.spec.kind());
            let out =
                with_spec!(&member.spec, l => l.output_shape(&shape)).map_err(|expected| {
                    at(format!("expected an input of {expected}, got {shape:?}"))
                })?;
            let plan = Plan {
                x: &shape,
                itemsize,
                eval,
                classes,
            };
            let mut parts = Parts::new(parts);
            let state =
                with_spec!(&member.spec, l => load::<_, F>(l, plan, &mut parts)).map_err(at)?;
            parts.finish().map_err(at)?;
            bytes += with_spec!(&member.spec, l => l.kept_bytes(plan)) as u64;
            kept.push(state);
            shape = out;
        }
        Ok((kept, shape, bytes))
    }
}

type LoadedMembers<F> = (Vec<Box<dyn MemberKept<F>>>, Vec<usize>, u64);

fn load<L: Layer, F: Float>(
    layer: &L,
    plan: Plan<'_>,
    parts: &mut Parts<F>,
) -> Result<Box<dyn MemberKept<F>>, String> {
    Ok(KeptBy::boxed(layer, layer.load_kept(plan, parts)?))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ndarray::{ArrayD, IxDyn};
    use serde_json::json;

    use super::*;
    use crate::layers::testing::filled;
    use crate::layers::with_float;
    use crate::spec::{new_layer, Config, LayerRequest};
    use crate::tensor::{Target, Tensor};

    fn chain(kind: &str, config: serde_json::Value, dtype: DType) -> Chain {
        let config: Option<Config> =
            (!config.is_null()).then(|| serde_json::from_value(config).unwrap());
        new_layer(LayerRequest {
            kind: kind.into(),
            dtype: Some(dtype),
            config,
            params: HashMap::new(),
        })
        .unwrap()
        .chain
    }

    fn convnet(dtype: DType) -> Chain {
        let member = |name: &str, kind: &str, config: serde_json::Value| json!({"name": name, "kind": kind, "config": config});
        let layers = json!([
            member(
                "conv",
                "convolution",
                json!({"convolution": {"in_channels": 1, "out_channels": 2,
                "kernel_h": 3, "kernel_w": 3, "stride": 1, "pad": 1, "init": null}})
            ),
            member(
                "bn",
                "batch_norm",
                json!({"batch_norm": {"num_features": 2, "momentum": null,
                "epsilon": null}})
            ),
            member("relu", "relu", json!(null)),
            member(
                "pool",
                "pooling",
                json!({"pooling": {"pool_h": 2, "pool_w": 2, "stride": 2, "pad": 1}})
            ),
            member(
                "drop",
                "dropout",
                json!({"dropout": {"ratio": 0.3, "seed": 7}})
            ),
            member("sig", "sigmoid", json!(null)),
            member("id", "identity", json!(null)),
            member(
                "fc",
                "affine",
                json!({"affine": {"in_features": 18, "out_features": 3, "init": null}})
            ),
            member("loss", "softmax_with_loss", json!(null)),
        ]);
        chain(
            "sequential",
            json!({"sequential": {"layers": layers}}),
            dtype,
        )
    }

    fn x(shape: &[usize], dtype: DType) -> Tensor {
        let values = filled(IxDyn(shape), 3);
        match dtype {
            DType::F32 => Tensor::from_array(values.mapv(|v| v as f32)),
            DType::F64 => Tensor::from_array(values),
        }
    }

    /// Backward from the kept state and from the same state saved and
    /// loaded: bit for bit the same dx and gradients, and the same bytes.
    fn moves_whole(chain: &Chain, x: &Tensor, t: Option<&Target>, eval: bool) -> KeptRecord {
        let states = chain.initial_state(HashMap::new());
        let plan = chain.plan(x, t, eval).unwrap();
        let kept = chain
            .forward(&states, x, t, &plan, eval, true)
            .kept
            .unwrap();
        let record = chain.save_kept(&kept);
        let moved = chain.load_kept(record.clone()).unwrap();
        assert_eq!(moved.bytes(), kept.bytes());
        let dout = (!kept.ran_loss).then(|| {
            let ones = ArrayD::from_elem(IxDyn(&kept.y_shape), 0.5);
            with_float!(kept.wire.compute(), F => Tensor::from_array(ones.mapv(|v: f64| <F as num_traits::NumCast>::from(v).expect("0.5 fits"))))
        });
        let dout = dout.map(|d| {
            if x.wire().is_half() {
                d.answered_as(x.wire())
            } else {
                d
            }
        });
        let (a, b) = (
            chain.backward(&states, &kept, dout.as_ref()),
            chain.backward(&states, &moved, dout.as_ref()),
        );
        assert_eq!(a.dx, b.dx);
        assert_eq!(a.grads, b.grads);
        record
    }

    #[test]
    fn every_kind_backward_runs_the_same_from_moved_state() {
        let classes = Target::Classes(ndarray::arr1(&[0, 2]).into_shared());
        for dtype in [DType::F32, DType::F64] {
            let net = convnet(dtype);
            let x = x(&[2, 1, 5, 5], dtype);
            for eval in [false, true] {
                moves_whole(&net, &x, Some(&classes), eval);
            }
            moves_whole(&net, &x, None, false); // stops before the loss: scores
            let probabilities = Target::Probabilities(match dtype {
                DType::F32 => Tensor::from_array(ArrayD::from_elem(IxDyn(&[2, 3]), 1.0f32 / 3.0)),
                DType::F64 => Tensor::from_array(ArrayD::from_elem(IxDyn(&[2, 3]), 1.0f64 / 3.0)),
            });
            moves_whole(&net, &x, Some(&probabilities), false);
        }
        let relu = chain("relu", json!(null), DType::F32);
        let half = x(&[70], DType::F32).answered_as(Wire::F16);
        let record = moves_whole(&relu, &half, None, false);
        assert_eq!(record.wire, Wire::F16);
    }

    #[test]
    fn a_record_that_does_not_fit_is_an_error_naming_what() {
        let net = convnet(DType::F32);
        let classes = Target::Classes(ndarray::arr1(&[0, 2]).into_shared());
        let good = moves_whole(&net, &x(&[2, 1, 5, 5], DType::F32), Some(&classes), false);
        let with = |change: &dyn Fn(&mut KeptRecord)| {
            let mut record = good.clone();
            change(&mut record);
            net.load_kept(record).expect_err("refused")
        };
        fn parts(r: &mut KeptRecord) -> &mut Vec<Vec<Part<f32>>> {
            match &mut r.members {
                MemberParts::F32(m) => m,
                MemberParts::F64(_) => unreachable!("a float32 network"),
            }
        }
        let cases: Vec<(String, &str)> = vec![
            (
                with(&|r| r.x_shape = vec![2, 1, 6, 5]),
                "expected floats [2, 1, 6, 5]",
            ),
            (
                with(&|r| r.x_shape = vec![2, 3, 5, 5]),
                "member \"conv\" (convolution): expected an input",
            ),
            (
                with(&|r| r.x_shape = vec![usize::MAX, 2]),
                "too many elements",
            ),
            (
                with(&|r| r.wire = Wire::F64),
                "members computed in DTYPE_FLOAT32",
            ),
            (
                with(&|r| drop(parts(r).pop())),
                "expected the kept state of 9 members, got 8",
            ),
            (
                with(&|r| parts(r)[3].push(Part::Bits(vec![0]))),
                "member \"pool\" (pooling): expected 1 parts, got 2",
            ),
            (
                with(&|r| {
                    parts(r)[3][0] = Part::Positions(ArrayD::from_elem(IxDyn(&[2, 2, 3, 3]), 4))
                }),
                "winners): expected positions [2, 2, 3, 3] in [0, 4), got 4 at index 0",
            ),
            (
                with(&|r| parts(r)[8][1] = Part::Classes(ndarray::arr1(&[0, 3]))),
                "got 3 at index 1",
            ),
            (
                with(&|r| parts(r)[2][0] = Part::Bits(vec![])),
                "member \"relu\" (relu): part 0 (mask)",
            ),
            (
                with(&|r| r.ran_loss = false),
                "expected the kept state of 8 members, got 9",
            ),
        ];
        for (error, words) in cases {
            assert!(error.contains(words), "{error:?} lacks {words:?}");
        }
        let f64_net = convnet(DType::F64);
        let error = f64_net.load_kept(good.clone()).unwrap_err();
        assert!(
            error.contains("the layer's parameters are DTYPE_FLOAT64"),
            "{error}"
        );
    }
}
