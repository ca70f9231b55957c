//! What the kinds share, below them: matrix products, a vectorisable exp,
//! the seeded generator, weight initialisation, and the stateless elementwise
//! passes KServe's models run over raw bytes.

pub mod elementwise;
pub mod init;
pub mod linalg;
pub mod rng;
pub mod vexp;
