//! The stateless Forward of the elementwise kinds (ReLU, Sigmoid, Identity)
//! straight over little-endian bytes, in one pass from wherever a request's
//! elements arrived (the HTTP/2 frames of its message, a chunk of a
//! shared-memory region) into the answer's buffer.
//!
//! # Why
//! At 1 Mi float32 elements the work per call is moving bytes. A tensor
//! arrives in HTTP/2 frames at any alignment, so the layer could not view
//! it: the tensor was copied whole into aligned memory, then the layer read
//! that copy and wrote its answer, twice through memory the size of the
//! tensor. Here each element is read where it lies (unaligned vector loads)
//! and its answer written straight into the answer's buffer: the tensor's
//! bytes are read once and the answer's written once. (Gathering blocks into
//! aligned scratch first, then copying the answers out, measured nearly
//! twice the user CPU time per call.)
//!
//! # Numerics
//! The same kernels as the kinds' own Forward, element by element, in the
//! element's compute dtype: half types are widened to float32 and rounded
//! back to nearest even, as a half tensor's Forward does (ReLU masks their
//! 16-bit elements as they are, as its Forward does). The answer is bit for
//! bit the one [`crate::layers::Chain`] gives the whole tensor without keeping
//! anything (tested below on every dtype, special values and arbitrary cuts
//! of the input; the `kserve_request` fuzz target checks it too).

use std::mem::MaybeUninit;

use crate::dtype::Wire;
use crate::layers::{Float, Kind, Relu, Sigmoid};

/// A kind whose no_grad Forward maps each element on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elementwise {
    Identity,
    Relu,
    Sigmoid,
}

impl Elementwise {
    /// The elementwise kind `kind`, if it is one.
    pub fn of(kind: Kind) -> Option<Elementwise> {
        match kind {
            Kind::Identity => Some(Elementwise::Identity),
            Kind::Relu => Some(Elementwise::Relu),
            Kind::Sigmoid => Some(Elementwise::Sigmoid),
            _ => None,
        }
    }

    /// Appends to `out` the answer for the elements of `wire` whose
    /// little-endian bytes are the concatenation of `pieces` (cut anywhere,
    /// at any address; a whole number of elements in all).
    ///
    /// # Panics
    /// If the pieces do not hold a whole number of elements (a caller bug:
    /// lengths are validated against the shape first).
    pub fn forward_bytes<'a>(
        self,
        wire: Wire,
        pieces: impl IntoIterator<Item = &'a [u8]>,
        out: &mut Vec<u8>,
    ) {
        let size = wire.itemsize();
        // An element cut between two pieces, put together here.
        let mut carry = [0u8; 8];
        let mut carried = 0;
        for mut piece in pieces {
            if carried > 0 {
                let n = (size - carried).min(piece.len());
                carry[carried..carried + n].copy_from_slice(&piece[..n]);
                carried += n;
                piece = &piece[n..];
                if carried < size {
                    continue;
                }
                self.whole(wire, &carry[..size], out);
            }
            let whole = piece.len() / size * size;
            self.whole(wire, &piece[..whole], out);
            carried = piece.len() - whole;
            carry[..carried].copy_from_slice(&piece[whole..]);
        }
        assert_eq!(carried, 0, "the pieces end inside an element");
    }

    /// Appends the answer for `xs`, whole elements at any address.
    fn whole(self, wire: Wire, xs: &[u8], out: &mut Vec<u8>) {
        out.reserve(xs.len());
        let ys = &mut out.spare_capacity_mut()[..xs.len()];
        match (self, wire) {
            (Elementwise::Identity, Wire::F32 | Wire::F64) => {
                // Identity's answer is its input's bits (half types are
                // rounded through float32 like every half tensor, which
                // quiets a NaN).
                for (y, &x) in ys.iter_mut().zip(xs) {
                    y.write(x);
                }
            }
            (Elementwise::Relu, Wire::F32) => map_unaligned::<f32, _>(xs, ys, Relu::one),
            (Elementwise::Relu, Wire::F64) => map_unaligned::<f64, _>(xs, ys, Relu::one),
            (Elementwise::Sigmoid, Wire::F32) => map_unaligned::<f32, _>(xs, ys, Sigmoid::one),
            (Elementwise::Sigmoid, Wire::F64) => map_unaligned::<f64, _>(xs, ys, Sigmoid::one),
            (_, Wire::F16 | Wire::BF16) => self.halves(wire, xs, ys),
        }
        // SAFETY: every arm above wrote all `xs.len()` reserved bytes.
        unsafe { out.set_len(out.len() + xs.len()) };
    }

    /// The answer for half elements `xs` into `ys` (as long), through
    /// aligned scratch on the stack.
    fn halves(self, wire: Wire, xs: &[u8], ys: &mut [MaybeUninit<u8>]) {
        const CHUNK: usize = 512;
        let (mut halves, mut answers) = ([0u16; CHUNK], [0u16; CHUNK]);
        let (mut wide, mut y) = ([0f32; CHUNK], [0f32; CHUNK]);
        for (xs, ys) in xs.chunks(2 * CHUNK).zip(ys.chunks_mut(2 * CHUNK)) {
            let n = xs.len() / 2;
            bytemuck::cast_slice_mut::<u16, u8>(&mut halves[..n]).copy_from_slice(xs);
            if self == Elementwise::Relu {
                // As the chain: masked as they are (exact, see relu.rs).
                Relu::no_grad_halves(wire, &halves[..n], &mut answers[..n]);
            } else {
                // As a half tensor's Forward: widened, computed in float32,
                // rounded back to nearest even.
                wire.widen_halves(&halves[..n], &mut wide[..n]);
                match self {
                    Elementwise::Sigmoid => Sigmoid::y_slice(&wide[..n], &mut y[..n]),
                    _ => y[..n].copy_from_slice(&wide[..n]),
                }
                wire.round_to_halves(&y[..n], &mut answers[..n]);
            }
            for (y, &b) in ys
                .iter_mut()
                .zip(bytemuck::cast_slice::<u16, u8>(&answers[..n]))
            {
                y.write(b);
            }
        }
    }
}

/// `f` of each element of `xs` (native-endian `F`s at any address, as the
/// frames put them) into `ys`: one pass, vectorised with unaligned loads and
/// stores, so the input is read once and the answer written once.
#[multiversion::multiversion(targets = "simd")]
fn map_unaligned<F: Float, M: Fn(F) -> F>(xs: &[u8], ys: &mut [MaybeUninit<u8>], f: M) {
    let size = std::mem::size_of::<F>();
    assert_eq!(xs.len(), ys.len());
    for (x, y) in xs.chunks_exact(size).zip(ys.chunks_exact_mut(size)) {
        let value = f(bytemuck::pod_read_unaligned::<F>(x));
        // SAFETY: `y` is `size` bytes; the write needs no alignment.
        unsafe { std::ptr::write_unaligned(y.as_mut_ptr().cast::<F>(), value) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{Chain, MemberState, Spec};
    use crate::tensor::Tensor;
    use proptest::prelude::*;

    /// The chain's no_grad Forward of the whole tensor, as its answer's bytes.
    fn chain_answer(kind: Kind, wire: Wire, data: &[u8]) -> Vec<u8> {
        let chain = Chain::single(Spec::unconfigured(kind).unwrap(), None);
        let len = data.len() / wire.itemsize();
        let data = bytes::Bytes::copy_from_slice(data);
        let x = Tensor::from_bytes(wire, vec![len], len, data, "x.data", "x").unwrap();
        let plan = chain.plan(&x, None, false).unwrap();
        let y = chain
            .forward(&[MemberState::default()], &x, None, &plan, false, false)
            .y;
        y.wire_bytes().to_vec()
    }

    /// Elements with the special values at the front, then arbitrary bits.
    fn elements(wire: Wire, bits: &[u64]) -> Vec<u8> {
        let specials: [f64; 12] = [
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            1e-40,
            -1e-40,
            88.8,
            -104.0,
            710.0,
            -746.0,
        ];
        let mut out = Vec::new();
        for v in specials {
            match wire {
                Wire::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
                Wire::F64 => out.extend_from_slice(&v.to_le_bytes()),
                Wire::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
                Wire::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            }
        }
        for &b in bits {
            out.extend_from_slice(&b.to_le_bytes()[..wire.itemsize()]);
        }
        out
    }

    const WIRES: [Wire; 4] = [Wire::F32, Wire::F64, Wire::F16, Wire::BF16];
    const KINDS: [Kind; 3] = [Kind::Identity, Kind::Relu, Kind::Sigmoid];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any kind, dtype, length (across block boundaries) and cut of the
        /// input into pieces at any offset: the chain's bits.
        #[test]
        fn answers_what_the_chain_answers_for_any_cut(
            bits in proptest::collection::vec(any::<u64>(), 0..5000),
            cuts in proptest::collection::vec(0usize..20_000, 0..12),
            offset in 0usize..8,
        ) {
            for wire in WIRES {
                let data = elements(wire, &bits);
                // Misaligned on purpose: the pieces are views of this buffer.
                let mut buffer = vec![0u8; offset];
                buffer.extend_from_slice(&data);
                let data = &buffer[offset..];
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
                cuts.sort_unstable();
                let mut pieces = Vec::new();
                let mut at = 0;
                for c in cuts.into_iter().chain([data.len()]) {
                    pieces.push(&data[at..c]);
                    at = c;
                }
                for kind in KINDS {
                    let mut got = Vec::new();
                    Elementwise::of(kind).unwrap().forward_bytes(wire, pieces.iter().copied(), &mut got);
                    prop_assert_eq!(&got, &chain_answer(kind, wire, data), "{:?} {:?}", kind, wire);
                }
            }
        }
    }

    #[test]
    fn only_the_elementwise_kinds_have_one() {
        for kind in Kind::ALL {
            assert_eq!(
                Elementwise::of(kind).is_some(),
                Kind::ELEMENTWISE.contains(&kind),
                "{kind:?}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "inside an element")]
    fn a_partial_element_is_a_caller_bug() {
        Elementwise::Relu.forward_bytes(Wire::F32, [&[0u8; 6][..]], &mut Vec::new());
    }
}
