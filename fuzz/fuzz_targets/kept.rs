//! The `checkpoint` target's part for the session store's kept-state value:
//! a session whose layers kept state of every kind (a float32 sequential of
//! all of them with class ids, a ReLU on float16, a float64 affine with a
//! loss on probabilities, a batch_norm in evaluation mode) is encoded; the
//! fuzz bytes as they are, and spliced into that valid value (overwritten,
//! truncated or inserted at an offset the first bytes give), are decoded and
//! restored into a second session with the same layers. A value that
//! restores must answer every Backward (or refuse it) without panicking;
//! the valid value itself must restore.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use layerd::auth::Principal;
use layerd::checkpoint::export_counted;
use layerd::dtype::Wire;
use layerd::durable::kept;
use layerd::engine::{backward_on, forward_on, ForwardOptions, Phases};
use layerd::session::{Limits, Session, Store};
use layerd::spec::{
    new_layer, AffineConfig, BatchNormConfig, Config, ConvolutionConfig, DropoutConfig,
    LayerRequest, MemberConfig, PoolingConfig, SequentialConfig,
};
use layerd::tensor::{Target, Tensor};

pub fn run(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let guard = Store::start(limits());
        let store = guard.store();
        let owner = Principal::default();
        if VALID.get().is_none() {
            let valid = valid_value(&store, &owner).await;
            let _ = VALID.set(valid);
        }
        let valid = VALID.get().expect("set above");
        for value in [data.to_vec(), splice(valid, data)] {
            let Ok(stored) = kept::decode(&value) else {
                continue;
            };
            let target = session(&store, &owner, "target").await;
            if kept::restore(&target, stored).await.is_ok() {
                backward_all(&target).await;
            }
            store.close(&owner, "target").unwrap();
        }
    });
}

/// The generous limits both parts of the target run under.
pub fn limits() -> Limits {
    Limits {
        max_sessions: 4,
        max_layers_per_session: 64,
        max_session_kept_bytes: 16 << 20,
        max_total_kept_bytes: 64 << 20,
        max_work_bytes: 16 << 20,
        default_idle_timeout: Duration::from_secs(60),
        max_idle_timeout: Duration::from_secs(60),
    }
}

/// The valid value: every layer's kept state after a Forward (made once);
/// it must decode and restore.
static VALID: OnceLock<Vec<u8>> = OnceLock::new();

async fn valid_value(store: &Store, owner: &Principal) -> Vec<u8> {
    let kept_by = session(store, owner, "kept").await;
    for (id, (x, t, eval)) in inputs() {
        let layer = kept_by.layer(id).unwrap();
        let options = ForwardOptions {
            t,
            eval,
            no_grad: false,
        };
        forward_on(&kept_by, &layer, x, options, &mut Phases::default())
            .await
            .unwrap();
    }
    let export = export_counted(&kept_by, HashMap::new(), true)
        .await
        .unwrap();
    let valid = kept::encode(export.kept);
    let target = session(store, owner, "target").await;
    let stored = kept::decode(&valid).expect("an encoded value decodes");
    kept::restore(&target, stored).await.expect("and restores");
    store.close(owner, "target").unwrap();
    store.close(owner, "kept").unwrap();
    valid
}

/// `valid` changed as `data` says: its first two bytes an offset, the third
/// what to do there (overwrite with the rest, truncate, insert the rest).
fn splice(valid: &[u8], data: &[u8]) -> Vec<u8> {
    let [a, b, how, rest @ ..] = data else {
        return valid.to_vec();
    };
    let at = usize::from(u16::from_le_bytes([*a, *b])) % (valid.len() + 1);
    let mut value = valid.to_vec();
    match how % 3 {
        0 => {
            let end = (at + rest.len()).min(value.len());
            value[at..end].copy_from_slice(&rest[..end - at]);
        }
        1 => value.truncate(at),
        _ => {
            value.splice(at..at, rest.iter().copied());
        }
    }
    value
}

/// Backward on every layer that has kept state: without dout (a loss), and
/// with one of the kept Forward's output shape.
async fn backward_all(session: &Session) {
    for (id, layer) in session.layers_by_id() {
        let output = {
            let state = layer.state.lock().await;
            state
                .kept
                .as_ref()
                .map(|k| (k.kept.wire(), k.kept.y_shape().to_vec()))
        };
        let Some((wire, shape)) = output else {
            continue;
        };
        let _ = backward_on(&layer, &id, None, true, &mut Phases::default()).await;
        let dout = filled(wire, &shape);
        let _ = backward_on(&layer, &id, Some(dout), true, &mut Phases::default()).await;
    }
}

fn filled(wire: Wire, shape: &[usize]) -> Tensor {
    let len: usize = shape.iter().product();
    let bytes: Vec<u8> = match wire {
        Wire::F32 => (0..len)
            .flat_map(|i| (i as f32 * 0.25 - 1.0).to_le_bytes())
            .collect(),
        Wire::F64 => (0..len)
            .flat_map(|i| (i as f64 * 0.25 - 1.0).to_le_bytes())
            .collect(),
        Wire::F16 | Wire::BF16 => (0..len)
            .flat_map(|i| (0x3c00u16 ^ i as u16).to_le_bytes())
            .collect(),
    };
    Tensor::from_bytes(wire, shape.to_vec(), len, Bytes::from(bytes), "x", "fuzz").unwrap()
}

async fn session(store: &Store, owner: &Principal, id: &str) -> Arc<Session> {
    let (id, _) = store.create(owner, id, 0).unwrap();
    let session = store.session(owner, &id).unwrap();
    for (layer_id, request) in layers() {
        session
            .create_layer(layer_id, new_layer(request).unwrap())
            .unwrap();
    }
    session
}

fn member(name: &str, kind: &str, config: Option<Config>) -> MemberConfig {
    MemberConfig {
        name: name.into(),
        kind: kind.into(),
        config,
        ..Default::default()
    }
}

fn layer(kind: &str, dtype: layerd::dtype::DType, config: Option<Config>) -> LayerRequest {
    LayerRequest {
        kind: kind.into(),
        dtype: Some(dtype),
        config,
        ..Default::default()
    }
}

fn layers() -> Vec<(&'static str, LayerRequest)> {
    use layerd::dtype::DType::{F32, F64};
    let net = SequentialConfig {
        layers: vec![
            member(
                "conv",
                "convolution",
                Some(Config::Convolution(ConvolutionConfig {
                    in_channels: 1,
                    out_channels: 2,
                    kernel_h: 3,
                    kernel_w: 3,
                    stride: 1,
                    pad: 1,
                    init: None,
                })),
            ),
            member(
                "bn",
                "batch_norm",
                Some(Config::BatchNorm(BatchNormConfig {
                    num_features: 2,
                    ..Default::default()
                })),
            ),
            member("relu", "relu", None),
            member(
                "pool",
                "pooling",
                Some(Config::Pooling(PoolingConfig {
                    pool_h: 2,
                    pool_w: 2,
                    stride: 2,
                    pad: 1,
                })),
            ),
            member(
                "drop",
                "dropout",
                Some(Config::Dropout(DropoutConfig {
                    ratio: Some(0.3),
                    seed: 7,
                })),
            ),
            member("sig", "sigmoid", None),
            member("id", "identity", None),
            member(
                "fc",
                "affine",
                Some(Config::Affine(AffineConfig {
                    in_features: 18,
                    out_features: 3,
                    init: None,
                })),
            ),
            member("loss", "softmax_with_loss", None),
        ],
    };
    let scores = SequentialConfig {
        layers: vec![
            member(
                "fc",
                "affine",
                Some(Config::Affine(AffineConfig {
                    in_features: 4,
                    out_features: 3,
                    init: None,
                })),
            ),
            member("loss", "softmax_with_loss", None),
        ],
    };
    let bn = Config::BatchNorm(BatchNormConfig {
        num_features: 3,
        ..Default::default()
    });
    vec![
        (
            "net",
            layer("sequential", F32, Some(Config::Sequential(net))),
        ),
        ("half", layer("relu", F32, None)),
        (
            "scores",
            layer("sequential", F64, Some(Config::Sequential(scores))),
        ),
        ("bn", layer("batch_norm", F32, Some(bn))),
    ]
}

type Input = (Tensor, Option<Target>, bool);

fn inputs() -> Vec<(&'static str, Input)> {
    let classes = Target::Classes(ndarray::arr1(&[0i64, 2]).into_shared());
    let probabilities = Target::Probabilities(filled(Wire::F64, &[2, 3]));
    vec![
        (
            "net",
            (filled(Wire::F32, &[2, 1, 5, 5]), Some(classes), false),
        ),
        ("half", (filled(Wire::F16, &[70]), None, false)),
        (
            "scores",
            (filled(Wire::F64, &[2, 4]), Some(probabilities), false),
        ),
        ("bn", (filled(Wire::F32, &[4, 3]), None, true)),
    ]
}
