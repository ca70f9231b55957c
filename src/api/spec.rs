//! `layerd.v1`'s layer and optimizer messages onto the core's
//! specifications ([`crate::spec`]): the mapping is field for field; values
//! and dtypes are decoded here (naming their fields), everything else is
//! validated by the core.

use std::collections::HashMap;

use crate::dtype::DType;
use crate::error::Error;
use crate::optimizers::Algorithm;
use crate::pb::{self, layer_config::Config as WireConfig};
use crate::spec::{
    self, AffineConfig, AlgorithmConfig, BatchNormConfig, Config, ConvolutionConfig, DropoutConfig,
    InitConfig, LayerRequest, MemberConfig, NewLayer, PoolingConfig, SequentialConfig,
};
use crate::tensor::Tensor;

/// Validates everything a CreateLayerRequest says about the layer.
pub fn new_layer(request: &pb::CreateLayerRequest) -> Result<NewLayer, Error> {
    let params = tensors(&request.params, "params", "")?;
    let dtype = requested_dtype(request.dtype)?;
    let config = layer_config(request.config.as_ref(), "config")?;
    spec::new_layer(LayerRequest {
        kind: request.kind.clone(),
        dtype,
        config,
        params,
    })
}

/// Validates a CreateOptimizerRequest's algorithm and hyperparameters.
pub fn algorithm(request: &pb::CreateOptimizerRequest) -> Result<Algorithm, Error> {
    spec::algorithm(request.algorithm.as_ref().map(algorithm_config).as_ref())
}

fn algorithm_config(wire: &pb::create_optimizer_request::Algorithm) -> AlgorithmConfig {
    use pb::create_optimizer_request::Algorithm as Wire;
    match wire {
        Wire::Sgd(c) => AlgorithmConfig::Sgd { lr: c.lr },
        Wire::Momentum(c) => AlgorithmConfig::Momentum {
            lr: c.lr,
            momentum: c.momentum,
        },
        Wire::Adagrad(c) => AlgorithmConfig::Adagrad { lr: c.lr },
        Wire::Adam(c) => AlgorithmConfig::Adam {
            lr: c.lr,
            beta1: c.beta1,
            beta2: c.beta2,
        },
    }
}

/// A layer's config (`field`), its members' values decoded.
fn layer_config(config: Option<&pb::LayerConfig>, field: &str) -> Result<Option<Config>, Error> {
    let Some(config) = config.and_then(|c| c.config.as_ref()) else {
        return Ok(None);
    };
    let init = |init: &Option<pb::Init>| {
        init.as_ref().map(|i| InitConfig {
            method: i.method,
            std: i.std,
            seed: i.seed,
        })
    };
    Ok(Some(match config {
        WireConfig::Affine(c) => Config::Affine(AffineConfig {
            in_features: c.in_features,
            out_features: c.out_features,
            init: init(&c.init),
        }),
        WireConfig::Dropout(c) => Config::Dropout(DropoutConfig {
            ratio: c.ratio,
            seed: c.seed,
        }),
        WireConfig::BatchNorm(c) => Config::BatchNorm(BatchNormConfig {
            num_features: c.num_features,
            momentum: c.momentum,
            epsilon: c.epsilon,
        }),
        WireConfig::Convolution(c) => Config::Convolution(ConvolutionConfig {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            kernel_h: c.kernel_h,
            kernel_w: c.kernel_w,
            stride: c.stride,
            pad: c.pad,
            init: init(&c.init),
        }),
        WireConfig::Pooling(c) => Config::Pooling(PoolingConfig {
            pool_h: c.pool_h,
            pool_w: c.pool_w,
            stride: c.stride,
            pad: c.pad,
        }),
        WireConfig::Sequential(c) => {
            let mut layers = Vec::with_capacity(c.layers.len());
            for (i, member) in c.layers.iter().enumerate() {
                let at = format!("{field}.sequential.layers[{i}]");
                layers.push(MemberConfig {
                    name: member.name.clone(),
                    kind: member.kind.clone(),
                    config: layer_config(member.config.as_ref(), &format!("{at}.config"))?,
                    params: tensors(&member.params, &format!("{at}.params"), "")?,
                });
            }
            Config::Sequential(SequentialConfig { layers })
        }
    }))
}

/// Wire tensors by name, validated; member values are prefixed `prefix`.
fn tensors(
    map: &HashMap<String, pb::Tensor>,
    field: &str,
    prefix: &str,
) -> Result<HashMap<String, Tensor>, Error> {
    map.iter()
        .map(|(name, t)| {
            let tensor = Tensor::from_proto(Some(t.clone()), &format!("{field}[{name:?}]"))?;
            Ok((format!("{prefix}{name}"), tensor.into_computed()))
        })
        .collect()
}

/// The request's `dtype` (the one it computes in: float32 for a half type):
/// None for UNSPECIFIED.
fn requested_dtype(value: i32) -> Result<Option<DType>, Error> {
    match pb::DType::try_from(value) {
        Ok(pb::DType::DtypeUnspecified) => Ok(None),
        Ok(pb::DType::DtypeFloat32 | pb::DType::DtypeFloat16 | pb::DType::DtypeBfloat16) => {
            Ok(Some(DType::F32))
        }
        Ok(pb::DType::DtypeFloat64) => Ok(Some(DType::F64)),
        _ => Err(Error::invalid(
            "dtype",
            "DTYPE_FLOAT32 (1), DTYPE_FLOAT64 (2), DTYPE_FLOAT16 (4), DTYPE_BFLOAT16 (5) or DTYPE_UNSPECIFIED (0)",
            format!("{value}"),
            "INVALID_CONFIG",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pb::layer_config::Config;

    fn request(kind: &str, config: Option<Config>) -> pb::CreateLayerRequest {
        pb::CreateLayerRequest {
            session_id: "s".into(),
            layer_id: "l".into(),
            kind: kind.into(),
            config: config.map(|c| pb::LayerConfig { config: Some(c) }),
            ..Default::default()
        }
    }

    fn field_of(result: Result<NewLayer, Error>) -> String {
        match result.unwrap_err() {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("not an invalid argument: {other}"),
        }
    }

    #[test]
    fn config_errors_name_their_field() {
        let conv = |kernel_h| {
            Config::Convolution(pb::ConvolutionConfig {
                in_channels: 1,
                out_channels: 2,
                kernel_h,
                kernel_w: 3,
                ..Default::default()
            })
        };
        assert!(new_layer(&request("convolution", Some(conv(3)))).is_ok());
        assert_eq!(
            field_of(new_layer(&request("convolution", Some(conv(0))))),
            "config.convolution.kernel_h"
        );
        assert_eq!(
            field_of(new_layer(&request("affine", None))),
            "config.affine"
        );
        assert_eq!(
            field_of(new_layer(&request("relu", Some(conv(3))))),
            "config.convolution"
        );
        let dropout = Config::Dropout(pb::DropoutConfig {
            ratio: Some(1.0),
            seed: 1,
        });
        assert_eq!(
            field_of(new_layer(&request("dropout", Some(dropout)))),
            "config.dropout.ratio"
        );
        let pooling = Config::Pooling(pb::PoolingConfig {
            pool_h: 2,
            pool_w: 2,
            stride: 0,
            pad: 2,
        });
        assert_eq!(
            field_of(new_layer(&request("pooling", Some(pooling)))),
            "config.pooling.pad"
        );
    }

    #[test]
    fn sequential_members_are_checked() {
        let member = |name: &str, kind: &str| pb::LayerSpec {
            name: name.into(),
            kind: kind.into(),
            ..Default::default()
        };
        let sequential = |layers| {
            request(
                "sequential",
                Some(Config::Sequential(pb::SequentialConfig { layers })),
            )
        };
        assert!(new_layer(&sequential(vec![
            member("a", "relu"),
            member("b", "softmax_with_loss")
        ]))
        .is_ok());
        assert_eq!(
            field_of(new_layer(&sequential(vec![
                member("a", "relu"),
                member("a", "relu")
            ]))),
            "config.sequential.layers[1].name"
        );
        assert_eq!(
            field_of(new_layer(&sequential(vec![member("a", "sequential")]))),
            "config.sequential.layers[0].kind"
        );
        assert_eq!(
            field_of(new_layer(&sequential(vec![
                member("l", "softmax_with_loss"),
                member("r", "relu")
            ]))),
            "config.sequential.layers[1]"
        );
        assert_eq!(
            field_of(new_layer(&sequential(vec![member("a b", "relu")]))),
            "config.sequential.layers[0].name"
        );
        assert_eq!(
            field_of(new_layer(&sequential(vec![]))),
            "config.sequential.layers"
        );
    }

    #[test]
    fn a_huge_affine_is_described_without_allocating() {
        let affine = Config::Affine(pb::AffineConfig {
            in_features: 1_000_000,
            out_features: 1_000_000,
            init: None,
        });
        let layer = new_layer(&request("affine", Some(affine))).unwrap();
        // W, its gradient, b and its gradient, in float32.
        assert_eq!(
            layer.chain.held_bytes(),
            (1_000_000_000_000 + 1_000_000) * 4 * 2
        );
    }
}
