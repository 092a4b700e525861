//! The crate's one error type. Every variant names what failed and the numbers involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The crate was built without the `cuda` feature.
    #[error(
        "slora-plan was built without GPU support; rebuild with `cargo build --release --features cuda` \
         (needs no CUDA toolkit to build; at run time it needs an NVIDIA driver, NVRTC and cuBLAS)"
    )]
    CudaNotCompiled,
    /// No usable GPU or driver at run time.
    #[error("no usable NVIDIA GPU: {0}")]
    NoDevice(String),
    #[error("CUDA driver error in {context}: {message}")]
    Driver { context: String, message: String },
    #[error("cuBLAS error in {context}: {message}")]
    Blas { context: String, message: String },
    /// NVRTC rejected a kernel source: the compiler log and options are kept.
    #[error("NVRTC could not compile `{module}` for {arch}: {log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    /// A launch whose shapes cannot work (checked before launching).
    #[error("{kernel}: {reason}")]
    Launch {
        kernel: &'static str,
        reason: String,
    },
    /// A model or adapter file that cannot be used.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A tensor of the wrong shape or dtype.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// Not enough device memory.
    #[error(
        "not enough GPU memory: {what} needs {needed_gb:.2} GB but {available_gb:.2} GB are free"
    )]
    OutOfMemory {
        what: String,
        needed_gb: f64,
        available_gb: f64,
    },
    /// A plan the executor cannot run (an engine/executor mismatch).
    #[error("step {step}: {reason}")]
    Plan { step: u64, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;
