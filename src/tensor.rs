//! The one place where wire tensors (`pb::Tensor`) become arrays and back.
//!
//! A [`Tensor`] is a validated dtype, shape and little-endian byte buffer. The
//! buffer is the `Bytes` prost decoded from the request, not a copy; it is
//! viewed as `f32`/`f64` in place when aligned, and copied once when not.
//! Results are wrapped into `Bytes` without a copy ([`Tensor::from_array`]).
//!
//! Half precision (float16, bfloat16) exists only on the wire: such a tensor
//! keeps its received 16-bit elements, is widened to float32 when viewed
//! (`view::<f32>`), and remembers its [`Wire`] dtype, which answers computed
//! from it take ([`Tensor::answered_as`]) and are rounded to (to nearest,
//! ties to even) when encoded. Everything between computes in float32 —
//! except ReLU, exact in any float type, which works on the 16-bit values
//! directly ([`Tensor::halves`], [`Tensor::from_halves`]).
//!
//! Validation order matters for safety: the byte length implied by the shape
//! is computed with overflow checks and compared with the bytes actually
//! received before anything is allocated from the declared shape.

use std::borrow::Cow;

use bytes::Bytes;
use ndarray::{ArcArray, ArcArray1, ArrayD, ArrayViewD, CowArray, IxDyn};

use crate::dtype::{DType, Element, Wire};
use crate::error::Error;
use crate::metrics;
use crate::pb::{self, inference};

#[cfg(target_endian = "big")]
compile_error!(
    "layerd reads tensor bytes as little-endian in place: big-endian hosts are not supported"
);

/// The most dimensions a tensor may have.
pub const MAX_RANK: usize = 8;

/// A validated tensor: `data` holds exactly `len() * stored.itemsize()`
/// bytes of `stored`, a compute dtype or a half type computed as float32;
/// `wire` is how it travels out, with the same compute dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    stored: Wire,
    wire: Wire,
    shape: Vec<usize>,
    len: usize,
    data: Bytes,
}

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
        Tensor::with_data(
            wire,
            shape,
            len,
            tensor.data,
            &format!("{field}.data"),
            wire.proto_name(),
        )
    }

    /// Validates one input of a KServe `ModelInferRequest`, named `field`
    /// (`inputs[0]`) in errors. Its elements are `raw` (its entry of
    /// `raw_input_contents`, named `raw_field`) when the request uses raw
    /// contents, else the input's typed `contents`.
    pub fn from_kserve(
        input: inference::model_infer_request::InferInputTensor,
        raw: Option<Bytes>,
        field: &str,
        raw_field: &str,
    ) -> Result<Tensor, Error> {
        if let Some(raw) = raw {
            let (wire, shape, len) = kserve_raw_layout(&input, raw.len(), field, raw_field)?;
            return Tensor::with_data(wire, shape, len, raw, raw_field, wire.kserve_name());
        }
        let (wire, shape, len) = kserve_layout(&input, field)?;
        let contents = input.contents.unwrap_or_default();
        let typed = typed_lengths(&contents);
        let contents_field = format!("{field}.contents");
        let wanted = match wire {
            Wire::F32 => "fp32_contents",
            Wire::F64 => "fp64_contents",
            // KServe has no typed contents for half types.
            Wire::F16 | Wire::BF16 => {
                return Err(Error::invalid(
                    raw_field,
                    format!(
                        "the elements as raw bytes: datatype {} has no typed contents",
                        wire.kserve_name()
                    ),
                    "none (the request has no raw_input_contents)",
                    "INVALID_TENSOR",
                ))
            }
        };
        if let Some((list, _)) = typed.iter().find(|(l, n)| *n > 0 && *l != wanted) {
            return Err(Error::invalid(
                format!("{contents_field}.{list}"),
                format!("elements in {wanted} for datatype {}", wire.kserve_name()),
                format!("elements in {list}"),
                "INVALID_TENSOR",
            ));
        }
        let got = typed
            .iter()
            .find(|(l, _)| *l == wanted)
            .map_or(0, |(_, n)| *n);
        if got != len {
            return Err(Error::invalid(
                format!("{contents_field}.{wanted}"),
                format!("{len} elements (shape {shape:?})"),
                format!("{got} elements"),
                "INVALID_TENSOR",
            ));
        }
        metrics::tensor_bytes(metrics::Direction::In, len * wire.itemsize());
        let dim = IxDyn(&shape);
        let array_error = |e: ndarray::ShapeError| Error::Internal(format!("typed contents: {e}"));
        Ok(match wire.compute() {
            DType::F32 => Tensor::from_shared(
                ArcArray::from_shape_vec(dim, contents.fp32_contents).map_err(array_error)?,
            ),
            DType::F64 => Tensor::from_shared(
                ArcArray::from_shape_vec(dim, contents.fp64_contents).map_err(array_error)?,
            ),
        })
    }

    /// The tensor as KServe output `name`: its metadata, and its bytes for
    /// `raw_output_contents` (not copied).
    pub fn into_kserve(
        self,
        name: &str,
    ) -> (inference::model_infer_response::InferOutputTensor, Bytes) {
        let data = self.wire_bytes();
        metrics::tensor_bytes(metrics::Direction::Out, data.len());
        let output = inference::model_infer_response::InferOutputTensor {
            name: name.to_string(),
            datatype: self.wire.kserve_name().to_string(),
            shape: self.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        (output, data)
    }

    /// A validated tensor from a shape and `data` (in `wire`'s dtype) whose
    /// byte length is checked against it; `data_field` names `data` in errors.
    /// Half types are kept as they came (widened when viewed).
    fn with_data(
        wire: Wire,
        shape: Vec<usize>,
        len: usize,
        data: Bytes,
        data_field: &str,
        dtype_name: &str,
    ) -> Result<Tensor, Error> {
        metrics::tensor_bytes(metrics::Direction::In, data.len());
        check_byte_len(wire, &shape, len, data.len(), data_field, dtype_name)?;
        Ok(Tensor {
            stored: wire,
            wire,
            shape,
            len,
            data,
        })
    }

    /// This tensor with its elements stored as its compute dtype (half ones
    /// widened once), for values kept and viewed many times: parameters.
    pub fn into_computed(self) -> Tensor {
        if !self.stored.is_half() {
            return self;
        }
        let wire = self.wire;
        Tensor::from_array(self.view::<f32>().into_owned()).answered_as(wire)
    }

    /// The 16-bit elements and their half type, when it is stored as one.
    pub fn halves(&self) -> Option<(Wire, Cow<'_, [u16]>)> {
        self.stored
            .is_half()
            .then(|| (self.stored, elements(&self.data)))
    }

    /// A float32 tensor of `shape` stored (and answered) as half type `wire`.
    pub fn from_halves(wire: Wire, shape: &[usize], values: Vec<u16>) -> Tensor {
        debug_assert!(wire.is_half() && values.len() == shape.iter().product::<usize>());
        Tensor {
            stored: wire,
            wire,
            shape: shape.to_vec(),
            len: values.len(),
            data: Bytes::from_owner(half::Halves(values)),
        }
    }

    /// This tensor, answered as `wire` (a request's dtype): encoded rounded
    /// to it when it is a half type of this tensor's dtype.
    pub fn answered_as(mut self, wire: Wire) -> Tensor {
        if wire.compute() == self.dtype() {
            self.wire = wire;
        }
        self
    }

    /// How it travels.
    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// Its elements' bytes as they go on the wire: rounded to `wire` if that
    /// is a half type it is not stored as.
    fn wire_bytes(&self) -> Bytes {
        if self.wire == self.stored {
            self.data.clone()
        } else if self.wire.is_half() {
            half::narrow(self.wire, &self.view::<f32>())
        } else {
            Bytes::copy_from_slice(&self.le_bytes())
        }
    }

    /// Wraps a computed array; no copy when it is in standard layout.
    pub fn from_array<F: Element>(array: ArrayD<F>) -> Tensor {
        Tensor::from_shared(array.into_shared())
    }

    /// Wraps a shared array (one also kept for Backward, say) without copying
    /// it when it is in standard layout: the bytes hold a reference to it.
    pub fn from_shared<F: Element>(array: ArcArray<F, IxDyn>) -> Tensor {
        let array = if array.is_standard_layout() {
            array
        } else {
            array.as_standard_layout().into_owned().into_shared()
        };
        Tensor {
            stored: F::DTYPE.wire(),
            wire: F::DTYPE.wire(),
            shape: array.shape().to_vec(),
            len: array.len(),
            data: Bytes::from_owner(PodBytes(array)),
        }
    }

    pub fn into_proto(self) -> pb::Tensor {
        let data = self.wire_bytes();
        metrics::tensor_bytes(metrics::Direction::Out, data.len());
        pb::Tensor {
            dtype: self.wire.to_proto().into(),
            shape: self.shape.iter().map(|&d| d as u64).collect(),
            data,
        }
    }

    /// The elements' bytes in its compute dtype: row-major, little-endian,
    /// packed (borrowed unless stored as a half type).
    pub fn le_bytes(&self) -> Cow<'_, [u8]> {
        if self.stored.is_half() {
            let wide = half::widen(self.stored, &self.data);
            return bytemuck::cast_slice::<f32, u8>(&wide).to_vec().into();
        }
        (&self.data[..]).into()
    }

    /// The dtype its elements are computed in.
    pub fn dtype(&self) -> DType {
        self.stored.compute()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (1 for a scalar, 0 when any dimension is 0).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements as an array of `F`: borrowed when the buffer is aligned
    /// for `F`, else copied once into an aligned buffer.
    ///
    /// # Panics
    /// If `F` is not this tensor's dtype (a caller bug, not an input error).
    pub fn view<F: Element>(&self) -> CowArray<'_, F, IxDyn> {
        assert_eq!(F::DTYPE, self.dtype(), "viewed a tensor as the wrong dtype");
        let dim = IxDyn(&self.shape);
        if self.stored.is_half() {
            let wide = half::widen(self.stored, &self.data);
            // F is f32 (checked above: half types compute as float32).
            let wide: Vec<F> = bytemuck::allocation::cast_vec(wide);
            return ArrayD::from_shape_vec(dim, wide)
                .expect("length was validated against the shape")
                .into();
        }
        match elements::<F>(&self.data) {
            Cow::Borrowed(values) => ArrayViewD::from_shape(dim, values)
                .expect("length was validated against the shape")
                .into(),
            Cow::Owned(values) => ArrayD::from_shape_vec(dim, values)
                .expect("length was validated against the shape")
                .into(),
        }
    }
}

/// A validated loss target (`ForwardRequest.t`): int64 class ids, or
/// probabilities in a float dtype. Checked against the scores (shape, dtype,
/// id range) by the layer chain, which knows them.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Classes(ArcArray1<i64>),
    Probabilities(Tensor),
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

    /// Whether the target is class ids.
    pub fn is_classes(&self) -> bool {
        matches!(self, Target::Classes(_))
    }
}

/// The element count of each typed list of KServe contents, by field name.
/// The first of a KServe input's typed contents lists that holds elements.
pub fn first_typed_list(
    input: &inference::model_infer_request::InferInputTensor,
) -> Option<&'static str> {
    let contents = input.contents.as_ref()?;
    typed_lengths(contents)
        .into_iter()
        .find_map(|(list, n)| (n > 0).then_some(list))
}

fn typed_lengths(contents: &inference::InferTensorContents) -> [(&'static str, usize); 8] {
    [
        ("bool_contents", contents.bool_contents.len()),
        ("int_contents", contents.int_contents.len()),
        ("int64_contents", contents.int64_contents.len()),
        ("uint_contents", contents.uint_contents.len()),
        ("uint64_contents", contents.uint64_contents.len()),
        ("fp32_contents", contents.fp32_contents.len()),
        ("fp64_contents", contents.fp64_contents.len()),
        ("bytes_contents", contents.bytes_contents.len()),
    ]
}

/// Checks that `got` bytes (of `data_field`) hold the `len` elements of `shape` in
/// `wire`'s dtype, named `dtype_name` in the error.
fn check_byte_len(
    wire: Wire,
    shape: &[usize],
    len: usize,
    got: usize,
    data_field: &str,
    dtype_name: &str,
) -> Result<(), Error> {
    let want = len * wire.itemsize();
    if got != want {
        return Err(Error::invalid(
            data_field,
            format!(
                "{want} bytes ({len} elements of shape {shape:?} × {} bytes for {dtype_name})",
                wire.itemsize(),
            ),
            format!("{got} bytes"),
            "INVALID_TENSOR",
        ));
    }
    Ok(())
}

/// Checks a KServe input whose elements are `raw_len` raw bytes (its entry of
/// `raw_input_contents`, named `raw_field`), as [`Tensor::from_kserve`] does:
/// its layout, no typed contents beside the raw ones, and the byte length.
/// Returns its datatype, shape and element count.
pub fn kserve_raw_layout(
    input: &inference::model_infer_request::InferInputTensor,
    raw_len: usize,
    field: &str,
    raw_field: &str,
) -> Result<(Wire, Vec<usize>, usize), Error> {
    let (wire, shape, len) = kserve_layout(input, field)?;
    if let Some(contents) = &input.contents {
        if let Some((list, _)) = typed_lengths(contents).iter().find(|(_, n)| *n > 0) {
            return Err(Error::invalid(
                format!("{field}.contents.{list}"),
                format!("no elements: the request sends its inputs in {raw_field}"),
                "elements",
                "INVALID_TENSOR",
            ));
        }
    }
    check_byte_len(wire, &shape, len, raw_len, raw_field, wire.kserve_name())?;
    Ok((wire, shape, len))
}

/// Checks a wire shape (rank, addressable size) for `field`, returning it as
/// `usize`s with its element count.
fn validated_shape(
    shape: &[u64],
    itemsize: usize,
    dtype_name: &str,
    field: &str,
) -> Result<(Vec<usize>, usize), Error> {
    if shape.len() > MAX_RANK {
        return Err(Error::invalid(
            format!("{field}.shape"),
            format!("at most {MAX_RANK} dimensions"),
            format!("{} dimensions", shape.len()),
            "INVALID_TENSOR",
        ));
    }
    checked_shape(shape, itemsize).ok_or_else(|| {
        Error::invalid(
            format!("{field}.shape"),
            format!(
                "a size that fits in memory addressing (≤ {} bytes)",
                isize::MAX
            ),
            format!("{shape:?} of {dtype_name}, which overflows"),
            "INVALID_TENSOR",
        )
    })
}

/// A KServe input's datatype, validated shape and element count (as
/// [`Tensor::from_kserve`] validates them), for inputs whose bytes are
/// fetched from elsewhere (a shared-memory region).
pub fn kserve_layout(
    input: &inference::model_infer_request::InferInputTensor,
    field: &str,
) -> Result<(Wire, Vec<usize>, usize), Error> {
    let wire = Wire::from_kserve(&input.datatype, field)?;
    let dims: Vec<u64> = input
        .shape
        .iter()
        .map(|&d| u64::try_from(d).ok())
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Error::invalid(
                format!("{field}.shape"),
                "dimensions ≥ 0",
                format!("{:?}", input.shape),
                "INVALID_TENSOR",
            )
        })?;
    let (shape, len) = validated_shape(&dims, wire.itemsize(), wire.kserve_name(), field)?;
    Ok((wire, shape, len))
}

/// The shape as `usize`s and its element count, or `None` when the element
/// count or byte size cannot be addressed. Like ndarray, the product of the
/// non-zero dimensions must fit, even when another dimension is 0.
fn checked_shape(shape: &[u64], itemsize: usize) -> Option<(Vec<usize>, usize)> {
    let dims: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let nonzero = dims
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let bytes = nonzero.checked_mul(itemsize)?;
    if bytes > isize::MAX as usize {
        return None;
    }
    let len = if dims.contains(&0) { 0 } else { nonzero };
    Some((dims, len))
}

/// `data` as elements of `T`: in place when aligned, else copied once (into
/// memory that is not zero-filled first: a KServe client's raw contents sit
/// at whatever offset its message puts them, and that memset cost a third
/// as much as the copy).
fn elements<T: bytemuck::Pod>(data: &[u8]) -> Cow<'_, [T]> {
    if let Ok(values) = bytemuck::try_cast_slice(data) {
        return values.into();
    }
    let len = data.len() / std::mem::size_of::<T>();
    let mut values: Vec<T> = Vec::with_capacity(len);
    // SAFETY: the capacity holds `len` elements of `T`, a Pod type (any bytes
    // are a valid value), and exactly that many bytes are copied before the
    // length is set.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            values.as_mut_ptr().cast::<u8>(),
            len * std::mem::size_of::<T>(),
        );
        values.set_len(len);
    }
    values.into()
}

/// float16 / bfloat16 elements to float32 and back.
///
/// Both directions go through small aligned buffers on the stack, a chunk at
/// a time: the source may be unaligned (prost's buffer), and the large
/// destination is written once, never zero-filled first.
mod half {
    use bytes::Bytes;
    use ndarray::CowArray;

    use crate::dtype::Wire;

    /// Elements per chunk: 24 KiB of stack for both buffers.
    const CHUNK: usize = 4096;

    /// The float32 values of `data`, little-endian elements of half type `wire`.
    pub fn widen(wire: Wire, data: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(data.len() / 2);
        let mut halves = [0u16; CHUNK];
        let mut wide = [0f32; CHUNK];
        for bytes in data.chunks(2 * CHUNK) {
            let n = bytes.len() / 2;
            bytemuck::cast_slice_mut::<u16, u8>(&mut halves[..n]).copy_from_slice(bytes);
            wire.widen_halves(&halves[..n], &mut wide[..n]);
            out.extend_from_slice(&wide[..n]);
        }
        out
    }

    /// `values` rounded to half type `wire` (to nearest, ties to even), as
    /// little-endian bytes.
    pub fn narrow(wire: Wire, values: &CowArray<'_, f32, ndarray::IxDyn>) -> Bytes {
        let standard = values.as_standard_layout();
        let values = standard.as_slice().expect("standard layout");
        let mut out: Vec<u16> = Vec::with_capacity(values.len());
        let mut halves = [0u16; CHUNK];
        for chunk in values.chunks(CHUNK) {
            let halves = &mut halves[..chunk.len()];
            wire.round_to_halves(chunk, halves);
            out.extend_from_slice(halves);
        }
        Bytes::from_owner(Halves(out))
    }

    /// 16-bit elements as the bytes of a tensor.
    pub struct Halves(pub Vec<u16>);

    impl AsRef<[u8]> for Halves {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }
}

/// A standard-layout array seen as its bytes, so `Bytes::from_owner` can take
/// it uncopied.
struct PodBytes<F>(ArcArray<F, IxDyn>);

impl<F: Element> AsRef<[u8]> for PodBytes<F> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice().expect("made from a standard layout"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            wire(1, &[2, 3], t.data.to_vec()).unwrap()
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

    fn kserve_input(
        datatype: &str,
        shape: &[i64],
        contents: inference::InferTensorContents,
    ) -> inference::model_infer_request::InferInputTensor {
        inference::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            contents: Some(contents),
            ..Default::default()
        }
    }

    fn kserve_error(result: Result<Tensor, Error>) -> (String, String) {
        match result.unwrap_err() {
            Error::InvalidArgument { field, got, .. } => (field, got),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn kserve_inputs_from_raw_bytes_or_typed_contents_agree() {
        let values = [1.5f32, -2.0, 0.0, 3.25];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let empty = inference::InferTensorContents::default();
        let from_raw = Tensor::from_kserve(
            kserve_input("FP32", &[2, 2], empty),
            Some(raw.into()),
            "inputs[0]",
            "raw_input_contents[0]",
        )
        .unwrap();
        let typed = inference::InferTensorContents {
            fp32_contents: values.to_vec(),
            ..Default::default()
        };
        let from_typed = Tensor::from_kserve(
            kserve_input("FP32", &[2, 2], typed),
            None,
            "inputs[0]",
            "raw",
        )
        .unwrap();
        assert_eq!(from_raw, from_typed);
        let (output, bytes) = from_typed.into_kserve("y");
        assert_eq!(
            (output.datatype.as_str(), output.shape),
            ("FP32", vec![2, 2])
        );
        assert_eq!(bytes.len(), 16);
    }

    #[test]
    fn every_kserve_defect_names_its_field() {
        let none = inference::InferTensorContents::default;
        let fp64 = |n: usize| inference::InferTensorContents {
            fp64_contents: vec![1.0; n],
            ..Default::default()
        };
        let cases: Vec<(Result<Tensor, Error>, &str, &str)> = vec![
            (
                Tensor::from_kserve(
                    kserve_input("INT32", &[1], none()),
                    Some(vec![0; 4].into()),
                    "inputs[0]",
                    "raw",
                ),
                "inputs[0].datatype",
                "\"INT32\"",
            ),
            (
                Tensor::from_kserve(
                    kserve_input("FP32", &[2, -1], none()),
                    Some(vec![].into()),
                    "inputs[0]",
                    "raw",
                ),
                "inputs[0].shape",
                "[2, -1]",
            ),
            (
                Tensor::from_kserve(
                    kserve_input("FP32", &[4], none()),
                    Some(vec![0; 15].into()),
                    "inputs[0]",
                    "raw_input_contents[0]",
                ),
                "raw_input_contents[0]",
                "15 bytes",
            ),
            (
                Tensor::from_kserve(
                    kserve_input("FP64", &[2], fp64(2)),
                    Some(vec![0; 16].into()),
                    "inputs[0]",
                    "raw",
                ),
                "inputs[0].contents.fp64_contents",
                "elements",
            ),
            (
                Tensor::from_kserve(
                    kserve_input("FP32", &[2], fp64(2)),
                    None,
                    "inputs[0]",
                    "raw",
                ),
                "inputs[0].contents.fp64_contents",
                "elements in fp64_contents",
            ),
            (
                Tensor::from_kserve(
                    kserve_input("FP64", &[3], fp64(2)),
                    None,
                    "inputs[0]",
                    "raw",
                ),
                "inputs[0].contents.fp64_contents",
                "2 elements",
            ),
            (
                // A huge declared shape with few elements: rejected before any allocation.
                Tensor::from_kserve(
                    kserve_input("FP64", &[1 << 30, 1 << 20], fp64(2)),
                    None,
                    "inputs[0]",
                    "raw",
                ),
                "inputs[0].contents.fp64_contents",
                "2 elements",
            ),
        ];
        for (result, field, got) in cases {
            assert_eq!(kserve_error(result), (field.to_string(), got.to_string()));
        }
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
