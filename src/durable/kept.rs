//! What the layers of a session kept for Backward, as stored at a graceful
//! handover (and only then: a Forward writes nothing to the store), so a
//! Backward on the replica that takes the session over answers as it would
//! have on the one that let it go.
//!
//! The encoding is a safetensors file: each layer's kept state as a
//! [`KeptRecord`], its parts as tensors named `<layer>/<member>/<part>` in
//! their own dtype (`F32` / `F64` floats, `U64` mask words, `U32` window
//! positions, `I64` class ids), and the metadata entry `layerd.kept`: per
//! layer the wire dtype, x shape, mode, target kind, whether the loss ran and
//! how many parts each member has. An empty value means nothing is kept.
//! Decoding validates the file; [`restore`] has each layer's chain check its
//! record ([`crate::layers::Chain::load_kept`]) and charges its bytes to the
//! session's budget, so a foreign or truncated value is an error, never a
//! panic in a later Backward.

use std::collections::HashMap;
use std::sync::Arc;

use ndarray::{Array1, ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::dtype::{DType, Wire};
use crate::layers::{KeptRecord, MemberParts, Part};
use crate::session::{KeptEntry, Session};

const METADATA_KEY: &str = "layerd.kept";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    wire: String,
    x_shape: Vec<u64>,
    eval: bool,
    classes: bool,
    ran_loss: bool,
    /// Parts per member that ran.
    parts: Vec<u64>,
}

/// A decoded value: per layer id, its kept state.
pub struct Stored(Vec<(String, KeptRecord)>);

/// Each layer's kept state (its id and record), encoded (empty if none).
pub fn encode(records: Vec<(String, KeptRecord)>) -> Vec<u8> {
    let mut entries = HashMap::new();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (id, record) in records {
        let counts = record.members.counts();
        match record.members {
            MemberParts::F32(members) => push(&mut tensors, &id, members),
            MemberParts::F64(members) => push(&mut tensors, &id, members),
        }
        let entry = Entry {
            wire: record.wire.proto_name().to_string(),
            x_shape: record.x_shape.iter().map(|&d| d as u64).collect(),
            eval: record.eval,
            classes: record.classes,
            ran_loss: record.ran_loss,
            parts: counts.into_iter().map(|n| n as u64).collect(),
        };
        entries.insert(id, entry);
    }
    if entries.is_empty() {
        return Vec::new();
    }
    let json = serde_json::to_string(&entries).expect("plain data serialises");
    let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .expect("bytes of the shape's length");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, Some(metadata)).expect("plain tensors serialise")
}

/// A float type's safetensors dtype.
trait StoredFloat: crate::layers::Float {
    const SAFETENSORS: Dtype;
}
impl StoredFloat for f32 {
    const SAFETENSORS: Dtype = Dtype::F32;
}
impl StoredFloat for f64 {
    const SAFETENSORS: Dtype = Dtype::F64;
}

fn push<F: StoredFloat>(
    tensors: &mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    layer: &str,
    members: Vec<Vec<Part<F>>>,
) {
    for (m, parts) in members.into_iter().enumerate() {
        for (p, part) in parts.into_iter().enumerate() {
            let (dtype, shape, bytes) = match part {
                Part::Floats(a) => (
                    F::SAFETENSORS,
                    a.shape().to_vec(),
                    le_bytes(a.iter().copied()),
                ),
                Part::Bits(words) => (Dtype::U64, vec![words.len()], le_bytes(words.into_iter())),
                Part::Positions(a) => (Dtype::U32, a.shape().to_vec(), le_bytes(a.iter().copied())),
                Part::Classes(a) => (Dtype::I64, vec![a.len()], le_bytes(a.iter().copied())),
            };
            tensors.push((format!("{layer}/{m}/{p}"), dtype, shape, bytes));
        }
    }
}

/// The values' bytes, little-endian (every supported target is).
fn le_bytes<T: bytemuck::Pod>(values: impl Iterator<Item = T>) -> Vec<u8> {
    let values: Vec<T> = values.collect();
    bytemuck::cast_slice(&values).to_vec()
}

/// Decodes and validates a stored value (each record's fit to its layer
/// is checked by [`restore`]).
pub fn decode(value: &[u8]) -> Result<Stored, String> {
    if value.is_empty() {
        return Ok(Stored(Vec::new()));
    }
    let (file, entries): (_, HashMap<String, Entry>) = super::open_value(value, METADATA_KEY)?;
    let mut used = 0;
    let mut stored = Vec::with_capacity(entries.len());
    for (id, entry) in entries {
        let wire = Wire::from_proto_name(&entry.wire)
            .ok_or_else(|| format!("{id}: unknown wire dtype {:?}", entry.wire))?;
        let x_shape = entry
            .x_shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("{id}: x shape too large")))
            .collect::<Result<Vec<usize>, String>>()?;
        used += entry.parts.iter().sum::<u64>();
        let members = match wire.compute() {
            DType::F32 => MemberParts::F32(parts_of(&file, &id, &entry.parts)?),
            DType::F64 => MemberParts::F64(parts_of(&file, &id, &entry.parts)?),
        };
        let record = KeptRecord {
            wire,
            x_shape,
            eval: entry.eval,
            classes: entry.classes,
            ran_loss: entry.ran_loss,
            members,
        };
        stored.push((id, record));
    }
    if used != file.len() as u64 {
        return Err("tensors left over that no layer names".into());
    }
    Ok(Stored(stored))
}

fn parts_of<F: StoredFloat>(
    file: &SafeTensors<'_>,
    layer: &str,
    counts: &[u64],
) -> Result<Vec<Vec<Part<F>>>, String> {
    let mut members = Vec::with_capacity(counts.len().min(1024));
    for (m, &count) in counts.iter().enumerate() {
        let mut parts = Vec::new();
        for p in 0..count {
            let name = format!("{layer}/{m}/{p}");
            let view = file.tensor(&name).map_err(|_| format!("{name}: missing"))?;
            let shape = IxDyn(view.shape());
            let data = view.data();
            let part = match view.dtype() {
                dtype if dtype == F::SAFETENSORS => Part::Floats(array(shape, values(data))),
                Dtype::U64 if view.shape().len() == 1 => Part::Bits(values(data)),
                Dtype::U32 => Part::Positions(array(shape, values(data))),
                Dtype::I64 if view.shape().len() == 1 => Part::Classes(Array1::from(values(data))),
                dtype => {
                    return Err(format!(
                        "{name}: expected {:?} floats, U64 words, U32 positions or I64 class ids, got {dtype:?} {:?}",
                        F::SAFETENSORS,
                        view.shape()
                    ))
                }
            };
            parts.push(part);
        }
        members.push(parts);
    }
    Ok(members)
}

/// The little-endian values of `data` (safetensors checked its length
/// against the shape and dtype).
fn values<T: bytemuck::Pod>(data: &[u8]) -> Vec<T> {
    data.chunks_exact(std::mem::size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

fn array<T>(shape: IxDyn, values: Vec<T>) -> ArrayD<T> {
    ArrayD::from_shape_vec(shape, values).expect("safetensors checked the length")
}

/// Gives each layer of `session` (just restored from the same store value)
/// its kept state, checked against its chain and charged to its budget.
pub async fn restore(session: &Session, stored: Stored) -> Result<(), String> {
    for (id, record) in stored.0 {
        let layer = session
            .layer(&id)
            .map_err(|_| format!("{id}: no such layer in the state"))?;
        let kept = layer
            .chain
            .load_kept(record)
            .map_err(|e| format!("{id}: {e}"))?;
        let charge = session.reserve(kept.bytes()).map_err(|e| e.to_string())?;
        let mut state = layer.state.lock().await;
        state.kept = Some(Arc::new(KeptEntry::new(kept, charge)));
        state.kept_lost = false;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(metadata: Option<&str>, tensors: &[(&str, Dtype, &[u8])]) -> Vec<u8> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, bytes)| {
                let n = bytes.len() * 8 / dtype.bitsize();
                let view = safetensors::tensor::TensorView::new(*dtype, vec![n], bytes).unwrap();
                (name.to_string(), view)
            })
            .collect();
        let metadata = metadata.map(|m| HashMap::from([(METADATA_KEY.to_string(), m.to_string())]));
        safetensors::serialize(views, metadata).unwrap()
    }

    const RELU: &str = r#"{"act":{"wire":"DTYPE_FLOAT32","x_shape":[3],"eval":false,"classes":false,"ran_loss":false,"parts":[1]}}"#;

    #[test]
    fn a_value_decodes_to_records_of_its_parts() {
        let words = 5u64.to_le_bytes();
        let Stored(stored) = decode(&file(Some(RELU), &[("act/0/0", Dtype::U64, &words)])).unwrap();
        let (id, record) = &stored[0];
        assert_eq!((id.as_str(), record.x_shape.as_slice()), ("act", &[3][..]));
        assert_eq!(
            record.members,
            MemberParts::F32(vec![vec![Part::Bits(vec![5])]])
        );
        assert!(decode(&[]).unwrap().0.is_empty());
    }

    #[test]
    fn bad_values_are_errors_naming_what_is_wrong() {
        let words = 5u64.to_le_bytes();
        let good = &[("act/0/0", Dtype::U64, &words[..])];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"garbage".to_vec(), "not safetensors"),
            (file(Some(RELU), good)[..30].to_vec(), "not safetensors"),
            (file(None, good), "no layerd.kept"),
            (file(Some("[]"), good), "layerd.kept"),
            (
                file(Some(&RELU.replace("FLOAT32", "INT8")), good),
                "unknown wire dtype",
            ),
            (file(Some(RELU), &[]), "act/0/0: missing"),
            (
                file(Some(RELU), &[("act/0/0", Dtype::F64, &words)]),
                "act/0/0: expected F32 floats",
            ),
            (
                file(Some(RELU), &[good[0], ("act/0/1", Dtype::U64, &words)]),
                "left over",
            ),
        ];
        for (value, words) in cases {
            let error = decode(&value).err().expect("refused");
            assert!(error.contains(words), "{error:?} lacks {words:?}");
        }
    }
}
