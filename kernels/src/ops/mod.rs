//! Kernels: for each, a pure launch plan, a CPU reference, and (feature `cuda`) the launch.

pub mod attention;
pub mod layers;
pub mod lora;
pub mod sampling;
