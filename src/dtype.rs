//! Element types, at the bottom of the module graph: how a float tensor
//! travels ([`Wire`]), what it is computed in ([`DType`]), and the trait of
//! the Rust types a tensor's bytes are viewed as. Nothing here depends on
//! layers, sessions, metrics or a wire format (the codecs name these dtypes
//! as their formats do).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Element type of a validated tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
}

impl DType {
    /// Bytes per element.
    pub const fn itemsize(self) -> usize {
        self.wire().itemsize()
    }

    /// The proto enum value name, as clients see it.
    pub const fn proto_name(self) -> &'static str {
        self.wire().proto_name()
    }

    /// The dtype computed for a wire dtype named as in [`DType::proto_name`]
    /// (a half type computes in float32); None for another name.
    pub fn from_proto_name(name: &str) -> Option<DType> {
        Wire::from_proto_name(name).map(Wire::compute)
    }

    /// How a tensor of this dtype travels.
    pub const fn wire(self) -> Wire {
        match self {
            DType::F32 => Wire::F32,
            DType::F64 => Wire::F64,
        }
    }
}

/// How a float tensor travels: as its compute dtype, or as a half type that
/// is computed as float32 (widened when a layer views it) and answered
/// rounded back (to nearest, ties to even) — the wire is half, the math is
/// float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    F32,
    F64,
    F16,
    BF16,
}

impl Wire {
    /// The dtype its values are computed in.
    pub const fn compute(self) -> DType {
        match self {
            Wire::F32 | Wire::F16 | Wire::BF16 => DType::F32,
            Wire::F64 => DType::F64,
        }
    }

    /// Bytes per element on the wire.
    pub const fn itemsize(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::F64 => 8,
            Wire::F16 | Wire::BF16 => 2,
        }
    }

    /// Whether values are rounded to a half type on the wire.
    pub const fn is_half(self) -> bool {
        matches!(self, Wire::F16 | Wire::BF16)
    }

    /// The float32 values of `halves`, 16-bit elements of this half type,
    /// into `out` (as long).
    ///
    /// # Panics
    /// If this is not a half type, or the lengths differ (caller bugs).
    pub fn widen_halves(self, halves: &[u16], out: &mut [f32]) {
        match self {
            Wire::F16 => bytemuck::cast_slice::<u16, f16>(halves).convert_to_f32_slice(out),
            Wire::BF16 => bytemuck::cast_slice::<u16, bf16>(halves).convert_to_f32_slice(out),
            Wire::F32 | Wire::F64 => unreachable!("only half types are widened"),
        }
    }

    /// `values` rounded to this half type (to nearest, ties to even), into
    /// `out` (as long).
    ///
    /// # Panics
    /// As [`Wire::widen_halves`].
    pub fn round_to_halves(self, values: &[f32], out: &mut [u16]) {
        match self {
            Wire::F16 => bytemuck::cast_slice_mut::<u16, f16>(out).convert_from_f32_slice(values),
            Wire::BF16 => bytemuck::cast_slice_mut::<u16, bf16>(out).convert_from_f32_slice(values),
            Wire::F32 | Wire::F64 => unreachable!("only half types are narrowed"),
        }
    }

    /// The wire dtype named `name` as in [`Wire::proto_name`]; None for
    /// another name.
    pub fn from_proto_name(name: &str) -> Option<Wire> {
        [Wire::F32, Wire::F64, Wire::F16, Wire::BF16]
            .into_iter()
            .find(|wire| wire.proto_name() == name)
    }

    /// The proto enum value name, as clients see it.
    pub const fn proto_name(self) -> &'static str {
        match self {
            Wire::F32 => "DTYPE_FLOAT32",
            Wire::F64 => "DTYPE_FLOAT64",
            Wire::F16 => "DTYPE_FLOAT16",
            Wire::BF16 => "DTYPE_BFLOAT16",
        }
    }
}

/// A Rust element type a tensor's little-endian bytes can be viewed as.
pub trait Element: bytemuck::Pod + Send + Sync + std::fmt::Debug + 'static {
    /// The wire dtype of this element type.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
