//! The configuration types of [`super`]: what a client gives, before
//! validation, (de)serialised in checkpoints as layerd 0.1.0 wrote them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::tensor::Tensor;

/// A layer's hyperparameters: the one config its kind takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Config {
    Affine(AffineConfig),
    Dropout(DropoutConfig),
    BatchNorm(BatchNormConfig),
    Convolution(ConvolutionConfig),
    Pooling(PoolingConfig),
    Sequential(SequentialConfig),
}

/// How weights start. `method`: 0 (unspecified) or 1 He, 2 Xavier, 3 normal
/// with `std`; `seed` 0 means one from the operating system.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    pub method: i32,
    pub std: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffineConfig {
    pub in_features: u64,
    pub out_features: u64,
    pub init: Option<InitConfig>,
}

/// `ratio` in [0, 1), absent: 0.5; `seed` of the mask generator, 0: random.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropoutConfig {
    pub ratio: Option<f64>,
    pub seed: u64,
}

/// `momentum` absent: 0.9; `epsilon` absent: 1e-6 (inside the sqrt).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNormConfig {
    pub num_features: u64,
    pub momentum: Option<f64>,
    pub epsilon: Option<f64>,
}

/// `stride` 0 means 1; `pad` zeros on every side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvolutionConfig {
    pub in_channels: u64,
    pub out_channels: u64,
    pub kernel_h: u64,
    pub kernel_w: u64,
    pub stride: u64,
    pub pad: u64,
    pub init: Option<InitConfig>,
}

/// `stride` 0 means `pool_h`; `pad` -inf on every side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolingConfig {
    pub pool_h: u64,
    pub pool_w: u64,
    pub stride: u64,
    pub pad: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequentialConfig {
    pub layers: Vec<MemberConfig>,
}

/// A member of a sequential: a unique name, its kind and config, and initial
/// values the client gave it (never serialised: a checkpoint's values are
/// its tensors).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub name: String,
    pub kind: String,
    pub config: Option<Config>,
    #[serde(skip)]
    pub params: HashMap<String, Tensor>,
}

/// What CreateLayer asks for: a kind, its config, the dtype to compute in
/// (None: that of the values, else float32) and initial values by name.
#[derive(Debug, Clone, Default)]
pub struct LayerRequest {
    pub kind: String,
    pub dtype: Option<DType>,
    pub config: Option<Config>,
    pub params: HashMap<String, Tensor>,
}

/// An optimizer's algorithm and hyperparameters as the client gave them
/// (unset: the classic defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AlgorithmConfig {
    Sgd {
        lr: Option<f64>,
    },
    Momentum {
        lr: Option<f64>,
        momentum: Option<f64>,
    },
    Adagrad {
        lr: Option<f64>,
    },
    Adam {
        lr: Option<f64>,
        beta1: Option<f64>,
        beta2: Option<f64>,
    },
}
