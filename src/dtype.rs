//! Element types, at the bottom of the module graph: the wire dtype enum and
//! the trait of the Rust types a tensor's bytes are viewed as. Nothing here
//! depends on layers, sessions or metrics.

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
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// The proto enum value name, as clients see it.
    pub const fn proto_name(self) -> &'static str {
        match self {
            DType::F32 => "DTYPE_FLOAT32",
            DType::F64 => "DTYPE_FLOAT64",
        }
    }

    /// The KServe v2 datatype name.
    pub const fn kserve_name(self) -> &'static str {
        match self {
            DType::F32 => "FP32",
            DType::F64 => "FP64",
        }
    }

    pub(crate) fn from_kserve(name: &str, field: &str) -> Result<DType, Error> {
        match name {
            "FP32" => Ok(DType::F32),
            "FP64" => Ok(DType::F64),
            other => Err(Error::invalid(
                format!("{field}.datatype"),
                "FP32 or FP64",
                format!("{other:?}"),
                "INVALID_TENSOR",
            )),
        }
    }

    pub(crate) fn from_proto(value: i32, field: &str) -> Result<DType, Error> {
        match pb::DType::try_from(value) {
            Ok(pb::DType::DtypeFloat32) => Ok(DType::F32),
            Ok(pb::DType::DtypeFloat64) => Ok(DType::F64),
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
            DType::F32 => pb::DType::DtypeFloat32,
            DType::F64 => pb::DType::DtypeFloat64,
        }
    }
}

fn bad_dtype(field: &str, got: String) -> Error {
    Error::invalid(
        format!("{field}.dtype"),
        "DTYPE_FLOAT32 (1) or DTYPE_FLOAT64 (2)",
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
