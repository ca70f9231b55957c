//! Element types, at the bottom of the module graph: the wire dtype enum and
//! the trait of the Rust types a tensor's bytes are viewed as. Nothing here
//! depends on layers, sessions or metrics.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::Error;
use crate::pb;

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

    /// The KServe v2 datatype name.
    pub const fn kserve_name(self) -> &'static str {
        self.wire().kserve_name()
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

    /// The proto enum value name, as clients see it.
    pub const fn proto_name(self) -> &'static str {
        match self {
            Wire::F32 => "DTYPE_FLOAT32",
            Wire::F64 => "DTYPE_FLOAT64",
            Wire::F16 => "DTYPE_FLOAT16",
            Wire::BF16 => "DTYPE_BFLOAT16",
        }
    }

    /// The KServe v2 datatype name.
    pub const fn kserve_name(self) -> &'static str {
        match self {
            Wire::F32 => "FP32",
            Wire::F64 => "FP64",
            Wire::F16 => "FP16",
            Wire::BF16 => "BF16",
        }
    }

    pub fn from_kserve(name: &str, field: &str) -> Result<Wire, Error> {
        match name {
            "FP32" => Ok(Wire::F32),
            "FP64" => Ok(Wire::F64),
            "FP16" => Ok(Wire::F16),
            "BF16" => Ok(Wire::BF16),
            other => Err(Error::invalid(
                format!("{field}.datatype"),
                "FP32, FP64, FP16 or BF16",
                format!("{other:?}"),
                "INVALID_TENSOR",
            )),
        }
    }

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
