//! Validated tensors: a dtype, a shape and little-endian bytes, viewed as
//! arrays and back. No wire format here: the codecs at the edges
//! ([`crate::api::codec`] for `layerd.v1`, [`crate::kserve::codec`] for
//! KServe) decode a message's tensor through [`Tensor::from_bytes`] and
//! encode an answer from [`Tensor::wire_bytes`], and count the bytes.
//!
//! The buffer is the `Bytes` the codec decoded from the request, not a copy;
//! it is viewed as `f32`/`f64` in place when aligned, and copied once when
//! not. Results are wrapped into `Bytes` without a copy
//! ([`Tensor::from_array`]).
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
    /// A validated tensor from a shape (checked by [`validated_shape`]) and
    /// `data` (in `wire`'s dtype) whose byte length is checked against it;
    /// `data_field` names `data` in errors, `dtype_name` the dtype as the
    /// wire format calls it. Half types are kept as they came (widened when
    /// viewed). The wire formats' codecs build their tensors with this.
    pub fn from_bytes(
        wire: Wire,
        shape: Vec<usize>,
        len: usize,
        data: Bytes,
        data_field: &str,
        dtype_name: &str,
    ) -> Result<Tensor, Error> {
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
    pub fn wire_bytes(&self) -> Bytes {
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

    /// The elements' bytes in its compute dtype: row-major, little-endian,
    /// packed (borrowed unless stored as a half type).
    pub fn le_bytes(&self) -> Cow<'_, [u8]> {
        if self.stored.is_half() {
            let wide = half::widen(self.stored, &self.data);
            return bytemuck::cast_slice::<f32, u8>(&wide).to_vec().into();
        }
        (&self.data[..]).into()
    }

    /// The bytes it holds.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Feeds its dtypes, shape and bytes to `hasher` (a request's
    /// fingerprint, to recognise a retry).
    pub fn fingerprint(&self, hasher: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        (self.stored, self.wire, &self.shape).hash(hasher);
        hasher.write(&self.data);
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
    /// Feeds it to `hasher`, as [`Tensor::fingerprint`].
    pub fn fingerprint(&self, hasher: &mut impl std::hash::Hasher) {
        match self {
            Target::Classes(ids) => {
                hasher.write_u8(0);
                for id in ids.iter() {
                    hasher.write_i64(*id);
                }
            }
            Target::Probabilities(p) => {
                hasher.write_u8(1);
                p.fingerprint(hasher);
            }
        }
    }

    /// Whether the target is class ids.
    pub fn is_classes(&self) -> bool {
        matches!(self, Target::Classes(_))
    }
}

/// Checks that `got` bytes (of `data_field`) hold the `len` elements of `shape` in
/// `wire`'s dtype, named `dtype_name` in the error.
pub fn check_byte_len(
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

/// Checks a wire shape (rank, addressable size) for `field`, returning it as
/// `usize`s with its element count.
pub fn validated_shape(
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
