//! Writing a session as a checkpoint: every layer's values, generators and
//! optimizer state, and the manifest, taken at one instant under all of the
//! session's locks (with, for a session store, the last numbered updates and
//! the kept state).

use std::{collections::HashMap, sync::Arc};

use safetensors::{Dtype, View};
use std::borrow::Cow;

use super::{hex, LayerEntry, Manifest, OptimizerEntry, FORMAT, METADATA_KEY};
use crate::dtype::DType;
use crate::error::Error;
use crate::layers::KeptRecord;
use crate::optimizers::Algorithm;
use crate::session::{Applied, Session};
use crate::spec::AlgorithmConfig;
use crate::tensor::Tensor;

/// The session as a safetensors file.
pub async fn export(session: &Session) -> Result<Vec<u8>, Error> {
    export_with(session, HashMap::new()).await
}

/// The session as a safetensors file with `extra` entries in its metadata
/// besides the manifest (`--state-dir` records the session's id and owner).
pub async fn export_with(
    session: &Session,
    extra: HashMap<String, String>,
) -> Result<Vec<u8>, Error> {
    Ok(export_counted(session, extra, false).await?.file)
}

/// A session's export with what a session store keeps beside it, all taken
/// at one instant (under every optimizer's step lock and every layer's lock).
pub struct Export {
    /// The checkpoint.
    pub file: Vec<u8>,
    /// Each optimizer's step count in the file.
    pub counts: Vec<(String, u64)>,
    /// Each optimizer's last numbered update, if it remembers one.
    pub last: Vec<(String, Arc<Applied>)>,
    /// If asked for: each layer's kept state (for a handover).
    pub kept: Vec<(String, KeptRecord)>,
}

/// [`export_with`], with the step counts and last updates in it and, if
/// `with_kept`, what the layers keep for Backward.
pub async fn export_counted(
    session: &Session,
    mut extra: HashMap<String, String>,
    with_kept: bool,
) -> Result<Export, Error> {
    let optimizers = session.optimizers_by_id();
    let mut steps = Vec::with_capacity(optimizers.len());
    for optimizer in &optimizers {
        steps.push(optimizer.steps.lock().await);
    }
    let layers = session.layers_by_id();
    let mut states = Vec::with_capacity(layers.len());
    for (_, layer) in &layers {
        states.push(layer.state.lock().await);
    }
    let algorithms: HashMap<&str, &Algorithm> = optimizers
        .iter()
        .map(|o| (o.id.as_str(), &o.algorithm))
        .collect();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut manifest = Manifest {
        format: FORMAT.to_string(),
        layers: Vec::with_capacity(layers.len()),
        optimizers: Vec::with_capacity(optimizers.len()),
    };
    let mut kept = Vec::new();
    for ((id, layer), state) in layers.iter().zip(&states) {
        if let Some(entry) = state.kept.as_ref().filter(|_| with_kept) {
            kept.push((id.clone(), layer.chain.save_kept(&entry.kept)));
        }
        let (params, buffers) = layer.chain.named_values(&state.members);
        for (name, value) in params.into_iter().chain(buffers) {
            tensors.push((format!("layers.{id}.{name}"), value));
        }
        let generators = layer
            .chain
            .members()
            .iter()
            .zip(&state.members)
            .filter_map(|(member, s)| Some((member.name.clone(), hex(s.rng?.position()))))
            .collect();
        manifest.layers.push(LayerEntry {
            id: id.clone(),
            kind: layer.recipe.kind.clone(),
            dtype: layer.chain.dtype().map(|d| d.proto_name().to_string()),
            config: layer.recipe.config.clone(),
            generators,
        });
        if let Some(owned) = &state.optimizer {
            let names = algorithms[owned.optimizer_id.as_str()].state_names();
            for (m, s, name, _) in layer.chain.params() {
                for (k, state_name) in names.iter().enumerate() {
                    tensors.push((
                        format!("optimizers.{}.{state_name}.{id}.{name}", owned.optimizer_id),
                        owned.values[m][s][k].clone(),
                    ));
                }
            }
        }
    }
    for (optimizer, steps) in optimizers.iter().zip(&steps) {
        if steps.live {
            manifest.optimizers.push(OptimizerEntry {
                id: optimizer.id.clone(),
                algorithm: AlgorithmConfig::of(&optimizer.algorithm),
                layer_ids: optimizer.layers.iter().map(|(id, _)| id.clone()).collect(),
                steps: steps.count,
            });
        }
    }
    let last = optimizers
        .iter()
        .filter_map(|o| Some((o.id.clone(), o.last_applied()?)))
        .collect();
    drop(states);
    drop(steps);
    let counts = manifest
        .optimizers
        .iter()
        .map(|o| (o.id.clone(), o.steps))
        .collect();
    let json = serde_json::to_string(&manifest)
        .map_err(|e| Error::Internal(format!("checkpoint manifest: {e}")))?;
    extra.insert(METADATA_KEY.to_string(), json);
    let file = safetensors::serialize(tensors.iter().map(|(n, t)| (n, Wire(t))), Some(extra))
        .map_err(|e| Error::Internal(format!("writing the checkpoint: {e}")))?;
    Ok(Export {
        file,
        counts,
        last,
        kept,
    })
}

/// A tensor as safetensors writes it.
pub(super) struct Wire<'a>(pub(super) &'a Tensor);

impl View for Wire<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype() {
            DType::F32 => Dtype::F32,
            DType::F64 => Dtype::F64,
        }
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.0.le_bytes()
    }
    fn data_len(&self) -> usize {
        self.0.len() * self.0.dtype().itemsize()
    }
}
