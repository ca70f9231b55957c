//! The native `layerd.v1` API at the edge: its gRPC handlers ([`service`])
//! and its codec ([`codec`]: wire tensors, targets and dtypes to the core's
//! types and back; layer and optimizer specifications to the core's).

pub mod codec;
mod describe;
pub mod service;
pub mod spec;

pub use service::LayerService;
