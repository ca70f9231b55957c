//! DescribeSession's answer: what a session holds, read from the core
//! without locking any layer (a call in flight is not waited for).

use crate::pb;
use crate::session::Session;

/// The summary of `session` as the replica `replica_id` holds it; `stored`:
/// each optimizer's count in the session store, if there is one.
pub fn describe(
    session: &Session,
    replica_id: &str,
    stored: Option<Vec<(String, u64)>>,
) -> pb::DescribeSessionResponse {
    let stored_steps = |id: &str| {
        stored
            .as_ref()
            .and_then(|s| s.iter().find(|(o, _)| o == id).map(|(_, n)| *n))
    };
    let optimizers: Vec<pb::OptimizerSummary> = session
        .optimizers_by_id()
        .iter()
        .map(|optimizer| pb::OptimizerSummary {
            optimizer_id: optimizer.id.clone(),
            algorithm: optimizer.algorithm.name().to_string(),
            steps: optimizer.committed_count(),
            layer_ids: optimizer.layers.iter().map(|(id, _)| id.clone()).collect(),
            stored_steps: stored_steps(&optimizer.id),
        })
        .collect();
    let owner = |layer_id: &str| {
        optimizers
            .iter()
            .find(|o| o.layer_ids.iter().any(|id| id == layer_id))
            .map(|o| o.optimizer_id.clone())
            .unwrap_or_default()
    };
    let layers = session
        .layers_by_id()
        .into_iter()
        .map(|(layer_id, layer)| pb::LayerSummary {
            kind: layer.chain.kind().name().to_string(),
            dtype: layer
                .chain
                .dtype()
                .map_or(pb::DType::DtypeUnspecified, |d| d.wire().to_proto())
                as i32,
            optimizer_id: owner(&layer_id),
            layer_id,
        })
        .collect();
    pb::DescribeSessionResponse {
        session_id: session.id().to_string(),
        idle_timeout_seconds: session.idle_timeout().as_secs() as u32,
        layers,
        optimizers,
        held_bytes: session.kept_bytes(),
        replica_id: replica_id.to_string(),
    }
}
