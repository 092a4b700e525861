//! The device: context, stream, cuBLAS handle and the NVRTC module cache. Only compiled with
//! the `cuda` feature; this is the one place (with the launch wrappers in `ops`) that names
//! cudarc.
//!
//! Kernels are CUDA C in `kernels/cuda/*.cu`, embedded with `include_str!`, compiled by NVRTC
//! for the device's compute capability the first time one of their functions is asked for,
//! and cached for the life of the `Gpu`.

use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Prepended to every module: fp16 conversions and warp reductions.
pub const COMMON_HEADER: &str = include_str!("../cuda/common.cuh");

pub use crate::sources::KernelSource;

/// What `doctor` prints about the device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    pub total_memory: u64,
    pub free_memory: u64,
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// The compute stream: every kernel and GEMM of a step runs on it, in order.
    pub stream: Arc<CudaStream>,
    /// Adapter loads: host-to-device copies from pinned memory and the scatter into pool
    /// pages, overlapping compute. Ordered against `stream` with explicit events only (see
    /// `GpuExecutor::load_adapters`).
    pub copy_stream: Arc<CudaStream>,
    /// The decode rows' LoRA kernels, run beside the base GEMMs of the same layer: forked from
    /// and joined back to `stream` with [`Gpu::fork_lora`] and [`Gpu::join_lora`] (see
    /// `GpuExecutor::forward`).
    pub lora_stream: Arc<CudaStream>,
    /// The same role at the device's greatest stream priority, used instead of `lora_stream`
    /// while [`Gpu::set_urgent_lora`] is on: when the LoRA kernels and a GEMM both have blocks
    /// waiting, the block scheduler starts the LoRA's first, so their short launches run
    /// under the GEMM's weight stream instead of after it (`bench-gpu` measures both).
    urgent_lora_stream: Arc<CudaStream>,
    urgent_lora: std::sync::atomic::AtomicBool,
    /// Reused for every fork and join, so a step records events instead of creating them.
    fork_event: CudaEvent,
    join_event: CudaEvent,
    pub blas: CudaBlas,
    /// The base model's linear layers (cuBLASLt, algorithm tuned per shape).
    pub gemm: crate::gemm::LtGemm,
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Phase marks of the step being timed (`calibrate`, `bench-gpu`): `None` when timing is
    /// off, the serving path's state.
    phase_marks: Mutex<Option<Vec<(Phase, CudaEvent)>>>,
    /// Whether `phase_marks` is collecting: read before taking the lock, so a mark costs one
    /// atomic load while timing is off (a step makes hundreds of marks).
    timing: std::sync::atomic::AtomicBool,
    /// Whether kernels that are built for it (the MBGMV expand) are launched as programmatic
    /// dependents of the kernel before them (sm_90+; see [`Gpu::launch_kernel`]).
    dependent_launch: std::sync::atomic::AtomicBool,
    /// Compute capability 9.0 or newer: `griddepcontrol` exists.
    has_dependent_launch: bool,
}

/// One kernel parameter of [`Gpu::launch_kernel`], by value.
#[derive(Clone, Copy, Debug)]
pub enum KernelArg {
    /// A device address (`T*` in the kernel), 0 for a null pointer.
    Ptr(cudarc::driver::sys::CUdeviceptr),
    I32(i32),
    F32(f32),
}

/// What a stretch of a step's GPU work is, for the calibration profile's components. A mark
/// starts a phase; it lasts until the next mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Embedding, norms, base GEMMs, RoPE, KV stores, SiLU·mul: the per-token dense work.
    Dense,
    AttentionPrefill,
    AttentionDecode,
    LoraShrink,
    LoraExpand,
    /// Final norm, gathering the rows that sample, LM head GEMM and logits cast.
    LmHead,
    /// Choosing the next token from the logits.
    Sampling,
    /// Closes the last phase.
    End,
}

/// GPU milliseconds per phase of one step, from events between the phases.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    pub ms: HashMap<Phase, f64>,
}

impl PhaseTimes {
    pub fn get(&self, phase: Phase) -> f64 {
        self.ms.get(&phase).copied().unwrap_or(0.0)
    }
    pub fn total(&self) -> f64 {
        self.ms.values().sum()
    }
}

pub(crate) fn driver_err(
    context: impl Into<String>,
) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    let context = context.into();
    move |e| Error::Driver {
        context,
        message: e.to_string(),
    }
}

impl Gpu {
    /// Opens GPU `ordinal`: a clear error when there is no driver or no device.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let ctx = quietly(|| CudaContext::new(ordinal))
            .map_err(|_| {
                Error::NoDevice(
                    "the CUDA driver library (libcuda.so) could not be loaded; install the NVIDIA driver".into(),
                )
            })?
            .map_err(|e| Error::NoDevice(format!("cannot open GPU {ordinal}: {e}")))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?;
        if major < 8 {
            return Err(Error::NoDevice(format!(
                "GPU {ordinal} has compute capability {major}.{minor}; slora-plan needs 8.0 or newer (Ampere+)"
            )));
        }
        // SAFETY: cudarc's per-buffer event tracking costs an event record and wait per
        // kernel argument (~20 µs of host time per launch). Without it we order the two
        // streams ourselves: the only buffers both touch are the pool (the copy stream writes
        // only pages the engine gave to a loading adapter, which no computing request reads,
        // and compute waits on the load's event before a step that uses them) and the staging
        // buffers of loads (kept alive until the step that issued them has completed).
        unsafe { ctx.disable_event_tracking() };
        // A created stream, not the legacy default one: only such a stream can be captured
        // into a CUDA graph.
        let stream = ctx
            .new_stream()
            .map_err(driver_err("creating the compute stream"))?;
        let copy_stream = ctx
            .new_stream()
            .map_err(driver_err("creating the copy stream"))?;
        let lora_stream = ctx
            .new_stream()
            .map_err(driver_err("creating the LoRA stream"))?;
        // Lower numbers are higher priorities; the range's low end is the greatest.
        ctx.bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        let (_, greatest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(driver_err("reading the stream priority range"))?;
        let urgent_lora_stream = ctx
            .new_stream_with_priority(greatest)
            .map_err(driver_err("creating the urgent LoRA stream"))?;
        let fork_event = ctx
            .new_event(None)
            .map_err(driver_err("creating the LoRA fork event"))?;
        let join_event = ctx
            .new_event(None)
            .map_err(driver_err("creating the LoRA join event"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Blas {
            context: "creating the cuBLAS handle".into(),
            message: e.to_string(),
        })?;
        let gemm = crate::gemm::LtGemm::new(&stream)?;
        Ok(Gpu {
            ctx,
            gemm,
            stream,
            copy_stream,
            lora_stream,
            urgent_lora_stream,
            urgent_lora: std::sync::atomic::AtomicBool::new(false),
            fork_event,
            join_event,
            blas,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::new(HashMap::new()),
            phase_marks: Mutex::new(None),
            timing: std::sync::atomic::AtomicBool::new(false),
            dependent_launch: std::sync::atomic::AtomicBool::new(major >= 9),
            has_dependent_launch: major >= 9,
        })
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Option<Vec<(Phase, CudaEvent)>>> {
        // A panic elsewhere cannot leave the list half-updated: take it as it is.
        self.phase_marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts recording phase marks (every later `mark` records an event on the compute
    /// stream). Not for captured graphs: events inside a capture are not timed.
    pub fn start_phase_timing(&self) {
        *self.marks() = Some(Vec::new());
        self.timing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Marks the start of `phase` on the compute stream when timing is on.
    pub fn mark(&self, phase: Phase) -> Result<()> {
        if !self.timing.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let mut marks = self.marks();
        if let Some(marks) = marks.as_mut() {
            // Consecutive marks of the same phase add nothing but events.
            if marks.last().map(|m| m.0) != Some(phase) {
                let event = self
                    .stream
                    .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(driver_err("recording a phase event"))?;
                marks.push((phase, event));
            }
        }
        Ok(())
    }

    /// Stops timing and returns the GPU time of each phase since `start_phase_timing`
    /// (waits for the stream's work to finish).
    pub fn finish_phase_timing(&self) -> Result<PhaseTimes> {
        self.mark(Phase::End)?;
        self.timing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let marks = self.marks().take().unwrap_or_default();
        let mut times = PhaseTimes::default();
        if let Some((_, last)) = marks.last() {
            last.synchronize()
                .map_err(driver_err("waiting for the timed step"))?;
        }
        for pair in marks.windows(2) {
            let ms = pair[0]
                .1
                .elapsed_ms(&pair[1].1)
                .map_err(driver_err("reading a phase event"))? as f64;
            *times.ms.entry(pair[0].0).or_insert(0.0) += ms;
        }
        Ok(times)
    }

    /// `lora_stream` waits for the work queued on `stream` so far (its inputs are ready). Inside
    /// a graph capture of `stream` this pulls `lora_stream` into the capture as a branch.
    pub fn fork_lora(&self) -> Result<()> {
        self.fork_event
            .record(&self.stream)
            .map_err(driver_err("recording the LoRA fork event"))?;
        self.lora()
            .wait(&self.fork_event)
            .map_err(driver_err("forking the LoRA stream"))
    }

    /// `stream` waits for the work queued on `lora_stream` so far (its outputs are ready);
    /// every fork is joined before a capture ends.
    pub fn join_lora(&self) -> Result<()> {
        self.join_event
            .record(self.lora())
            .map_err(driver_err("recording the LoRA join event"))?;
        self.stream
            .wait(&self.join_event)
            .map_err(driver_err("joining the LoRA stream"))
    }

    /// The stream the decode rows' LoRA runs on beside the GEMMs: `lora_stream`, or its
    /// greatest-priority twin while [`Gpu::set_urgent_lora`] is on.
    pub fn lora(&self) -> &Arc<CudaStream> {
        if self.urgent_lora() {
            &self.urgent_lora_stream
        } else {
            &self.lora_stream
        }
    }

    /// Runs the decode rows' LoRA at the device's greatest stream priority (off by default).
    /// A graph captured with it on must be instantiated with
    /// `CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY`: capture copies each stream's priority
    /// into its kernel nodes, and without the flag a replay runs every node at the priority of
    /// the stream it is launched into.
    pub fn set_urgent_lora(&self, on: bool) {
        self.urgent_lora
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn urgent_lora(&self) -> bool {
        self.urgent_lora.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Turns dependent launches on or off (on by default from sm_90; on older devices
    /// turning them on changes nothing). `bench-gpu` measures both.
    pub fn set_dependent_launch(&self, on: bool) {
        self.dependent_launch
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The switch of [`Gpu::set_dependent_launch`] as set (whatever the device supports).
    pub fn dependent_launch_enabled(&self) -> bool {
        self.dependent_launch
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a launch asked for as dependent really is one: sm_90+, switched on, and not
    /// while phases are timed (the events between phases would time overlapping kernels).
    pub fn dependent_launch(&self) -> bool {
        self.has_dependent_launch
            && self
                .dependent_launch
                .load(std::sync::atomic::Ordering::Relaxed)
            && !self.timing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Launches `func` on `stream` with `cuLaunchKernelEx`. With `dependent` (and
    /// [`Gpu::dependent_launch`]) the launch carries programmatic stream serialization: the
    /// kernel may start once every block of the kernel before it on `stream` has called
    /// `griddepcontrol.launch_dependents` (or exited), and must itself call
    /// `griddepcontrol.wait` before it reads that kernel's output or writes anything. In a
    /// captured graph this becomes a programmatic edge. Without `dependent` it is an
    /// ordinary launch.
    ///
    /// # Safety
    /// As for any kernel launch: `args` must match the kernel's parameters in number, order
    /// and type, the grid must keep its accesses in bounds, and with `dependent` the kernel
    /// must follow the rule above.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_kernel(
        &self,
        stream: &CudaStream,
        func: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &[KernelArg],
        dependent: bool,
    ) -> Result<()> {
        use cudarc::driver::sys;
        let mut values: Vec<KernelArg> = args.to_vec();
        // Pointers into `values`, which is not touched again until the launch returns.
        let mut params: Vec<*mut std::ffi::c_void> = values
            .iter_mut()
            .map(|a| match a {
                KernelArg::Ptr(p) => p as *mut u64 as *mut std::ffi::c_void,
                KernelArg::I32(v) => v as *mut i32 as *mut std::ffi::c_void,
                KernelArg::F32(v) => v as *mut f32 as *mut std::ffi::c_void,
            })
            .collect();
        // SAFETY: a zeroed attribute is a valid "ignored" value; its id and value are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let with_attr = dependent && self.dependent_launch();
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: if with_attr {
                &mut attr
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(with_attr),
        };
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        // SAFETY: `config` and `params` outlive the call; the caller vouches for the rest.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(driver_err("cuLaunchKernelEx"))
    }

    pub fn info(&self) -> Result<DeviceInfo> {
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(driver_err("cuMemGetInfo"))?;
        let cc = self
            .ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?;
        let sms = self
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err("reading the multiprocessor count"))?;
        let name = self
            .ctx
            .name()
            .map_err(driver_err("reading the device name"))?;
        let mut driver_version = 0i32;
        // SAFETY: cuDriverGetVersion writes one int through the valid pointer it is given.
        let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
        if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            driver_version = 0;
        }
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: nvrtcVersion writes two ints through valid pointers.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        let nvrtc_version = if status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            (major, minor)
        } else {
            (0, 0)
        };
        Ok(DeviceInfo {
            name,
            compute_capability: cc,
            multiprocessors: sms,
            total_memory: total as u64,
            free_memory: free as u64,
            driver_version,
            nvrtc_version,
        })
    }

    /// Compiles (once) and returns a module.
    pub fn module(&self, source: KernelSource) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(source.name) {
            return Ok(m.clone());
        }
        let ptx = compile(source, &self.arch)?;
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(driver_err(format!("loading module `{}`", source.name)))?;
        modules.insert(source.name, module.clone());
        Ok(module)
    }

    /// A kernel function of a module.
    pub fn function(&self, source: KernelSource, name: &str) -> Result<CudaFunction> {
        self.module(source)?
            .load_function(name)
            .map_err(driver_err(format!(
                "loading kernel `{name}` of `{}`",
                source.name
            )))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_err("synchronizing the compute stream"))
    }
}

/// Runs `f`, turning a panic into `Err` without printing it. cudarc panics when it cannot
/// load libcuda or libnvrtc; that is a missing install, reported by the caller in words.
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::thread::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    result
}

/// NVRTC compile of one module for `arch` (e.g. `sm_90`), with the common header prepended.
/// Also used without a device (NVRTC needs none) by `check_sources`.
pub fn compile(source: KernelSource, arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    let code = format!(
        "{COMMON_HEADER}\n#line 1 \"{}\"\n{}",
        source.name, source.code
    );
    let arch_static: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch_static),
        options: vec!["--std=c++17".into()],
        name: Some(source.name.to_string()),
        ..Default::default()
    };
    let compiled = quietly(|| cudarc::nvrtc::compile_ptx_with_opts(&code, opts))
        .map_err(|_| Error::Compile {
            module: source.name.into(),
            arch: arch.into(),
            log: "the NVRTC library (libnvrtc.so) could not be loaded; install the CUDA runtime's NVRTC".into(),
        })?;
    compiled.map_err(|e| Error::Compile {
        module: source.name.into(),
        arch: arch.into(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        },
    })
}

/// The GPU for a test, or `None` with a printed line when this machine has none (CI has
/// none), so the same tests skip on CPU machines and prove themselves on a GPU.
#[cfg(test)]
pub(crate) fn gpu_for_test(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            println!("skipping {test}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module compiles with NVRTC for sm_80 and sm_90. NVRTC needs no GPU; where its
    /// library cannot be loaded the test says so and passes (`.ci/run` installs it).
    #[test]
    fn every_kernel_module_compiles_with_nvrtc() {
        for source in crate::sources::ALL {
            for arch in ["sm_80", "sm_90"] {
                match compile(*source, arch) {
                    Ok(ptx) => assert!(!ptx.to_src().is_empty()),
                    Err(Error::Compile { log, .. }) if log.contains("could not be loaded") => {
                        println!("skipping NVRTC compile checks: {log}");
                        return;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}
