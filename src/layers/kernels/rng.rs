//! The layers' own random generator: xoshiro256** seeded by SplitMix64, the
//! published algorithms written out here, so that the same seed gives the
//! same numbers on every machine, build and dependency version — Dropout's
//! masks and weight initialisation are reproducible from their seed, and a
//! generator's position (its four words) can be saved and restored.

/// xoshiro256** (Blackman and Vigna, 2018).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng {
    state: [u64; 4],
}

impl Rng {
    /// A generator seeded from one word by SplitMix64, as the authors recommend.
    pub fn from_seed(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            state: [next(), next(), next(), next()],
        }
    }

    /// A generator at a saved position ([`Rng::position`]); None for the
    /// all-zero state, which xoshiro cannot leave.
    pub fn at(position: [u64; 4]) -> Option<Rng> {
        (position != [0; 4]).then_some(Rng { state: position })
    }

    /// The generator's position, to save it.
    pub fn position(&self) -> [u64; 4] {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1): the top 53 bits as a float64 fraction.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal, by Box–Muller (one of the pair; `1 − u` keeps the log finite).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_sequence() {
        // xoshiro256** from the state {1, 2, 3, 4}.
        let mut rng = Rng::at([1, 2, 3, 4]).unwrap();
        assert_eq!(
            [rng.next_u64(), rng.next_u64(), rng.next_u64()],
            [11520, 0, 1509978240]
        );
        assert_eq!(Rng::at([0; 4]), None);
    }

    #[test]
    fn seeds_and_positions_reproduce_the_sequence() {
        let mut a = Rng::from_seed(42);
        let mut b = Rng::from_seed(42);
        let _ = (a.next_u64(), b.next_u64());
        let mut resumed = Rng::at(a.position()).unwrap();
        let (x, y, z) = (a.uniform(), b.uniform(), resumed.uniform());
        assert!(x == y && y == z && (0.0..1.0).contains(&x));
        assert_ne!(Rng::from_seed(42).next_u64(), Rng::from_seed(43).next_u64());
    }

    #[test]
    fn uniform_and_normal_moments() {
        let mut rng = Rng::from_seed(7);
        let n = 200_000;
        let u: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
        let mean = u.iter().sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 5.0 * (1.0 / 12.0 / n as f64).sqrt());
        let z: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "{mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(), "{var}");
    }
}
