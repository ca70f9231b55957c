//! Kept state as plain arrays ([`Part`]s), so that what a Forward kept can
//! move to another replica with its session (a graceful handover, see
//! [`crate::durable`]) and Backward there answers as it would have here.
//!
//! Each kind lists its kept state as parts ([`Layer::save_kept`]) and builds
//! it back from them ([`Layer::load_kept`]) against the [`Plan`] of the
//! keeping Forward. Parts come from outside the process, so loading
//! validates every one through [`Parts`]: a part of the wrong type or shape,
//! one missing or one too many, or a value Backward would index with out of
//! range, is an error naming the part, expected and got — never a panic in
//! the Backward that follows.
//!
//! [`Layer::save_kept`]: super::Layer::save_kept
//! [`Layer::load_kept`]: super::Layer::load_kept
//! [`Plan`]: super::Plan

use ndarray::{Array1, ArrayD};

/// One array of a kind's kept state.
#[derive(Debug, Clone, PartialEq)]
pub enum Part<F> {
    /// Elements in the compute type (inputs, outputs, statistics).
    Floats(ArrayD<F>),
    /// A bitset, 64 elements per word, element `i` in bit `i % 64` of word
    /// `i / 64` (ReLU's and Dropout's masks).
    Bits(Vec<u64>),
    /// Positions in a window (Pooling's winners).
    Positions(ArrayD<u32>),
    /// Class ids (a loss's target).
    Classes(Array1<i64>),
}

impl<F> Part<F> {
    /// The part's type, as errors name it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Part::Floats(_) => "floats",
            Part::Bits(_) => "bits",
            Part::Positions(_) => "positions",
            Part::Classes(_) => "class ids",
        }
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            Part::Floats(a) => a.shape().to_vec(),
            Part::Bits(words) => vec![words.len()],
            Part::Positions(a) => a.shape().to_vec(),
            Part::Classes(a) => a.shape().to_vec(),
        }
    }
}

/// A kind's parts being loaded, taken in the order [`Layer::save_kept`]
/// listed them; each taker checks the part it takes.
///
/// [`Layer::save_kept`]: super::Layer::save_kept
pub struct Parts<F> {
    parts: std::vec::IntoIter<Part<F>>,
    taken: usize,
}

impl<F> Parts<F> {
    pub fn new(parts: Vec<Part<F>>) -> Parts<F> {
        Parts {
            parts: parts.into_iter(),
            taken: 0,
        }
    }

    fn next(&mut self, name: &str, expected: &str) -> Result<Part<F>, String> {
        self.taken += 1;
        self.parts.next().ok_or_else(|| {
            format!(
                "part {} ({name}): expected {expected}, got none",
                self.taken - 1
            )
        })
    }

    fn wrong(&self, name: &str, expected: String, got: &Part<F>) -> String {
        format!(
            "part {} ({name}): expected {expected}, got {} {:?}",
            self.taken - 1,
            got.type_name(),
            got.shape()
        )
    }

    /// Floats of exactly `shape`.
    pub fn floats(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<F>, String> {
        let expected = format!("floats {shape:?}");
        match self.next(name, &expected)? {
            Part::Floats(a) if a.shape() == shape => Ok(a),
            got => Err(self.wrong(name, expected, &got)),
        }
    }

    /// A bitset over `elements` elements.
    pub fn bits(&mut self, name: &str, elements: usize) -> Result<Vec<u64>, String> {
        let expected = format!(
            "bits [{}] (over {elements} elements)",
            elements.div_ceil(64)
        );
        match self.next(name, &expected)? {
            Part::Bits(words) if words.len() == elements.div_ceil(64) => Ok(words),
            got => Err(self.wrong(name, expected, &got)),
        }
    }

    /// Positions of exactly `shape`, each below `below`.
    pub fn positions(
        &mut self,
        name: &str,
        shape: &[usize],
        below: u32,
    ) -> Result<ArrayD<u32>, String> {
        let expected = format!("positions {shape:?} in [0, {below})");
        match self.next(name, &expected)? {
            Part::Positions(a) if a.shape() == shape => {
                match a.iter().enumerate().find(|(_, &p)| p >= below) {
                    Some((i, p)) => Err(format!(
                        "part {} ({name}): expected {expected}, got {p} at index {i}",
                        self.taken - 1
                    )),
                    None => Ok(a),
                }
            }
            got => Err(self.wrong(name, expected, &got)),
        }
    }

    /// `n` class ids, each in `[0, classes)`.
    pub fn classes(&mut self, name: &str, n: usize, classes: usize) -> Result<Array1<i64>, String> {
        let expected = format!("class ids [{n}] in [0, {classes})");
        match self.next(name, &expected)? {
            Part::Classes(a) if a.len() == n => {
                match a
                    .iter()
                    .enumerate()
                    .find(|(_, &c)| !(0..classes as i64).contains(&c))
                {
                    Some((i, c)) => Err(format!(
                        "part {} ({name}): expected {expected}, got {c} at index {i}",
                        self.taken - 1
                    )),
                    None => Ok(a),
                }
            }
            got => Err(self.wrong(name, expected, &got)),
        }
    }

    /// Ends the loading: no part may be left over.
    pub fn finish(self) -> Result<(), String> {
        let left = self.parts.len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!(
                "expected {} parts, got {}",
                self.taken,
                self.taken + left
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn each_taker_checks_type_shape_and_range() {
        let floats = || Part::<f32>::Floats(ArrayD::zeros(IxDyn(&[2, 3])));
        assert!(Parts::new(vec![floats()]).floats("x", &[2, 3]).is_ok());
        let error = Parts::new(vec![floats()]).floats("x", &[3, 2]).unwrap_err();
        assert_eq!(
            error,
            "part 0 (x): expected floats [3, 2], got floats [2, 3]"
        );
        let error = Parts::new(vec![floats()]).bits("mask", 6).unwrap_err();
        assert!(error.contains("expected bits [1]"), "{error}");
        let error = Parts::<f32>::new(vec![]).floats("y", &[1]).unwrap_err();
        assert_eq!(error, "part 0 (y): expected floats [1], got none");
        let positions = Part::<f32>::Positions(ArrayD::from_elem(IxDyn(&[2]), 4));
        let error = Parts::new(vec![positions])
            .positions("at", &[2], 4)
            .unwrap_err();
        assert!(error.contains("in [0, 4), got 4 at index 0"), "{error}");
        let classes = Part::<f32>::Classes(Array1::from(vec![0, -1]));
        let error = Parts::new(vec![classes]).classes("t", 2, 3).unwrap_err();
        assert!(error.contains("got -1 at index 1"), "{error}");
        let mut two = Parts::new(vec![floats(), floats()]);
        two.floats("x", &[2, 3]).unwrap();
        assert_eq!(two.finish().unwrap_err(), "expected 1 parts, got 2");
    }
}
