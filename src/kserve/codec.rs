//! The KServe codec: a `ModelInferRequest`'s inputs (raw contents or typed
//! lists) become validated [`Tensor`]s, and answers become outputs with raw
//! contents. Defects name their field (`inputs[0].shape`,
//! `raw_input_contents[0]`, `inputs[0].contents.fp64_contents`).

use bytes::Bytes;
use ndarray::{ArcArray, IxDyn};

use crate::dtype::{DType, Wire};
use crate::error::Error;
use crate::metrics;
use crate::pb::inference;
use crate::tensor::{check_byte_len, validated_shape, Tensor};

impl Wire {
    /// The KServe v2 datatype name.
    pub fn kserve_name(self) -> &'static str {
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
}

impl DType {
    /// The KServe v2 datatype name.
    pub fn kserve_name(self) -> &'static str {
        self.wire().kserve_name()
    }
}

impl Tensor {
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
            return {
                metrics::tensor_bytes(metrics::Direction::In, raw.len());
                Tensor::from_bytes(wire, shape, len, raw, raw_field, wire.kserve_name())
            };
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
            datatype: self.wire().kserve_name().to_string(),
            shape: self.shape().iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        (output, data)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
