//! Layer and optimizer specifications: the configuration a client gives
//! (kind, config, dtype, initial values; an algorithm and its
//! hyperparameters) as the core's own types, and their validation into a
//! [`Chain`] and its values, or an [`Algorithm`], or an INVALID_ARGUMENT
//! naming the field (`config.convolution.kernel_h`,
//! `config.sequential.layers[2].name`, `params["W"]`, `adam.beta1`).
//!
//! The config types are serde types: a checkpoint's manifest records each
//! layer's [`Recipe`] and each optimizer's [`AlgorithmConfig`] as JSON, in
//! the layout layerd 0.1.0 wrote (`{"affine": {"in_features": 784, …}}`,
//! `{"adam": {"lr": 0.001, …}}`), and reads them back through the same
//! validation as CreateLayer and CreateOptimizer. The wire messages map onto
//! them at the edge ([`crate::api::spec`]).
//!
//! Nothing is allocated from the config here: the caller checks the bytes the
//! chain will hold against the budgets first ([`Chain::held_bytes`]).

use std::collections::HashMap;

use crate::dtype::DType;
use crate::error::Error;
use crate::layers::{
    batch_norm, convolution, init, Affine, BatchNorm, Chain, Convolution, Dropout, Kind, Member,
    Pool, Spec,
};
use crate::optimizers::Algorithm;
use crate::tensor::Tensor;

mod config;
pub use config::{
    AffineConfig, AlgorithmConfig, BatchNormConfig, Config, ConvolutionConfig, DropoutConfig,
    InitConfig, LayerRequest, MemberConfig, PoolingConfig, SequentialConfig,
};

/// A layer to create: its math, the values the client gave, and its recipe.
#[derive(Debug)]
pub struct NewLayer {
    pub chain: Chain,
    pub params: HashMap<String, Tensor>,
    pub recipe: Recipe,
}

/// A layer's specification as the client gave it (kind, config; the dtype is
/// the chain's), without its values: what an exported checkpoint records to
/// create the layer again through [`new_layer`].
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub kind: String,
    pub config: Option<Config>,
}

impl Recipe {
    /// The recipe of a kind without a config (the KServe models' layers).
    pub fn plain(kind: Kind) -> Recipe {
        Recipe {
            kind: kind.name().to_string(),
            config: None,
        }
    }
}

/// Validates everything a [`LayerRequest`] says about the layer.
pub fn new_layer(request: LayerRequest) -> Result<NewLayer, Error> {
    let LayerRequest {
        kind: kind_name,
        dtype,
        mut config,
        mut params,
    } = request;
    let kind = Kind::from_name(&kind_name).ok_or_else(|| {
        Error::invalid(
            "kind",
            format!("one of {}", Kind::names()),
            format!("{kind_name:?}"),
            "UNKNOWN_KIND",
        )
    })?;
    let chain_members = if kind == Kind::Sequential {
        let Some(Config::Sequential(sequential)) = &config else {
            return Err(wrong_config(kind, config.as_ref(), "config.sequential"));
        };
        Some(members(sequential, &mut params)?)
    } else {
        None
    };
    let dtype = values_dtype(dtype, &params)?;
    let chain = match chain_members {
        Some(members) => Chain::sequential(members, dtype),
        None => Chain::single(spec(kind, config.as_ref(), "config")?, dtype),
    };
    chain.check_values(&params, "params")?;
    if let Some(Config::Sequential(sequential)) = config.as_mut() {
        // Their values are the layer's, named "<member>.<name>".
        for member in &mut sequential.layers {
            member.params.clear();
        }
    }
    Ok(NewLayer {
        chain,
        params,
        recipe: Recipe {
            kind: kind_name,
            config,
        },
    })
}

/// Validates an optimizer's algorithm and hyperparameters (the defaults of
/// the classic optimizers where unset).
pub fn algorithm(config: Option<&AlgorithmConfig>) -> Result<Algorithm, Error> {
    let lr = |lr: Option<f64>, default: f64, field: &str| {
        let lr = lr.unwrap_or(default);
        if lr.is_finite() && lr > 0.0 {
            return Ok(lr);
        }
        Err(Error::invalid(
            format!("{field}.lr"),
            "a finite learning rate > 0",
            format!("{lr}"),
            "INVALID_CONFIG",
        ))
    };
    // momentum and the betas: decay rates in [0, 1).
    let rate = |value: Option<f64>, default: f64, field: String| {
        let value = value.unwrap_or(default);
        if (0.0..1.0).contains(&value) {
            return Ok(value);
        }
        Err(Error::invalid(
            field,
            "a rate in [0, 1)",
            format!("{value}"),
            "INVALID_CONFIG",
        ))
    };
    Ok(match config.copied() {
        Some(AlgorithmConfig::Sgd { lr: l }) => Algorithm::Sgd {
            lr: lr(l, 0.01, "sgd")?,
        },
        Some(AlgorithmConfig::Momentum { lr: l, momentum }) => Algorithm::Momentum {
            lr: lr(l, 0.01, "momentum")?,
            momentum: rate(momentum, 0.9, "momentum.momentum".into())?,
        },
        Some(AlgorithmConfig::Adagrad { lr: l }) => Algorithm::AdaGrad {
            lr: lr(l, 0.01, "adagrad")?,
        },
        Some(AlgorithmConfig::Adam {
            lr: l,
            beta1,
            beta2,
        }) => Algorithm::Adam {
            lr: lr(l, 0.001, "adam")?,
            beta1: rate(beta1, 0.9, "adam.beta1".into())?,
            beta2: rate(beta2, 0.999, "adam.beta2".into())?,
        },
        None => {
            return Err(Error::invalid(
                "algorithm",
                "one of sgd, momentum, adagrad, adam",
                "none (field not set)",
                "MISSING_ALGORITHM",
            ))
        }
    })
}

impl AlgorithmConfig {
    /// `algorithm` with every hyperparameter set (the inverse of
    /// [`algorithm`]).
    pub fn of(algorithm: &Algorithm) -> AlgorithmConfig {
        match *algorithm {
            Algorithm::Sgd { lr } => AlgorithmConfig::Sgd { lr: Some(lr) },
            Algorithm::Momentum { lr, momentum } => AlgorithmConfig::Momentum {
                lr: Some(lr),
                momentum: Some(momentum),
            },
            Algorithm::AdaGrad { lr } => AlgorithmConfig::Adagrad { lr: Some(lr) },
            Algorithm::Adam { lr, beta1, beta2 } => AlgorithmConfig::Adam {
                lr: Some(lr),
                beta1: Some(beta1),
                beta2: Some(beta2),
            },
        }
    }
}

/// The layer's dtype: the requested one, else that of the given values; all
/// given values must have it.
fn values_dtype(
    requested: Option<DType>,
    params: &HashMap<String, Tensor>,
) -> Result<Option<DType>, Error> {
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    let mut dtype = requested;
    for name in names {
        let got = params[name].dtype();
        match dtype {
            None => dtype = Some(got),
            Some(want) if want != got => {
                let why = if requested.is_some() {
                    "the request's dtype"
                } else {
                    "the dtype of the other params"
                };
                return Err(Error::invalid(
                    format!("params[{name:?}].dtype"),
                    format!("{} ({why})", want.proto_name()),
                    got.proto_name(),
                    "PARAM_MISMATCH",
                ));
            }
            Some(_) => {}
        }
    }
    Ok(dtype)
}

/// A sequential's members; their `params` join `params` as `<name>.<param>`.
fn members(
    config: &SequentialConfig,
    params: &mut HashMap<String, Tensor>,
) -> Result<Vec<Member>, Error> {
    if config.layers.is_empty() {
        return Err(Error::invalid(
            "config.sequential.layers",
            "at least one member",
            "none",
            "INVALID_CONFIG",
        ));
    }
    let mut out: Vec<Member> = Vec::new();
    for (i, layer) in config.layers.iter().enumerate() {
        let field = format!("config.sequential.layers[{i}]");
        let valid_name = (1..=64).contains(&layer.name.len())
            && layer
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(Error::invalid(
                format!("{field}.name"),
                "1 to 64 characters of [A-Za-z0-9_-]",
                format!("{:?}", layer.name),
                "INVALID_CONFIG",
            ));
        }
        if out.iter().any(|m| m.name == layer.name) {
            return Err(Error::invalid(
                format!("{field}.name"),
                "a name unique in the sequential",
                format!("{:?}, already a member", layer.name),
                "INVALID_CONFIG",
            ));
        }
        let kind = Kind::from_name(&layer.kind).ok_or_else(|| {
            Error::invalid(
                format!("{field}.kind"),
                format!("one of {}", Kind::names()),
                format!("{:?}", layer.kind),
                "UNKNOWN_KIND",
            )
        })?;
        if kind == Kind::Sequential {
            return Err(Error::invalid(
                format!("{field}.kind"),
                "a kind other than sequential (no sequential inside a sequential)",
                "\"sequential\"",
                "INVALID_CONFIG",
            ));
        }
        if let Some(last) = out.last() {
            if last.spec.is_loss() {
                return Err(Error::invalid(
                    field.to_string(),
                    format!("no member after the loss layer {:?}", last.name),
                    format!("member {:?}", layer.name),
                    "INVALID_CONFIG",
                ));
            }
        }
        let spec = spec(kind, layer.config.as_ref(), &format!("{field}.config"))?;
        for (name, value) in layer.params.clone() {
            let full = format!("{}.{name}", layer.name);
            if params.insert(full.clone(), value).is_some() {
                return Err(Error::invalid(
                    format!("params[{full:?}]"),
                    "each value given once",
                    format!("a value here and in {field}.params"),
                    "INVALID_CONFIG",
                ));
            }
        }
        out.push(Member {
            name: layer.name.clone(),
            spec,
        });
    }
    Ok(out)
}

/// The config member `kind` needs, as a [`Spec`]; `field` names the config.
fn spec(kind: Kind, config: Option<&Config>, field: &str) -> Result<Spec, Error> {
    if let Some(spec) = Spec::unconfigured(kind) {
        return match config {
            None => Ok(spec),
            Some(config) => Err(Error::invalid(
                format!("{field}.{}", member_name(config)),
                format!("no config: a {kind} layer has no hyperparameters"),
                "a config",
                "INVALID_CONFIG",
            )),
        };
    }
    let positive = |value: u64, name: &str| -> Result<usize, Error> {
        match usize::try_from(value) {
            Ok(v) if v >= 1 => Ok(v),
            _ => Err(Error::invalid(
                format!("{field}.{}.{name}", kind.name()),
                "≥ 1",
                format!("{value}"),
                "INVALID_CONFIG",
            )),
        }
    };
    let size = |value: u64, name: &str| -> Result<usize, Error> {
        usize::try_from(value).map_err(|_| {
            Error::invalid(
                format!("{field}.{}.{name}", kind.name()),
                "an addressable size",
                format!("{value}"),
                "INVALID_CONFIG",
            )
        })
    };
    let here = |name: &str| format!("{field}.{}.{name}", kind.name());
    Ok(match (kind, config) {
        (Kind::Affine, Some(Config::Affine(c))) => Spec::Affine(Affine {
            in_features: positive(c.in_features, "in_features")?,
            out_features: positive(c.out_features, "out_features")?,
            init: weights_init(c.init.as_ref(), &here("init"))?,
        }),
        (Kind::Convolution, Some(Config::Convolution(c))) => Spec::Convolution(Convolution {
            in_channels: positive(c.in_channels, "in_channels")?,
            out_channels: positive(c.out_channels, "out_channels")?,
            kernel: (
                positive(c.kernel_h, "kernel_h")?,
                positive(c.kernel_w, "kernel_w")?,
            ),
            geometry: convolution::Geometry {
                stride: positive(c.stride.max(1), "stride")?,
                pad: size(c.pad, "pad")?,
            },
            init: weights_init(c.init.as_ref(), &here("init"))?,
        }),
        (Kind::Pooling, Some(Config::Pooling(c))) => {
            let pool_h = positive(c.pool_h, "pool_h")?;
            let pool_w = positive(c.pool_w, "pool_w")?;
            let stride = if c.stride == 0 {
                pool_h
            } else {
                positive(c.stride, "stride")?
            };
            let pad = size(c.pad, "pad")?;
            if pad >= pool_h.min(pool_w) {
                return Err(Error::invalid(
                    here("pad"),
                    format!(
                        "< pool_h and pool_w ({pool_h}, {pool_w}): a window of padding alone has no input to win"
                    ),
                    format!("{pad}"),
                    "INVALID_CONFIG",
                ));
            }
            Spec::Pooling(Pool {
                pool_h,
                pool_w,
                stride,
                pad,
            })
        }
        (Kind::BatchNorm, Some(Config::BatchNorm(c))) => {
            let momentum = c.momentum.unwrap_or(0.9);
            let epsilon = c.epsilon.unwrap_or(1e-6);
            if !momentum.is_finite() {
                return Err(Error::invalid(
                    here("momentum"),
                    "a finite number",
                    format!("{momentum}"),
                    "INVALID_CONFIG",
                ));
            }
            if !(epsilon.is_finite() && epsilon >= 0.0) {
                return Err(Error::invalid(
                    here("epsilon"),
                    "a finite number ≥ 0",
                    format!("{epsilon}"),
                    "INVALID_CONFIG",
                ));
            }
            Spec::BatchNorm(BatchNorm {
                features: positive(c.num_features, "num_features")?,
                settings: batch_norm::Settings { momentum, epsilon },
            })
        }
        (Kind::Dropout, Some(Config::Dropout(c))) => {
            let ratio = c.ratio.unwrap_or(0.5);
            if !(0.0..1.0).contains(&ratio) {
                return Err(Error::invalid(
                    here("ratio"),
                    "a ratio in [0, 1)",
                    format!("{ratio}"),
                    "INVALID_CONFIG",
                ));
            }
            Spec::Dropout(Dropout {
                ratio,
                seed: seed_or_random(c.seed),
            })
        }
        (kind, config) => {
            return Err(wrong_config(
                kind,
                config,
                &format!("{field}.{}", kind.name()),
            ))
        }
    })
}

/// The error for a config member that is not the kind's (or is missing).
fn wrong_config(kind: Kind, config: Option<&Config>, field: &str) -> Error {
    let got = match config {
        None => "none (field not set)".to_string(),
        Some(config) => format!("config.{}", member_name(config)),
    };
    let wanted = field.rsplit('.').next().unwrap_or(field);
    Error::invalid(
        field,
        format!("the {wanted} config of a {kind} layer"),
        got,
        "INVALID_CONFIG",
    )
}

fn member_name(config: &Config) -> &'static str {
    match config {
        Config::Affine(_) => "affine",
        Config::Dropout(_) => "dropout",
        Config::BatchNorm(_) => "batch_norm",
        Config::Convolution(_) => "convolution",
        Config::Pooling(_) => "pooling",
        Config::Sequential(_) => "sequential",
    }
}

fn weights_init(init: Option<&InitConfig>, field: &str) -> Result<init::Init, Error> {
    let default = InitConfig::default();
    let init = init.unwrap_or(&default);
    let method = match init.method {
        0 | 1 => init::Method::He,
        2 => init::Method::Xavier,
        3 => {
            if !(init.std.is_finite() && init.std > 0.0) {
                return Err(Error::invalid(
                    format!("{field}.std"),
                    "a finite standard deviation > 0 for NORMAL",
                    format!("{}", init.std),
                    "INVALID_CONFIG",
                ));
            }
            init::Method::Normal(init.std)
        }
        _ => {
            return Err(Error::invalid(
                format!("{field}.method"),
                "HE (1), XAVIER (2), NORMAL (3) or METHOD_UNSPECIFIED (0)",
                format!("{}", init.method),
                "INVALID_CONFIG",
            ))
        }
    };
    Ok(init::Init {
        method,
        seed: seed_or_random(init.seed),
    })
}

/// A client's seed, or one from the operating system for 0.
fn seed_or_random(seed: u64) -> u64 {
    if seed != 0 {
        return seed;
    }
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    u64::from_le_bytes(bytes).max(1)
}
