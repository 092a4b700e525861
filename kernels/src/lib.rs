//! slora-kernels: the GPU executor of slora-plan.
//!
//! Everything that touches CUDA is behind the `cuda` feature; without it the crate still
//! builds, its launch plans and CPU references are tested, and `Gpu`-needing entry points
//! return [`Error::CudaNotCompiled`].

pub mod bench;
#[cfg(feature = "cuda")]
pub mod calibrate;
#[cfg(feature = "cuda")]
pub mod device;
pub mod doctor;
pub mod error;
#[cfg(feature = "cuda")]
pub mod executor;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod measurement;
pub mod ops;
pub mod packing;
pub mod reference_model;
pub mod sources;
pub mod weights;

pub use error::{Error, Result};
