//! The last numbered step of each optimizer, with its answer, as stored
//! beside the checkpoint: so a retry that reaches the replica taking a
//! session over still gets the first attempt's answer bit for bit and
//! applies nothing (exactly-once across replicas).
//!
//! The encoding is a safetensors file: per optimizer, its answer's `dx` and
//! `scores` as raw wire bytes (`U8` tensors named `<optimizer>.dx`,
//! `<optimizer>.scores`), and the metadata entry `layerd.answers`: per
//! optimizer the step it ran after, the request's fingerprint, the loss (its
//! bits), the count it answered, and each tensor's wire dtype and shape. An
//! empty value means no numbered step is remembered. Decoding validates
//! everything (a foreign or truncated value is an error, never a panic).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::dtype::Wire;
use crate::session::{Applied, Session, TrainAnswer};
use crate::tensor::{validated_shape, Tensor};

const METADATA_KEY: &str = "layerd.answers";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    after: u64,
    request: u64,
    /// None: a Step, whose answer is the count.
    answer: Option<Answer>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    loss_bits: u64,
    steps: u64,
    dx: Option<Layout>,
    scores: Option<Layout>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layout {
    dtype: String,
    shape: Vec<u64>,
}

/// A decoded value: per optimizer id, its last numbered step.
pub struct Stored(Vec<(String, Applied)>);

/// Each optimizer's remembered step (its id and last update), encoded
/// (empty if none).
pub fn encode(remembered: &[(String, Arc<Applied>)]) -> Vec<u8> {
    let mut entries = HashMap::new();
    // The answers' own bytes (shared, not copied) until serialised.
    let mut tensors: Vec<(String, Bytes)> = Vec::new();
    for (id, last) in remembered {
        let answer = last.answer.as_ref().map(|a| {
            let mut layout = |name: &str, t: &Option<Tensor>| {
                t.as_ref().map(|t| {
                    tensors.push((format!("{id}.{name}"), t.wire_bytes()));
                    Layout {
                        dtype: t.wire().proto_name().to_string(),
                        shape: t.shape().iter().map(|&d| d as u64).collect(),
                    }
                })
            };
            Answer {
                loss_bits: a.loss.to_bits(),
                steps: a.steps,
                dx: layout("dx", &a.dx),
                scores: layout("scores", &a.scores),
            }
        });
        let entry = Entry {
            after: last.after,
            request: last.request,
            answer,
        };
        entries.insert(id.clone(), entry);
    }
    if entries.is_empty() {
        return Vec::new();
    }
    let json = serde_json::to_string(&entries).expect("plain data serialises");
    let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, bytes)| {
            let view = safetensors::tensor::TensorView::new(Dtype::U8, vec![bytes.len()], bytes)
                .expect("a U8 vector of its own length");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, Some(metadata)).expect("U8 tensors serialise")
}

/// Decodes and validates a stored value.
pub fn decode(value: &[u8]) -> Result<Stored, String> {
    if value.is_empty() {
        return Ok(Stored(Vec::new()));
    }
    let (file, entries): (_, HashMap<String, Entry>) = super::open_value(value, METADATA_KEY)?;
    let mut used = 0;
    let mut stored = Vec::with_capacity(entries.len());
    for (id, entry) in entries {
        let answer = match entry.answer {
            None => None,
            Some(a) => {
                let mut tensor = |name: &str, layout: Option<Layout>| {
                    layout
                        .map(|layout| {
                            used += 1;
                            tensor_of(&file, &format!("{id}.{name}"), layout)
                        })
                        .transpose()
                };
                Some(TrainAnswer {
                    loss: f64::from_bits(a.loss_bits),
                    dx: tensor("dx", a.dx)?,
                    scores: tensor("scores", a.scores)?,
                    steps: a.steps,
                })
            }
        };
        if answer.as_ref().is_some_and(|a| a.steps != entry.after + 1) {
            return Err(format!("{id}: answered count is not after + 1"));
        }
        let applied = Applied {
            after: entry.after,
            request: entry.request,
            answer,
            held: None,
        };
        stored.push((id, applied));
    }
    if used != file.len() {
        return Err("tensors left over that no answer names".into());
    }
    Ok(Stored(stored))
}

fn tensor_of(file: &SafeTensors<'_>, name: &str, layout: Layout) -> Result<Tensor, String> {
    let view = file.tensor(name).map_err(|_| format!("{name}: missing"))?;
    if view.dtype() != Dtype::U8 || view.shape().len() != 1 {
        return Err(format!("{name}: not a U8 vector"));
    }
    let wire = Wire::from_proto_name(&layout.dtype)
        .ok_or_else(|| format!("{name}: unknown dtype {:?}", layout.dtype))?;
    let (shape, len) = validated_shape(&layout.shape, wire.itemsize(), wire.proto_name(), name)
        .map_err(|e| e.to_string())?;
    let data = Bytes::copy_from_slice(view.data());
    Tensor::from_bytes(wire, shape, len, data, name, wire.proto_name()).map_err(|e| e.to_string())
}

/// Puts each remembered step back on its optimizer of `session` (just
/// restored from the same store value), charging its answer's bytes, and
/// marks every optimizer as resumed ([`crate::session::Progress::resumed`]).
pub async fn restore(session: &Session, stored: Stored) -> Result<(), String> {
    for optimizer in session.optimizers_by_id() {
        optimizer.mark_resumed();
    }
    for (id, mut applied) in stored.0 {
        let optimizer = session
            .optimizer(&id)
            .map_err(|_| format!("{id}: no such optimizer in the state"))?;
        let steps = optimizer.steps.lock().await;
        if steps.count != applied.after + 1 {
            return Err(format!(
                "{id}: remembered step {} does not precede the count {}",
                applied.after, steps.count
            ));
        }
        let bytes = applied.answer.as_ref().map_or(0, TrainAnswer::bytes);
        applied.held = Some(session.reserve(bytes).map_err(|e| e.to_string())?);
        optimizer.restore_last(&steps, Arc::new(applied));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(metadata: Option<&str>, tensors: &[(&str, &[u8])]) -> Vec<u8> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, bytes)| {
                let view =
                    safetensors::tensor::TensorView::new(Dtype::U8, vec![bytes.len()], bytes)
                        .unwrap();
                (name.to_string(), view)
            })
            .collect();
        let metadata = metadata.map(|m| HashMap::from([(METADATA_KEY.to_string(), m.to_string())]));
        safetensors::serialize(views, metadata).unwrap()
    }

    #[test]
    fn a_value_decodes_to_its_answers() {
        let dx = 1.5f32.to_le_bytes();
        let value = file(
            Some(
                r#"{"opt":{"after":4,"request":7,"answer":{"loss_bits":4607182418800017408,"steps":5,"dx":{"dtype":"DTYPE_FLOAT32","shape":[1]},"scores":null}}}"#,
            ),
            &[("opt.dx", &dx)],
        );
        let Stored(stored) = decode(&value).unwrap();
        let (id, applied) = &stored[0];
        assert_eq!((id.as_str(), applied.after, applied.request), ("opt", 4, 7));
        let answer = applied.answer.as_ref().unwrap();
        assert_eq!((answer.loss, answer.steps), (1.0, 5));
        assert_eq!(answer.dx.as_ref().unwrap().wire_bytes().as_ref(), &dx);
        assert!(decode(&[]).unwrap().0.is_empty());
    }

    #[test]
    fn bad_values_are_errors_naming_what_is_wrong() {
        let dx = 1.5f32.to_le_bytes();
        let good = r#"{"opt":{"after":4,"request":7,"answer":{"loss_bits":0,"steps":5,"dx":{"dtype":"DTYPE_FLOAT32","shape":[1]},"scores":null}}}"#;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"garbage".to_vec(), "not safetensors"),
            (
                file(Some(good), &[("opt.dx", &dx)])[..20].to_vec(),
                "not safetensors",
            ),
            (file(None, &[]), "no layerd.answers"),
            (file(Some("{"), &[]), "layerd.answers"),
            (file(Some(good), &[]), "opt.dx: missing"),
            (file(Some(good), &[("opt.dx", &dx[..3])]), "opt.dx"),
            (
                file(Some(&good.replace("FLOAT32", "INT8")), &[("opt.dx", &dx)]),
                "unknown dtype",
            ),
            (
                file(
                    Some(&good.replace("\"steps\":5", "\"steps\":9")),
                    &[("opt.dx", &dx)],
                ),
                "after + 1",
            ),
            (
                file(Some(good), &[("opt.dx", &dx), ("other", &dx)]),
                "left over",
            ),
        ];
        for (value, words) in cases {
            let error = decode(&value).err().expect("refused");
            assert!(error.contains(words), "{error:?} lacks {words:?}");
        }
    }
}
