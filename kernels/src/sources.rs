//! The CUDA C sources, embedded in the binary; NVRTC compiles them at run time for the
//! device's compute capability. `ALL` lists every module, so `doctor` and the compile test
//! cover each one.

/// One `.cu` file of `kernels/cuda/`: a name for errors and the module cache, and its source.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub code: &'static str,
}

/// Every kernel module.
pub const ALL: &[KernelSource] = &[
    crate::ops::layers::SOURCE,
    crate::ops::attention::SOURCE,
    crate::ops::lora::SOURCE,
    crate::ops::sampling::SOURCE,
    EXECUTOR,
];

/// Synthetic weights, adapter page scatter, casts and row gathers (`cuda/executor.cu`).
pub const EXECUTOR: KernelSource = KernelSource {
    name: "executor.cu",
    code: include_str!("../cuda/executor.cu"),
};
