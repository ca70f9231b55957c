//! Checkpoints: a session as one safetensors file (ExportSession), and a new
//! session from one (ImportSession), so that training goes on bit for bit.
//!
//! The file (readable by `safetensors.numpy.load`):
//! - `layers.<layer_id>.<name>`: every parameter and buffer (a sequential's
//!   as `layers.<layer_id>.<member>.<name>`);
//! - `optimizers.<optimizer_id>.<state>.<layer_id>.<name>`: each optimizer's
//!   state per parameter (`v`, `h`, `m`);
//! - `__metadata__["layerd"]`: the JSON [`Manifest`]: each layer's kind,
//!   dtype and config as CreateLayer took them, its dropout generators'
//!   positions, and each optimizer's algorithm, layers and step count.
//!
//! Kept state and gradients are not saved: a step after an import starts with
//! a Forward, as any training step does. (A session store keeps kept state
//! beside the file at a handover: [`Export::kept`].)
//!
//! Files: this one reads a checkpoint; `export.rs` writes one.
//!
//! Invariants:
//! - export holds every optimizer's lock, then every layer's, in id order (as
//!   Step and TrainStep take them), so the file is one state of the session;
//! - import ([`parse`]) validates everything before anything is created: the
//!   framing (the `safetensors` crate: header size, offsets, lengths), the
//!   manifest, each layer through CreateLayer's validation and each
//!   optimizer through CreateOptimizer's, every tensor's name, dtype and
//!   shape, each generator's position, and that no tensor is left over. The
//!   budgets are charged while [`restore`] builds the session, and the caller
//!   closes it again if that fails.

mod export;

use std::collections::{BTreeMap, HashMap};

pub use export::{export, export_counted, export_with, Export};

use bytes::Bytes;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::dtype::DType;
use crate::error::Error;
use crate::layers::rng::Rng;
use crate::optimizers::Algorithm;
use crate::session::{CloseOnDrop, OptimizerState, Session, Store};
use crate::spec::{self, AlgorithmConfig, Config, LayerRequest, NewLayer, Recipe};
use crate::tensor::{validated_shape, Tensor};

/// `Manifest::format` of this layout.
const FORMAT: &str = "layerd.v1.session";
/// The `__metadata__` key of the manifest.
pub const METADATA_KEY: &str = "layerd";
/// The field errors name.
const FIELD: &str = "safetensors";

/// What a checkpoint says besides its tensors.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: String,
    layers: Vec<LayerEntry>,
    optimizers: Vec<OptimizerEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerEntry {
    id: String,
    kind: String,
    /// The parameters' dtype (`DTYPE_FLOAT32`), absent for a layer without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<Config>,
    /// Dropout generators' positions by member name ("" for a plain
    /// dropout layer): four 64-bit words as 64 hex digits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    generators: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimizerEntry {
    id: String,
    algorithm: AlgorithmConfig,
    layer_ids: Vec<String>,
    steps: u64,
}

/// A validated checkpoint, ready to become a session.
pub struct Checkpoint {
    layers: Vec<ImportedLayer>,
    optimizers: Vec<ImportedOptimizer>,
}

struct ImportedLayer {
    id: String,
    layer: NewLayer,
    /// (member index, generator) of each dropout member.
    generators: Vec<(usize, Rng)>,
}

struct ImportedOptimizer {
    id: String,
    algorithm: Algorithm,
    layer_ids: Vec<String>,
    steps: u64,
    /// Per owned layer: its optimizer state (member → parameter → state).
    state: HashMap<String, Vec<Vec<Vec<Tensor>>>>,
}

/// The metadata entry `key` of a safetensors file, if it is one and has it.
pub fn metadata_entry(file: &[u8], key: &str) -> Option<String> {
    let (_, header) = SafeTensors::read_metadata(file).ok()?;
    header.metadata().as_ref()?.get(key).cloned()
}

/// Validates a checkpoint completely (see the module doc); creates nothing.
pub fn parse(file: &[u8]) -> Result<Checkpoint, Error> {
    let tensors = SafeTensors::deserialize(file)
        .map_err(|e| bad(FIELD, "a safetensors file", e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(file)
        .map_err(|e| bad(FIELD, "a safetensors file", e.to_string()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| {
            bad(
                format!("{FIELD}.__metadata__.{METADATA_KEY}"),
                "layerd's manifest (a file made by ExportSession)",
                "none",
            )
        })?;
    let manifest: Manifest = serde_json::from_str(json).map_err(|e| {
        bad(
            format!("{FIELD}.__metadata__.{METADATA_KEY}"),
            "layerd's manifest JSON",
            e.to_string(),
        )
    })?;
    if manifest.format != FORMAT {
        return Err(bad(
            format!("{FIELD}.__metadata__.{METADATA_KEY}.format"),
            format!("{FORMAT:?}"),
            format!("{:?}", manifest.format),
        ));
    }
    let mut unread: HashMap<String, safetensors::tensor::TensorView<'_>> =
        tensors.tensors().into_iter().collect();
    let mut take = |name: String, dtype: Option<DType>, shape: &[usize]| {
        let field = format!("{FIELD}[{name:?}]");
        let view = unread
            .remove(&name)
            .ok_or_else(|| bad(&field, "a tensor of that name", "none"))?;
        let tensor = tensor_of(&view, &field)?;
        if Some(tensor.dtype()) != dtype || tensor.shape() != shape {
            let want = dtype.map_or("none", DType::proto_name);
            return Err(bad(
                field,
                format!("{want}{shape:?}"),
                format!("{}{:?}", tensor.dtype().proto_name(), tensor.shape()),
            ));
        }
        Ok(tensor)
    };

    let mut layers: Vec<ImportedLayer> = Vec::with_capacity(manifest.layers.len());
    for (i, entry) in manifest.layers.into_iter().enumerate() {
        let at = format!("{FIELD}.__metadata__.{METADATA_KEY}.layers[{i}]");
        check_new_id(
            &at,
            &entry.id,
            layers.iter().map(|l| l.id.as_str()),
            "layer",
        )?;
        let dtype = match entry.dtype.as_deref() {
            None => None,
            Some(name) => Some(DType::from_proto_name(name).ok_or_else(|| {
                bad(
                    format!("{at}.dtype"),
                    "DTYPE_FLOAT32 or DTYPE_FLOAT64",
                    format!("{name:?}"),
                )
            })?),
        };
        let request = LayerRequest {
            kind: entry.kind.clone(),
            dtype,
            config: entry.config.clone(),
            params: HashMap::new(),
        };
        let plan = spec::new_layer(request).map_err(|e| within(&at, e))?;
        let chain = plan.chain;
        let mut values = HashMap::new();
        let slots: Vec<(String, Vec<usize>)> = chain
            .slot_names()
            .zip(chain.slot_shapes())
            .map(|(name, shape)| (name.to_string(), shape.to_vec()))
            .collect();
        for (name, shape) in slots {
            let value = take(format!("layers.{}.{name}", entry.id), chain.dtype(), &shape)?;
            values.insert(name, value);
        }
        let mut generators = Vec::new();
        let mut positions = entry.generators;
        for (m, member) in chain.members().iter().enumerate() {
            if !member.spec.draws() {
                continue;
            }
            let field = format!("{at}.generators[{:?}]", member.name);
            let position = positions
                .remove(&member.name)
                .ok_or_else(|| bad(&field, "the dropout generator's position", "none"))?;
            let rng = unhex(&position).and_then(Rng::at).ok_or_else(|| {
                bad(
                    &field,
                    "64 hex digits, not all zero",
                    format!("{position:?}"),
                )
            })?;
            generators.push((m, rng));
        }
        if let Some(name) = positions.keys().next() {
            return Err(bad(
                format!("{at}.generators[{name:?}]"),
                "a dropout member's name",
                format!("{name:?}, which is none"),
            ));
        }
        layers.push(ImportedLayer {
            id: entry.id,
            layer: NewLayer {
                chain,
                params: values,
                recipe: Recipe {
                    kind: entry.kind,
                    config: entry.config,
                },
            },
            generators,
        });
    }

    let mut optimizers: Vec<ImportedOptimizer> = Vec::with_capacity(manifest.optimizers.len());
    for (i, entry) in manifest.optimizers.into_iter().enumerate() {
        let at = format!("{FIELD}.__metadata__.{METADATA_KEY}.optimizers[{i}]");
        check_new_id(
            &at,
            &entry.id,
            optimizers.iter().map(|o| o.id.as_str()),
            "optimizer",
        )?;
        let algorithm = spec::algorithm(Some(&entry.algorithm)).map_err(|e| within(&at, e))?;
        if entry.layer_ids.is_empty() {
            return Err(bad(format!("{at}.layer_ids"), "the layers it owns", "none"));
        }
        let mut state = HashMap::new();
        for (j, layer_id) in entry.layer_ids.iter().enumerate() {
            let field = format!("{at}.layer_ids[{j}]");
            let Some(layer) = layers.iter().find(|l| &l.id == layer_id) else {
                return Err(bad(
                    field,
                    "a layer of the checkpoint",
                    format!("{layer_id:?}"),
                ));
            };
            let chain = &layer.layer.chain;
            let owner = optimizers.iter().find(|o| o.layer_ids.contains(layer_id));
            if !chain.has_params() || owner.is_some() || state.contains_key(layer_id) {
                return Err(bad(
                    field,
                    "a layer with parameters no other optimizer owns",
                    format!("{layer_id:?}"),
                ));
            }
            let mut values: Vec<Vec<Vec<Tensor>>> = vec![Vec::new(); chain.members().len()];
            for (m, _, name, slot) in chain.params() {
                let mut per_state = Vec::new();
                for state_name in algorithm.state_names() {
                    let tensor_name =
                        format!("optimizers.{}.{state_name}.{layer_id}.{name}", entry.id);
                    per_state.push(take(tensor_name, chain.dtype(), &slot.shape)?);
                }
                values[m].push(per_state);
            }
            state.insert(layer_id.clone(), values);
        }
        optimizers.push(ImportedOptimizer {
            id: entry.id,
            algorithm,
            layer_ids: entry.layer_ids,
            steps: entry.steps,
            state,
        });
    }
    if let Some(name) = unread.keys().min() {
        return Err(bad(
            format!("{FIELD}[{name:?}]"),
            "only the tensors the manifest names",
            format!("{name:?}, which it does not"),
        ));
    }
    Ok(Checkpoint { layers, optimizers })
}

/// Builds the checkpoint's layers and optimizers in `session` (a new one),
/// charging the budgets as it goes. On an error the caller closes the session.
pub async fn restore(session: &Session, checkpoint: Checkpoint) -> Result<(), Error> {
    for imported in checkpoint.layers {
        let layer = session.create_layer(&imported.id, imported.layer)?;
        let mut state = layer.state.lock().await;
        for (m, rng) in imported.generators {
            state.members[m].rng = Some(rng);
        }
    }
    for mut imported in checkpoint.optimizers {
        session
            .create_optimizer(&imported.id, imported.algorithm, &imported.layer_ids)
            .await?;
        let optimizer = session.optimizer(&imported.id)?;
        let mut steps = optimizer.steps.lock().await;
        optimizer.set_count(&mut steps, imported.steps, None);
        for (layer_id, layer) in &optimizer.layers {
            let mut state = layer.state.lock().await;
            state.optimizer = Some(OptimizerState {
                optimizer_id: imported.id.clone(),
                values: imported
                    .state
                    .remove(layer_id)
                    .expect("parsed per owned layer"),
            });
        }
    }
    Ok(())
}

/// [`restore`] into `session`, just opened for `owner`, which is closed
/// again unless the restore succeeds (a failure, a timeout or a cancelled
/// call leaves no session behind).
pub async fn restore_new(
    store: &Store,
    owner: &Principal,
    session: &Session,
    checkpoint: Checkpoint,
) -> Result<(), Error> {
    let created = CloseOnDrop {
        store: store.clone(),
        owner: owner.clone(),
        session_id: Some(session.id().to_string()),
    };
    restore(session, checkpoint).await?;
    created.disarm();
    Ok(())
}

/// A safetensors tensor as a validated float tensor.
fn tensor_of(view: &safetensors::tensor::TensorView<'_>, field: &str) -> Result<Tensor, Error> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        other => {
            return Err(bad(
                format!("{field}.dtype"),
                "F32 or F64",
                format!("{other:?}"),
            ))
        }
    };
    let wire = dtype.wire();
    let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
    let (shape, len) = validated_shape(&shape, wire.itemsize(), wire.proto_name(), field)?;
    let data = Bytes::copy_from_slice(view.data());
    Tensor::from_bytes(
        wire,
        shape,
        len,
        data,
        &format!("{field}.data"),
        wire.proto_name(),
    )
}

/// Checks the id of the manifest entry at `at`: the id rules, and not one of `earlier`.
fn check_new_id<'a>(
    at: &str,
    id: &str,
    mut earlier: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<(), Error> {
    crate::session::check_id(&format!("{at}.id"), id)?;
    if earlier.any(|e| e == id) {
        return Err(bad(
            format!("{at}.id"),
            format!("each {what} once"),
            format!("{id:?} again"),
        ));
    }
    Ok(())
}

fn bad(field: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Error {
    Error::invalid(field, expected, got, "INVALID_CHECKPOINT")
}

/// `error` with its field placed under `prefix` (a path in the manifest).
fn within(prefix: &str, error: Error) -> Error {
    match error {
        Error::InvalidArgument {
            field,
            expected,
            got,
            reason,
        } => Error::InvalidArgument {
            field: format!("{prefix}.{field}"),
            expected,
            got,
            reason,
        },
        other => other,
    }
}

fn hex(words: [u64; 4]) -> String {
    words.iter().map(|w| format!("{w:016x}")).collect()
}

fn unhex(text: &str) -> Option<[u64; 4]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut words = [0u64; 4];
    for (i, word) in words.iter_mut().enumerate() {
        *word = u64::from_str_radix(&text[i * 16..(i + 1) * 16], 16).ok()?;
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_positions_round_trip_and_bad_ones_are_refused() {
        let words = [1, u64::MAX, 0x0123_4567_89ab_cdef, 0];
        assert_eq!(unhex(&hex(words)), Some(words));
        for bad in ["", "xyz", &"0".repeat(63), &"g".repeat(64), &"é".repeat(32)] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hostile_files_are_invalid_arguments() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 7],
            u64::MAX.to_le_bytes().to_vec(),
            [16u64.to_le_bytes().to_vec(), b"{\"a\":1}".to_vec()].concat(),
            // A valid file without layerd's manifest.
            safetensors::serialize(Vec::<(String, export::Wire<'_>)>::new(), None).unwrap(),
        ];
        for file in cases {
            let Err(error) = parse(&file) else {
                panic!("accepted {file:?}")
            };
            // INVALID_ARGUMENT: the one variant that maps to it.
            assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
        }
    }
}
