//! The `layerd.v1` codec: wire tensors, loss targets and dtypes become the
//! core's validated [`Tensor`]s, [`Target`]s and [`Wire`] dtypes, and back.
//! Every defect names its field (`x.dtype`, `dout.data`, `params["W"]`), what
//! was expected and what came; bytes in and out are counted in the metrics.

use std::collections::HashMap;

use ndarray::ArcArray1;

use crate::dtype::Wire;
use crate::error::Error;
use crate::metrics;
use crate::pb;
use crate::tensor::{validated_shape, Target, Tensor};

impl Tensor {
    /// Validates a wire tensor. `field` names it in errors (`"x"`, `"dout"`).
    pub fn from_proto(tensor: Option<pb::Tensor>, field: &str) -> Result<Tensor, Error> {
        let Some(tensor) = tensor else {
            return Err(Error::invalid(
                field,
                "a tensor",
                "none (field not set)",
                "MISSING_TENSOR",
            ));
        };
        let wire = Wire::from_proto(tensor.dtype, field)?;
        let (shape, len) =
            validated_shape(&tensor.shape, wire.itemsize(), wire.proto_name(), field)?;
        metrics::tensor_bytes(metrics::Direction::In, tensor.data.len());
        Tensor::from_bytes(
            wire,
            shape,
            len,
            tensor.data,
            &format!("{field}.data"),
            wire.proto_name(),
        )
    }

    pub fn into_proto(self) -> pb::Tensor {
        let data = self.wire_bytes();
        metrics::tensor_bytes(metrics::Direction::Out, data.len());
        pb::Tensor {
            dtype: self.wire().to_proto().into(),
            shape: self.shape().iter().map(|&d| d as u64).collect(),
            data,
        }
    }
}

impl Target {
    /// Validates a wire target named `field`; `None` when not set.
    pub fn from_proto(tensor: Option<pb::Tensor>, field: &str) -> Result<Option<Target>, Error> {
        let Some(tensor) = tensor else {
            return Ok(None);
        };
        if tensor.dtype != pb::DType::DtypeInt64 as i32 {
            return Tensor::from_proto(Some(tensor), field).map(|t| Some(Target::Probabilities(t)));
        }
        let itemsize = std::mem::size_of::<i64>();
        let (shape, len) = validated_shape(&tensor.shape, itemsize, "DTYPE_INT64", field)?;
        if shape.len() != 1 {
            return Err(Error::invalid(
                format!("{field}.shape"),
                "(N,): one class id per row of scores",
                format!("{shape:?}"),
                "INVALID_TARGET",
            ));
        }
        metrics::tensor_bytes(metrics::Direction::In, tensor.data.len());
        if tensor.data.len() != len * itemsize {
            return Err(Error::invalid(
                format!("{field}.data"),
                format!("{} bytes ({len} int64 class ids)", len * itemsize),
                format!("{} bytes", tensor.data.len()),
                "INVALID_TENSOR",
            ));
        }
        let ids = bytemuck::pod_collect_to_vec::<u8, i64>(&tensor.data);
        Ok(Some(Target::Classes(ArcArray1::from_vec(ids))))
    }
}

impl Wire {
    pub fn from_proto(value: i32, field: &str) -> Result<Wire, Error> {
        match pb::DType::try_from(value) {
            Ok(pb::DType::DtypeFloat32) => Ok(Wire::F32),
            Ok(pb::DType::DtypeFloat64) => Ok(Wire::F64),
            Ok(pb::DType::DtypeFloat16) => Ok(Wire::F16),
            Ok(pb::DType::DtypeBfloat16) => Ok(Wire::BF16),
            Ok(pb::DType::DtypeInt64) => Err(bad_dtype(
                field,
                "DTYPE_INT64 (3), which only a loss target t accepts".into(),
            )),
            Ok(pb::DType::DtypeUnspecified) => {
                Err(bad_dtype(field, "DTYPE_UNSPECIFIED (0)".into()))
            }
            Err(_) => Err(bad_dtype(field, format!("unknown value {value}"))),
        }
    }

    pub fn to_proto(self) -> pb::DType {
        match self {
            Wire::F32 => pb::DType::DtypeFloat32,
            Wire::F64 => pb::DType::DtypeFloat64,
            Wire::F16 => pb::DType::DtypeFloat16,
            Wire::BF16 => pb::DType::DtypeBfloat16,
        }
    }
}

fn bad_dtype(field: &str, got: String) -> Error {
    Error::invalid(
        format!("{field}.dtype"),
        "DTYPE_FLOAT32 (1), DTYPE_FLOAT64 (2), DTYPE_FLOAT16 (4) or DTYPE_BFLOAT16 (5)",
        got,
        "INVALID_TENSOR",
    )
}

/// Named tensors as a proto map.
pub fn to_proto_map(tensors: Vec<(String, Tensor)>) -> HashMap<String, pb::Tensor> {
    tensors
        .into_iter()
        .map(|(name, tensor)| (name, tensor.into_proto()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::tensor::MAX_RANK;
    use bytes::Bytes;
    use ndarray::{ArrayD, IxDyn};
    use proptest::prelude::*;

    fn wire(dtype: i32, shape: &[u64], data: Vec<u8>) -> Option<pb::Tensor> {
        Some(pb::Tensor {
            dtype,
            shape: shape.to_vec(),
            data: data.into(),
        })
    }

    fn message(result: Result<Tensor, Error>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn decodes_a_float32_matrix_in_row_major_order() {
        let values = [1.0f32, -2.0, 3.5, f32::NAN, -0.0, 7.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::from_proto(wire(1, &[2, 3], bytes), "x").unwrap();
        assert_eq!(
            (t.dtype(), t.shape(), t.len()),
            (DType::F32, &[2usize, 3][..], 6)
        );
        let a = t.view::<f32>();
        assert_eq!(a[[1, 0]].to_bits(), f32::NAN.to_bits());
        assert_eq!(a[[0, 2]], 3.5);
        assert_eq!(
            t.clone().into_proto(),
            wire(1, &[2, 3], t.le_bytes().to_vec()).unwrap()
        );
    }

    #[test]
    fn scalars_and_empty_tensors() {
        let scalar = Tensor::from_proto(wire(2, &[], 2.5f64.to_le_bytes().to_vec()), "x").unwrap();
        assert_eq!((scalar.len(), scalar.view::<f64>()[IxDyn(&[])]), (1, 2.5));
        let empty = Tensor::from_proto(wire(2, &[4, 0, 9], vec![]), "x").unwrap();
        assert_eq!(
            (empty.len(), empty.view::<f64>().shape()),
            (0, &[4, 0, 9][..])
        );
    }

    /// A half tensor of `bits` (little-endian u16 elements), starting at an
    /// odd address when `unaligned`.
    fn halves(dtype: i32, bits: &[u16], unaligned: bool) -> Option<pb::Tensor> {
        let mut raw = vec![0u8; usize::from(unaligned)];
        raw.extend(bits.iter().flat_map(|b| b.to_le_bytes()));
        let data = Bytes::from(raw).slice(usize::from(unaligned)..);
        Some(pb::Tensor {
            dtype,
            shape: vec![bits.len() as u64],
            data,
        })
    }

    fn answered_bits(t: Tensor) -> Vec<u16> {
        let wire = t.into_proto();
        wire.data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn every_float16_and_bfloat16_value_widens_exactly_and_comes_back_as_itself() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for (dtype, wire, nan) in [
            (
                4,
                Wire::F16,
                (|b| b & 0x7c00 == 0x7c00 && b & 0x03ff != 0) as fn(u16) -> bool,
            ),
            (5, Wire::BF16, |b| b & 0x7f80 == 0x7f80 && b & 0x007f != 0),
        ] {
            for unaligned in [false, true] {
                let t = Tensor::from_proto(halves(dtype, &all, unaligned), "x").unwrap();
                assert_eq!((t.dtype(), t.wire(), t.len()), (DType::F32, wire, 65536));
                let back = answered_bits(t.clone());
                let widened = t.view::<f32>();
                for (i, &b) in all.iter().enumerate() {
                    let want = match wire {
                        Wire::F16 => ::half::f16::from_bits(b).to_f32(),
                        _ => ::half::bf16::from_bits(b).to_f32(),
                    };
                    if nan(b) {
                        assert!(widened[i].is_nan() && nan(back[i]), "{wire:?} {b:#06x}");
                    } else {
                        assert_eq!(widened[i].to_bits(), want.to_bits(), "{wire:?} {b:#06x}");
                        assert_eq!(back[i], b, "{wire:?} {b:#06x}");
                    }
                }
            }
        }
    }

    #[test]
    fn answers_round_to_the_nearest_half_value_ties_to_even() {
        let answer = |values: &[f32], wire| {
            answered_bits(
                Tensor::from_array(
                    ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).unwrap(),
                )
                .answered_as(wire),
            )
        };
        let ulp16 = 2f32.powi(-10);
        // Halfway between 1 and 1 + ulp: to 1 (even); between 1 + ulp and 1 + 2 ulp: up (even).
        assert_eq!(
            answer(
                &[
                    1.0 + ulp16 / 2.0,
                    1.0 + 1.5 * ulp16,
                    65519.0,
                    65520.0,
                    -1e-8
                ],
                Wire::F16
            ),
            [0x3c00, 0x3c02, 0x7bff, 0x7c00, 0x8000]
        );
        let ulp_bf = 2f32.powi(-7);
        assert_eq!(
            answer(
                &[
                    1.0 + ulp_bf / 2.0,
                    1.0 + 1.5 * ulp_bf,
                    f32::MAX,
                    f32::NEG_INFINITY
                ],
                Wire::BF16
            ),
            [0x3f80, 0x3f82, 0x7f80, 0xff80]
        );
        // A float64 answer stays float64: only a half type of its own dtype applies.
        let wide =
            Tensor::from_array(ArrayD::from_elem(IxDyn(&[2]), 0.1f64)).answered_as(Wire::F16);
        assert_eq!(wide.into_proto().dtype, pb::DType::DtypeFloat64 as i32);
    }

    #[test]
    fn a_half_tensor_is_checked_at_two_bytes_per_element() {
        let short = message(Tensor::from_proto(wire(4, &[3], vec![0; 5]), "x"));
        assert!(
            short.contains("x.data")
                && short.contains("6 bytes")
                && short.contains("DTYPE_FLOAT16")
                && short.contains("5 bytes"),
            "{short}"
        );
        let bf = Tensor::from_proto(wire(5, &[2, 0], vec![]), "x").unwrap();
        assert_eq!((bf.wire(), bf.shape()), (Wire::BF16, &[2usize, 0][..]));
        assert_eq!(bf.into_proto().dtype, pb::DType::DtypeBfloat16 as i32);
    }

    #[test]
    fn unaligned_buffers_are_copied_not_rejected() {
        let mut raw = vec![0u8; 1 + 3 * 8];
        for (i, v) in [1.5f64, -2.25, 1e300].iter().enumerate() {
            raw[1 + i * 8..1 + (i + 1) * 8].copy_from_slice(&v.to_le_bytes());
        }
        // Slicing off the first byte makes the buffer start off 8-byte alignment
        // (Vec<u8> allocations are at least 8-aligned on the supported targets).
        let data = Bytes::from(raw).slice(1..);
        let t = Tensor::from_proto(
            Some(pb::Tensor {
                dtype: 2,
                shape: vec![3],
                data,
            }),
            "x",
        )
        .unwrap();
        let view = t.view::<f64>();
        assert!(view.is_owned(), "an unaligned buffer is copied");
        assert_eq!(view.as_slice().unwrap(), &[1.5, -2.25, 1e300]);
    }

    #[test]
    fn every_defect_names_the_field_the_expectation_and_what_came() {
        assert!(message(Tensor::from_proto(None, "dout")).contains("dout"));
        let unspecified = message(Tensor::from_proto(wire(0, &[1], vec![0; 4]), "x"));
        assert!(
            unspecified.contains("x.dtype") && unspecified.contains("DTYPE_UNSPECIFIED"),
            "{unspecified}"
        );
        let unknown = message(Tensor::from_proto(wire(7, &[1], vec![0; 4]), "x"));
        assert!(unknown.contains("unknown value 7"), "{unknown}");
        let rank = message(Tensor::from_proto(wire(1, &[1; 9], vec![0; 4]), "x"));
        assert!(
            rank.contains("x.shape") && rank.contains("9 dimensions"),
            "{rank}"
        );
        let overflow = message(Tensor::from_proto(
            wire(1, &[1 << 32, 1 << 32], vec![]),
            "x",
        ));
        assert!(overflow.contains("overflows"), "{overflow}");
        let short = message(Tensor::from_proto(wire(1, &[2, 2], vec![0; 15]), "x"));
        assert!(
            short.contains("x.data")
                && short.contains("16 bytes")
                && short.contains("got 15 bytes"),
            "{short}"
        );
    }

    #[test]
    fn an_empty_dimension_does_not_hide_an_overflowing_one() {
        // ndarray (and numpy) refuse shapes whose non-zero dimensions overflow.
        assert!(Tensor::from_proto(wire(1, &[u64::MAX, 0], vec![]), "x").is_err());
        assert!(Tensor::from_proto(wire(1, &[1 << 20, 0, 1 << 20], vec![]), "x").is_ok());
    }

    #[test]
    fn arrays_round_trip_without_a_copy_of_standard_layouts() {
        let a = ndarray::arr2(&[[1.0f64, 2.0], [3.0, 4.0]]).into_dyn();
        let t = Tensor::from_array(a.clone());
        assert_eq!(t.view::<f64>(), a.view());
        // A transposed array is written out in its logical (row-major) order.
        let t = Tensor::from_array(a.t().to_owned().reversed_axes().reversed_axes());
        assert_eq!(t.view::<f64>(), a.t());
        let t = Tensor::from_array(a.clone().reversed_axes());
        assert_eq!(t.view::<f64>(), a.t());
    }

    proptest! {
        /// Arbitrary dtype, shape and byte length never panic, and are accepted
        /// exactly when the dtype is a float one, the rank ≤ 8 and the length
        /// matches (half types widened to float32).
        #[test]
        fn decoding_never_panics_and_accepts_exactly_the_consistent(
            dtype in -2i32..7,
            shape in prop::collection::vec(
                prop_oneof![0u64..5, Just(u64::MAX), Just(1u64 << 31), any::<u64>()], 0..11),
            extra in -9i64..9,
            use_exact in any::<bool>(),
        ) {
            let itemsize = match dtype { 1 => Some(4u128), 2 => Some(8u128), 4 | 5 => Some(2u128), _ => None };
            let nonzero: u128 = shape.iter().filter(|&&d| d != 0).fold(1u128, |a, &d| a.saturating_mul(d as u128));
            let elems: u128 = if shape.contains(&0) { 0 } else { nonzero };
            // Only allocate small buffers: a huge declared size gets a small one.
            let exact = itemsize.map(|s| elems.saturating_mul(s)).filter(|&b| b <= 4096);
            let len = match (use_exact, exact) {
                (true, Some(b)) => b as i64,
                _ => (elems.min(64) as i64 * 4 + extra).max(0),
            };
            let result = Tensor::from_proto(wire(dtype, &shape, vec![0u8; len as usize]), "x");
            let consistent = itemsize.is_some_and(|s| {
                shape.len() <= MAX_RANK
                    && nonzero.saturating_mul(s) <= isize::MAX as u128
                    && elems.saturating_mul(s) == len as u128
            });
            prop_assert_eq!(result.is_ok(), consistent, "{:?}", result);
            if let Ok(t) = result {
                prop_assert_eq!(t.len() as u128, elems);
                match t.dtype() {
                    DType::F32 => prop_assert_eq!(t.view::<f32>().len(), t.len()),
                    DType::F64 => prop_assert_eq!(t.view::<f64>().len(), t.len()),
                }
            }
        }
    }
}
