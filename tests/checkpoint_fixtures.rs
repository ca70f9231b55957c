//! Checkpoints written by an earlier release still load, and training goes on
//! from them bit for bit.
//!
//! `tests/fixtures/checkpoints/` holds, per case, files exported by layerd
//! 0.1.0 (commit 9e1e148) and never rewritten by later code:
//! - `<case>.safetensors`: a session after [`STEPS`] TrainSteps from its
//!   seeded initial values;
//! - `<case>.after.safetensors`: that session imported and trained
//!   [`STEPS`] more steps on the same data (exported again);
//! - `<case>.losses`: the losses of those further steps, as the hex bits of
//!   each float64, one a line.
//!
//! The test imports each checkpoint into today's server, trains the same
//! steps, and compares every loss and every tensor of the export (parameters,
//! buffers, optimizer state) bit for bit, and the optimizer's step count.
//!
//! `LAYERD_WRITE_FIXTURES=1 cargo test --test checkpoint_fixtures` writes the
//! files anew: only to add a case, with a release whose files every later one
//! must read.

mod common;

use std::{collections::BTreeMap, path::PathBuf};

use common::{f32_tensor, f64_tensor, start, Client};
use layerd::pb::{self, layer_config::Config};

/// TrainSteps before the export, and again after the import.
const STEPS: usize = 3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints")
}

/// One training setup: a layer, an optimizer, and its data.
struct Case {
    name: &'static str,
    layer: pb::CreateLayerRequest,
    /// Plain layers beside it that no optimizer owns (their config and
    /// generator positions go through the checkpoint too).
    extra: Vec<pb::CreateLayerRequest>,
    optimizer: pb::create_optimizer_request::Algorithm,
    x_shape: Vec<u64>,
    classes: i64,
    float64: bool,
}

fn member(name: &str, kind: &str, config: Option<Config>) -> pb::LayerSpec {
    pb::LayerSpec {
        name: name.into(),
        kind: kind.into(),
        config: config.map(|config| pb::LayerConfig {
            config: Some(config),
        }),
        params: Default::default(),
    }
}

fn init(seed: u64) -> Option<pb::Init> {
    init_with(pb::init::Method::He, 0.0, seed)
}

fn init_with(method: pb::init::Method, std: f64, seed: u64) -> Option<pb::Init> {
    Some(pb::Init {
        method: method as i32,
        std,
        seed,
    })
}

/// An affine member `name` of `inputs` → `outputs` features.
fn affine(name: &str, inputs: u64, outputs: u64, init: Option<pb::Init>) -> pb::LayerSpec {
    member(
        name,
        "affine",
        Some(Config::Affine(pb::AffineConfig {
            in_features: inputs,
            out_features: outputs,
            init,
        })),
    )
}

fn sequential(dtype: pb::DType, members: Vec<pb::LayerSpec>) -> pb::CreateLayerRequest {
    pb::CreateLayerRequest {
        session_id: "s".into(),
        layer_id: "net".into(),
        kind: "sequential".into(),
        dtype: dtype as i32,
        config: Some(pb::LayerConfig {
            config: Some(Config::Sequential(pb::SequentialConfig { layers: members })),
        }),
        ..Default::default()
    }
}

fn plain(layer_id: &str, kind: &str, config: Config) -> pb::CreateLayerRequest {
    pb::CreateLayerRequest {
        session_id: "s".into(),
        layer_id: layer_id.into(),
        kind: kind.into(),
        dtype: pb::DType::DtypeFloat64 as i32,
        config: Some(pb::LayerConfig {
            config: Some(config),
        }),
        ..Default::default()
    }
}

fn cases() -> Vec<Case> {
    let convnet = sequential(
        pb::DType::DtypeFloat32,
        vec![
            member(
                "conv",
                "convolution",
                Some(Config::Convolution(pb::ConvolutionConfig {
                    in_channels: 1,
                    out_channels: 2,
                    kernel_h: 3,
                    kernel_w: 3,
                    stride: 1,
                    pad: 1,
                    init: init(11),
                })),
            ),
            member(
                "bn",
                "batch_norm",
                Some(Config::BatchNorm(pb::BatchNormConfig {
                    num_features: 2,
                    momentum: Some(0.8),
                    epsilon: None,
                })),
            ),
            member("relu", "relu", None),
            member(
                "pool",
                "pooling",
                Some(Config::Pooling(pb::PoolingConfig {
                    pool_h: 2,
                    pool_w: 2,
                    stride: 2,
                    pad: 0,
                })),
            ),
            affine("fc1", 18, 5, init(12)),
            member(
                "drop",
                "dropout",
                Some(Config::Dropout(pb::DropoutConfig {
                    ratio: Some(0.3),
                    seed: 13,
                })),
            ),
            affine("fc2", 5, 3, init(14)),
            member("loss", "softmax_with_loss", None),
        ],
    );
    let mlp = sequential(
        pb::DType::DtypeFloat64,
        vec![
            affine("fc1", 6, 8, init_with(pb::init::Method::Xavier, 0.0, 21)),
            member("act", "sigmoid", None),
            affine("fc2", 8, 4, init_with(pb::init::Method::Normal, 0.05, 22)),
            member("loss", "softmax_with_loss", None),
        ],
    );
    vec![
        Case {
            name: "convnet_f32_adam",
            layer: convnet,
            extra: Vec::new(),
            optimizer: pb::create_optimizer_request::Algorithm::Adam(pb::Adam {
                lr: Some(0.01),
                beta1: None,
                beta2: None,
            }),
            x_shape: vec![4, 1, 6, 6],
            classes: 3,
            float64: false,
        },
        Case {
            name: "mlp_f64_momentum",
            layer: mlp,
            extra: vec![
                plain(
                    "side",
                    "affine",
                    Config::Affine(pb::AffineConfig {
                        in_features: 3,
                        out_features: 2,
                        init: init(31),
                    }),
                ),
                plain(
                    "mask",
                    "dropout",
                    Config::Dropout(pb::DropoutConfig {
                        ratio: None,
                        seed: 32,
                    }),
                ),
            ],
            optimizer: pb::create_optimizer_request::Algorithm::Momentum(pb::Momentum {
                lr: Some(0.1),
                momentum: Some(0.9),
            }),
            x_shape: vec![5, 6],
            classes: 4,
            float64: true,
        },
    ]
}

/// Step `step`'s batch: values from a fixed formula, class ids cycling.
fn batch(case: &Case, step: usize) -> (pb::Tensor, pb::Tensor) {
    let len: u64 = case.x_shape.iter().product();
    let values: Vec<f64> = (0..len)
        .map(|i| ((i as f64 * 0.37 + step as f64 * 1.3).sin() * 2.0).round() / 2.0 + 0.25)
        .collect();
    let x = if case.float64 {
        f64_tensor(&case.x_shape, &values)
    } else {
        let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        f32_tensor(&case.x_shape, &values)
    };
    let n = case.x_shape[0] as i64;
    let ids: Vec<i64> = (0..n).map(|i| (i + step as i64) % case.classes).collect();
    let t = pb::Tensor {
        dtype: pb::DType::DtypeInt64 as i32,
        shape: vec![n as u64],
        data: bytemuck::cast_slice::<i64, u8>(&ids).to_vec().into(),
    };
    (x, t)
}

/// `STEPS` TrainSteps on session `s` from batch `first` on; their losses.
async fn train(client: &mut Client, case: &Case, first: usize) -> Vec<f64> {
    let mut losses = Vec::new();
    for step in first..first + STEPS {
        let (x, t) = batch(case, step);
        let answer = client
            .train_step(pb::TrainStepRequest {
                session_id: "s".into(),
                layer_id: "net".into(),
                optimizer_id: "opt".into(),
                x: Some(x),
                t: Some(t),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.steps, (step + 1) as u64, "{}", case.name);
        losses.push(answer.loss);
    }
    losses
}

async fn export(client: &mut Client) -> Vec<u8> {
    client
        .export_session(pb::ExportSessionRequest {
            session_id: "s".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .safetensors
}

/// Every tensor of a safetensors file by name: dtype, shape and bytes.
fn tensors(file: &[u8]) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let file = safetensors::SafeTensors::deserialize(file).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let entry = (
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
            (name, entry)
        })
        .collect()
}

fn losses_text(losses: &[f64]) -> String {
    losses
        .iter()
        .map(|loss| format!("{:016x}\n", loss.to_bits()))
        .collect()
}

/// Writes the case's files with this build (see the module doc).
async fn write(client: &mut Client, case: &Case) {
    client
        .create_session(pb::CreateSessionRequest {
            session_id: "s".into(),
            idle_timeout_seconds: 0,
        })
        .await
        .unwrap();
    for layer in std::iter::once(&case.layer).chain(&case.extra) {
        client.create_layer(layer.clone()).await.unwrap();
    }
    client
        .create_optimizer(pb::CreateOptimizerRequest {
            session_id: "s".into(),
            optimizer_id: "opt".into(),
            layer_ids: vec!["net".into()],
            algorithm: Some(case.optimizer),
        })
        .await
        .unwrap();
    train(client, case, 0).await;
    let before = export(client).await;
    let losses = train(client, case, STEPS).await;
    let after = export(client).await;
    let dir = fixtures();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{}.safetensors", case.name)), before).unwrap();
    std::fs::write(dir.join(format!("{}.after.safetensors", case.name)), after).unwrap();
    std::fs::write(
        dir.join(format!("{}.losses", case.name)),
        losses_text(&losses),
    )
    .unwrap();
    close(client).await;
}

async fn close(client: &mut Client) {
    client
        .close_session(pb::CloseSessionRequest {
            session_id: "s".into(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn checkpoints_of_the_first_release_import_and_train_on_bit_for_bit() {
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    for case in cases() {
        if std::env::var_os("LAYERD_WRITE_FIXTURES").is_some() {
            write(&mut client, &case).await;
        }
        let read = |suffix: &str| {
            let path = fixtures().join(format!("{}{suffix}", case.name));
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        client
            .import_session(pb::ImportSessionRequest {
                session_id: "s".into(),
                idle_timeout_seconds: 0,
                safetensors: read(".safetensors"),
            })
            .await
            .unwrap_or_else(|status| panic!("{}: {status:?}", case.name));
        let losses = train(&mut client, &case, STEPS).await;
        assert_eq!(
            losses_text(&losses),
            String::from_utf8(read(".losses")).unwrap(),
            "{}: losses",
            case.name
        );
        let (got, want) = (
            tensors(&export(&mut client).await),
            tensors(&read(".after.safetensors")),
        );
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{}",
            case.name
        );
        for (name, tensor) in &want {
            assert!(got[name] == *tensor, "{}: {name} differs", case.name);
        }
        close(&mut client).await;
    }
    server.stop().await;
}
