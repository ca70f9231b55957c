//! The registry of kinds: [`Kind`] (every kind by name, the one list the
//! server, the tools and the fuzz targets use), [`Spec`] (a configured kind)
//! and the dispatch from them to each kind's [`Layer`] (`with_spec!`, and
//! `with_float!` from a dtype to its element type).

use std::fmt;

use super::Slot;
use super::{
    Affine, BatchNorm, Convolution, Dropout, Identity, Layer, Pool, Relu, Sigmoid, SoftmaxWithLoss,
};

/// The layer kinds this server offers, by name (sorted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Affine,
    BatchNorm,
    Convolution,
    Dropout,
    Identity,
    Pooling,
    Relu,
    Sequential,
    Sigmoid,
    SoftmaxWithLoss,
}

const SEQUENTIAL_NAME: &str = "sequential";
const SEQUENTIAL_DESCRIPTION: &str = "Sequential: members run in order on Forward and in reverse on Backward, under one call; the last may be a softmax_with_loss (without t, Forward stops before it and answers the scores). Parameters named <member>.<name>. Keeps what each member keeps.";

impl Kind {
    /// Every kind, sorted by name: the one list the registry,
    /// ListLayerKinds, the tools and the fuzz targets use.
    pub const ALL: [Kind; 10] = [
        Kind::Affine,
        Kind::BatchNorm,
        Kind::Convolution,
        Kind::Dropout,
        Kind::Identity,
        Kind::Pooling,
        Kind::Relu,
        Kind::Sequential,
        Kind::Sigmoid,
        Kind::SoftmaxWithLoss,
    ];

    /// The kinds without parameters, config or target, whose output has the
    /// input's shape: the ones KServe serves as models, and the load
    /// generator's elementwise modes.
    pub const ELEMENTWISE: [Kind; 3] = [Kind::Identity, Kind::Relu, Kind::Sigmoid];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Affine => Affine::NAME,
            Kind::BatchNorm => BatchNorm::NAME,
            Kind::Convolution => Convolution::NAME,
            Kind::Dropout => Dropout::NAME,
            Kind::Identity => Identity::NAME,
            Kind::Pooling => Pool::NAME,
            Kind::Relu => Relu::NAME,
            Kind::Sequential => SEQUENTIAL_NAME,
            Kind::Sigmoid => Sigmoid::NAME,
            Kind::SoftmaxWithLoss => SoftmaxWithLoss::NAME,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Kind::Affine => Affine::DESCRIPTION,
            Kind::BatchNorm => BatchNorm::DESCRIPTION,
            Kind::Convolution => Convolution::DESCRIPTION,
            Kind::Dropout => Dropout::DESCRIPTION,
            Kind::Identity => Identity::DESCRIPTION,
            Kind::Pooling => Pool::DESCRIPTION,
            Kind::Relu => Relu::DESCRIPTION,
            Kind::Sequential => SEQUENTIAL_DESCRIPTION,
            Kind::Sigmoid => Sigmoid::DESCRIPTION,
            Kind::SoftmaxWithLoss => SoftmaxWithLoss::DESCRIPTION,
        }
    }

    /// The kind called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The known names, comma-separated, for error messages.
    pub fn names() -> String {
        Kind::ALL.map(Kind::name).join(", ")
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One configured layer (a member of a [`Chain`]): its kind and validated
/// hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Affine(Affine),
    BatchNorm(BatchNorm),
    Convolution(Convolution),
    Dropout(Dropout),
    Identity(Identity),
    Pooling(Pool),
    Relu(Relu),
    Sigmoid(Sigmoid),
    SoftmaxWithLoss(SoftmaxWithLoss),
}

/// Expands `$body` with `$l` bound to the spec's [`Layer`] value.
macro_rules! with_spec {
    ($spec:expr, $l:ident => $body:expr) => {
        match $spec {
            $crate::layers::Spec::Affine($l) => $body,
            $crate::layers::Spec::BatchNorm($l) => $body,
            $crate::layers::Spec::Convolution($l) => $body,
            $crate::layers::Spec::Dropout($l) => $body,
            $crate::layers::Spec::Identity($l) => $body,
            $crate::layers::Spec::Pooling($l) => $body,
            $crate::layers::Spec::Relu($l) => $body,
            $crate::layers::Spec::Sigmoid($l) => $body,
            $crate::layers::Spec::SoftmaxWithLoss($l) => $body,
        }
    };
}
pub(crate) use with_spec;

/// Expands `$body` with `$F` bound to the element type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $F:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $F = f32;
                $body
            }
            $crate::dtype::DType::F64 => {
                type $F = f64;
                $body
            }
        }
    };
}
pub(crate) use with_float;

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Affine(_) => Kind::Affine,
            Spec::BatchNorm(_) => Kind::BatchNorm,
            Spec::Convolution(_) => Kind::Convolution,
            Spec::Dropout(_) => Kind::Dropout,
            Spec::Identity(_) => Kind::Identity,
            Spec::Pooling(_) => Kind::Pooling,
            Spec::Relu(_) => Kind::Relu,
            Spec::Sigmoid(_) => Kind::Sigmoid,
            Spec::SoftmaxWithLoss(_) => Kind::SoftmaxWithLoss,
        }
    }

    /// The spec of a kind that takes no config, if `kind` is one.
    pub fn unconfigured(kind: Kind) -> Option<Spec> {
        match kind {
            Kind::Identity => Some(Spec::Identity(Identity)),
            Kind::Relu => Some(Spec::Relu(Relu)),
            Kind::Sigmoid => Some(Spec::Sigmoid(Sigmoid)),
            Kind::SoftmaxWithLoss => Some(Spec::SoftmaxWithLoss(SoftmaxWithLoss)),
            _ => None,
        }
    }

    pub fn slots(&self) -> Vec<Slot> {
        with_spec!(self, l => l.slots())
    }

    pub fn is_loss(&self) -> bool {
        with_spec!(self, l => l.is_loss())
    }

    /// Whether the layer draws random numbers (and so owns a generator).
    pub fn draws(&self) -> bool {
        matches!(self, Spec::Dropout(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_sorted() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_name("Relu"), None);
        let names = Kind::ALL.map(Kind::name);
        let mut sorted = names;
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(Kind::names().starts_with("affine, batch_norm, convolution"));
    }
}
