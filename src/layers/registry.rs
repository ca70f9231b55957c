//! The registry of kinds: [`Kind`] (every kind by name, the one list the
//! server, the tools and the fuzz targets use), [`Spec`] (a configured kind)
//! and the dispatch from them to each kind's [`Layer`] (`with_spec!`, and
//! `with_float!` from a dtype to its element type).
//!
//! Every kind is registered once, in the `kinds!` invocation below: its
//! [`Kind`] and [`Spec`] variant and its `impl Layer`, in name order. All
//! else a kind says of itself (name, description, slots, whether it takes a
//! config, draws random numbers or is a loss) comes from its `impl Layer`.

use std::fmt;

use super::Slot;
use super::{
    Affine, BatchNorm, Convolution, Dropout, Identity, Layer, Pool, Relu, Sigmoid, SoftmaxWithLoss,
};

/// What `sequential` is: not a kind of its own math, but members of the
/// others; it has a [`Kind`] and no [`Spec`].
const SEQUENTIAL_NAME: &str = "sequential";
const SEQUENTIAL_DESCRIPTION: &str = "Sequential: members run in order on Forward and in reverse on Backward, under one call; the last may be a softmax_with_loss (without t, Forward stops before it and answers the scores). Parameters named <member>.<name>. Keeps what each member keeps.";

/// Defines [`Kind`], [`Spec`], their tables and `with_spec!` from the kinds
/// sorted by name: those before `sequential`, then those after it (`$d` is a
/// `$`, for the macro it defines).
macro_rules! kinds {
    ($d:tt; [$($before:ident($lb:ident)),* $(,)?]; [$($after:ident($la:ident)),* $(,)?]) => {
        /// The layer kinds this server offers, by name (sorted).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Kind {
            $($before,)*
            Sequential,
            $($after,)*
        }

        /// One configured layer (a member of a [`crate::layers::Chain`]): its kind
        /// and validated hyperparameters.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Spec {
            $($before($lb),)*
            $($after($la),)*
        }

        impl Kind {
            /// Every kind, sorted by name: the one list the registry,
            /// ListLayerKinds, the tools and the fuzz targets use.
            pub const ALL: [Kind; [$(Kind::$before,)* Kind::Sequential, $(Kind::$after,)*].len()] =
                [$(Kind::$before,)* Kind::Sequential, $(Kind::$after,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$before => $lb::NAME,)*
                    Kind::Sequential => SEQUENTIAL_NAME,
                    $(Kind::$after => $la::NAME,)*
                }
            }

            pub fn description(self) -> &'static str {
                match self {
                    $(Kind::$before => $lb::DESCRIPTION,)*
                    Kind::Sequential => SEQUENTIAL_DESCRIPTION,
                    $(Kind::$after => $la::DESCRIPTION,)*
                }
            }
        }

        impl Spec {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Spec::$before(_) => Kind::$before,)*
                    $(Spec::$after(_) => Kind::$after,)*
                }
            }

            /// The spec of a kind that takes no config, if `kind` is one
            /// ([`Layer::unconfigured`]).
            pub fn unconfigured(kind: Kind) -> Option<Spec> {
                match kind {
                    $(Kind::$before => $lb::unconfigured().map(Spec::$before),)*
                    Kind::Sequential => None,
                    $(Kind::$after => $la::unconfigured().map(Spec::$after),)*
                }
            }
        }

        /// Expands `$body` with `$l` bound to the spec's [`Layer`] value.
        macro_rules! with_spec {
            ($d spec:expr, $d l:ident => $d body:expr) => {
                match $d spec {
                    $($crate::layers::Spec::$before($d l) => $d body,)*
                    $($crate::layers::Spec::$after($d l) => $d body,)*
                }
            };
        }
        pub(crate) use with_spec;
    };
}

kinds! {
    $;
    [
        Affine(Affine),
        BatchNorm(BatchNorm),
        Convolution(Convolution),
        Dropout(Dropout),
        Identity(Identity),
        Pooling(Pool),
        Relu(Relu),
    ];
    [
        Sigmoid(Sigmoid),
        SoftmaxWithLoss(SoftmaxWithLoss),
    ]
}

impl Kind {
    /// The kinds without parameters, config or target, whose output has the
    /// input's shape: the ones KServe serves as models, and the load
    /// generator's elementwise modes.
    pub const ELEMENTWISE: [Kind; 3] = [Kind::Identity, Kind::Relu, Kind::Sigmoid];

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
    pub fn slots(&self) -> Vec<Slot> {
        with_spec!(self, l => l.slots())
    }

    pub fn is_loss(&self) -> bool {
        with_spec!(self, l => l.is_loss())
    }

    /// The seed of the layer's generator, if it draws random numbers (and
    /// so owns one).
    pub fn seed(&self) -> Option<u64> {
        with_spec!(self, l => l.seed())
    }

    /// Whether the layer draws random numbers (and so owns a generator).
    pub fn draws(&self) -> bool {
        self.seed().is_some()
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
