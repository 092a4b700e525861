//! The base model's linear layers through cuBLASLt, with the algorithm for each shape chosen by
//! timing cuBLASLt's own candidates.
//!
//! Decode steps multiply a few dozen token rows by weight matrices of tens of megabytes: the
//! GEMM is a weight stream, and how well it is spread over the SMs (tile shape, split-K)
//! decides the bandwidth. cuBLAS's heuristic picks one algorithm per shape without running
//! it. Here token counts (up to `TUNE_MAX_TOKENS`) fall in buckets (`bucket_top`); the first
//! time a bucket is met, cuBLASLt's top `CANDIDATES` algorithms for the bucket's top size, and
//! split-K variants of the top three, are timed on the real weights (into a scratch output,
//! after flushing the L2), and the fastest serves every size of the bucket. A shape first met
//! while the stream is being captured into a CUDA graph cannot be timed: it takes the
//! heuristic's first choice for that call only (the executor runs a decode shape eagerly once
//! before it captures it).

use crate::error::{Error, Result};
use crate::gpu::{driver_err, Gpu};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::f16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// cuBLASLt's ranked algorithms timed per shape (split-K variants come on top).
const CANDIDATES: usize = 8;
/// Timed repetitions per candidate (after one warm-up); the median is compared.
const TUNING_REPS: usize = 5;
/// Split-K factors tried on top of the heuristic's algorithms, for decode-sized shapes.
const SPLIT_K: [u32; 3] = [2, 4, 8];
/// Token counts up to this are tuned (decode batches and small prefills); larger GEMMs are
/// compute-bound tiles the heuristic handles well, and a prefill's arbitrary size would
/// otherwise cost a tuning each.
const TUNE_MAX_TOKENS: usize = crate::measurement::GEMM_TUNE_MAX_TOKENS as usize;
/// Larger than any current GPU's L2 (H200: 60 MB).
const L2_FLUSH_BYTES: usize = 128 << 20;
/// cuBLASLt's recommended workspace on Hopper (split-K partial sums live here).
const WORKSPACE_BYTES: usize = 32 << 20;

/// `y[t, out] (+)= x[t, inp] · w[out, inp]ᵀ`, all row-major fp16, fp32 accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    t: usize,
    inp: usize,
    out: usize,
    accumulate: bool,
    /// SMs cuBLASLt is told to plan for (`CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET`): 0 for the
    /// whole GPU, fewer while the decode rows' LoRA runs beside the GEMM on the others.
    sm_target: u32,
}

/// The descriptors of one shape and the algorithm chosen for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// The heuristic's choice for a shape met during a graph capture, before it could be
    /// tuned: used once, not cached.
    provisional: bool,
}

/// Shapes share a tuned algorithm by bucket of the token count (`t` is the bucket's top,
/// where it is timed; the others reuse its choice when it runs their shape), so a server meets
/// at most 25 tunings per weight shape instead of one per batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Bucket {
    t: usize,
    inp: usize,
    out: usize,
    accumulate: bool,
    sm_target: u32,
}

/// A bucket's tuning result.
#[derive(Clone, Copy)]
struct Tuned {
    algo: sys::cublasLtMatmulAlgo_t,
    /// The size it was timed at, and the milliseconds of the heuristic's first choice and of
    /// the winner there.
    timed_at: usize,
    heuristic_ms: f64,
    chosen_ms: f64,
    /// Taken from a profile ([`LtGemm::adopt`]) rather than timed here (no times then).
    adopted: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `Plan::new` and destroyed only here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// One row of `LtGemm::report`: a shape, and what tuning gained over the heuristic.
#[derive(Clone, Debug)]
pub struct TunedShape {
    pub tokens: usize,
    pub inp: usize,
    pub out: usize,
    pub heuristic_ms: f64,
    pub chosen_ms: f64,
    /// The SM-count target it was planned and tuned for (0: the whole GPU).
    pub sm_target: u32,
}

/// One token bucket's algorithm as plain data: what `calibrate` records in a profile and
/// `--execute` adopts, so that live steps run the GEMM algorithms the profile measured.
/// Tuning times candidates a few microseconds apart, so two processes on the same GPU can
/// choose differently for a bucket, and the calibration then prices a step with another
/// algorithm than the server runs (docs/FIDELITY.md, session 16). `algo` is cuBLASLt's
/// opaque algorithm, which NVIDIA documents as serializable for the same cuBLASLt version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketAlgorithm {
    /// The bucket's top token count ([`bucket_top`]).
    pub tokens: usize,
    pub inp: usize,
    pub out: usize,
    pub accumulate: bool,
    pub algo: [u64; 8],
}

/// What [`LtGemm::adopt`] did with a list of [`BucketAlgorithm`]s.
#[derive(Clone, Debug, Default)]
pub struct Adoption {
    pub adopted: usize,
    /// Entries cuBLASLt refused for their shape, or that are not a tuned bucket's top, each
    /// with the reason.
    pub refused: Vec<(BucketAlgorithm, String)>,
}

/// The cuBLASLt library's version (`cublasLtGetVersion`, e.g. 130000 + patch): algorithms
/// recorded with one version are adopted only under the same.
pub fn cublaslt_version() -> u64 {
    // SAFETY: a plain query with no arguments.
    unsafe { sys::cublasLtGetVersion() as u64 }
}

pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Shape, Plan>>,
    tuned: Mutex<HashMap<Bucket, Tuned>>,
    /// Time the candidates (on by default; off reproduces cuBLAS's own choice).
    tune: bool,
}

// SAFETY: the handle and descriptors are used from one thread at a time (behind the Mutex or
// by the executor that owns the Gpu), as cuBLASLt allows.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        self.plans
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn blas_err(context: String) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> Error {
    move |e| Error::Blas {
        context,
        message: e.to_string(),
    }
}

impl LtGemm {
    pub fn new(stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<LtGemm> {
        let handle =
            lt::create_handle().map_err(blas_err("creating the cuBLASLt handle".into()))?;
        // SAFETY: the workspace is only ever handed to cuBLASLt, which writes before reading.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }
            .map_err(driver_err("allocating the cuBLASLt workspace"))?;
        Ok(LtGemm {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            tuned: Mutex::new(HashMap::new()),
            tune: true,
        })
    }

    /// Whether new shapes are tuned by timing (default) or take cuBLAS's first choice.
    pub fn set_tuning(&mut self, on: bool) {
        self.tune = on;
        self.plans
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.tuned
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The shapes tuned so far (not those adopted), with the heuristic's time beside the
    /// chosen one.
    pub fn report(&self) -> Vec<TunedShape> {
        let tuned = self.tuned.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<TunedShape> = tuned
            .iter()
            .filter(|(_, t)| !t.adopted)
            .map(|(b, t)| TunedShape {
                tokens: t.timed_at,
                inp: b.inp,
                out: b.out,
                heuristic_ms: t.heuristic_ms,
                chosen_ms: t.chosen_ms,
                sm_target: b.sm_target,
            })
            .collect();
        rows.sort_by_key(|r| (r.out, r.inp, r.tokens, r.sm_target));
        rows
    }

    /// Every bucket tuned or adopted so far, with its algorithm, sorted by shape and tokens.
    pub fn algorithms(&self) -> Vec<BucketAlgorithm> {
        let tuned = self.tuned.lock().unwrap_or_else(|e| e.into_inner());
        // Profiles record the whole-GPU algorithms only: those are what calibration prices
        // and what a server adopts; an SM-count target is a run-time experiment.
        let mut rows: Vec<BucketAlgorithm> = tuned
            .iter()
            .filter(|(b, _)| b.sm_target == 0)
            .map(|(b, t)| BucketAlgorithm {
                tokens: b.t,
                inp: b.inp,
                out: b.out,
                accumulate: b.accumulate,
                algo: t.algo.data,
            })
            .collect();
        rows.sort_by_key(|r| (r.out, r.inp, r.accumulate, r.tokens));
        rows
    }

    /// Takes `entries` as the buckets' algorithms instead of timing candidates: each entry
    /// cuBLASLt accepts for its shape (`cublasLtMatmulAlgoCheck`, within the workspace)
    /// replaces what its bucket had, and shapes planned before are planned again. Buckets
    /// without an entry are still tuned when first met. The caller checks that the entries
    /// were recorded with this cuBLASLt version ([`cublaslt_version`]).
    pub fn adopt(&self, entries: &[BucketAlgorithm]) -> Result<Adoption> {
        let mut report = Adoption::default();
        let mut adopted = Vec::new();
        for e in entries {
            if e.tokens == 0 || e.tokens > TUNE_MAX_TOKENS || bucket_top(e.tokens) != e.tokens {
                report.refused.push((
                    *e,
                    format!(
                        "{} tokens is not the top of a tuned token bucket (tuned up to {TUNE_MAX_TOKENS})",
                        e.tokens
                    ),
                ));
                continue;
            }
            let shape = Shape {
                t: e.tokens,
                inp: e.inp,
                out: e.out,
                accumulate: e.accumulate,
                sm_target: 0,
            };
            let plan = self.describe(shape)?;
            let algo = sys::cublasLtMatmulAlgo_t { data: e.algo };
            if !self.runs(&plan, &algo) {
                report.refused.push((
                    *e,
                    format!(
                        "cuBLASLt refuses the algorithm for linear {}->{} over {} tokens",
                        e.inp, e.out, e.tokens
                    ),
                ));
                continue;
            }
            adopted.push((
                Bucket {
                    t: e.tokens,
                    inp: e.inp,
                    out: e.out,
                    accumulate: e.accumulate,
                    sm_target: 0,
                },
                Tuned {
                    algo,
                    timed_at: e.tokens,
                    heuristic_ms: f64::NAN,
                    chosen_ms: f64::NAN,
                    adopted: true,
                },
            ));
        }
        report.adopted = adopted.len();
        self.tuned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(adopted);
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(report)
    }

    /// `y[t, out] (+)= x[t, inp] · w[out, inp]ᵀ` on the compute stream, planned for
    /// `sm_target` SMs (0: the whole GPU) with its algorithm tuned under that target: cuBLASLt
    /// then sizes its grid for that many SMs, so kernels on another stream may keep the rest.
    #[allow(clippy::too_many_arguments)] // one GEMM: operands, sizes, accumulate, SMs
    pub fn linear<X, W, Y>(
        &self,
        gpu: &Gpu,
        x: &X,
        w: &W,
        y: &mut Y,
        t: usize,
        inp: usize,
        out: usize,
        accumulate: bool,
        sm_target: u32,
    ) -> Result<()>
    where
        X: DevicePtr<f16>,
        W: DevicePtr<f16>,
        Y: DevicePtrMut<f16>,
    {
        if t == 0 {
            return Ok(());
        }
        let shape = Shape {
            t,
            inp,
            out,
            accumulate,
            sm_target,
        };
        let stream = &gpu.stream;
        let (xp, _gx) = x.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Vacant(slot) = plans.entry(shape) {
            let capturing = stream
                .capture_status()
                .map(|s| {
                    s != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
                })
                .unwrap_or(true);
            let plan = self.plan(gpu, shape, wp, capturing)?;
            if plan.provisional {
                // Use it for this call only; the next eager call tunes the shape.
                return self.launch(gpu, &plan, shape, xp, wp, yp);
            }
            slot.insert(plan);
        }
        let plan = &plans[&shape];
        self.launch(gpu, plan, shape, xp, wp, yp)
    }

    fn launch(&self, gpu: &Gpu, plan: &Plan, shape: Shape, x: u64, w: u64, y: u64) -> Result<()> {
        let alpha = 1.0f32;
        let beta = if shape.accumulate { 1.0f32 } else { 0.0 };
        let (ws, _g) = self.workspace.device_ptr(&gpu.stream);
        // SAFETY: the layouts describe w as [out, inp], x as [t, inp] and y as [t, out]
        // row-major, which is what the caller holds; the workspace is WORKSPACE_BYTES long.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                y as *const c_void,
                plan.c,
                y as *mut c_void,
                plan.c,
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                gpu.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_err(format!(
            "linear {}->{} over {} tokens",
            shape.inp, shape.out, shape.t
        )))
    }

    /// Descriptors for `shape` and its algorithm: its bucket's tuned algorithm (tuned now
    /// when the bucket has none yet, which is not possible while `capturing`), or the
    /// heuristic's first choice for shapes too large to tune or that the bucket's algorithm
    /// cannot run.
    fn plan(&self, gpu: &Gpu, shape: Shape, w: u64, capturing: bool) -> Result<Plan> {
        let bucket = (self.tune && shape.t <= TUNE_MAX_TOKENS).then(|| Bucket {
            t: bucket_top(shape.t),
            inp: shape.inp,
            out: shape.out,
            accumulate: shape.accumulate,
            sm_target: shape.sm_target,
        });
        let mut known = bucket.and_then(|b| {
            self.tuned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&b)
                .copied()
        });
        if let (Some(b), None, false) = (bucket, known, capturing) {
            known = self.tune_bucket(gpu, b, w)?;
        }
        let mut plan = self.describe(shape)?;
        plan.provisional = bucket.is_some() && known.is_none() && capturing;
        let candidates = self.candidates(&plan, shape, false)?;
        plan.algo = candidates[0];
        if let Some(known) = known {
            if self.runs(&plan, &known.algo) {
                plan.algo = known.algo;
            }
        }
        Ok(plan)
    }

    /// The matmul and layout descriptors of `shape` (algorithm not yet set).
    fn describe(&self, shape: Shape) -> Result<Plan> {
        let ctx = || {
            format!(
                "planning linear {}->{} over {} tokens",
                shape.inp, shape.out, shape.t
            )
        };
        let f16_t = sys::cudaDataType_t::CUDA_R_16F;
        // Column-major view: C[out, t] = op(A)[out, inp] · B[inp, t] with A = w stored as
        // [inp, out] (transposed), B = x as [inp, t], C = y as [out, t].
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(blas_err(ctx()))?;
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            provisional: false,
        };
        let trans = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        // SAFETY: `desc` was just created; the attribute is a cublasOperation_t.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&trans) as *const _ as *const c_void,
                std::mem::size_of::<cudarc::cublas::sys::cublasOperation_t>(),
            )
        }
        .map_err(blas_err(ctx()))?;
        if shape.sm_target > 0 {
            let target = shape.sm_target as i32;
            // SAFETY: `desc` is live; the attribute is an int32_t.
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET,
                    (&target) as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(blas_err(ctx()))?;
        }
        let (inp, out, t) = (shape.inp as u64, shape.out as u64, shape.t as u64);
        // Each layout is owned by `plan` as soon as it exists, so an error frees the others.
        plan.a = lt::create_matrix_layout(f16_t, inp, out, inp as i64).map_err(blas_err(ctx()))?;
        plan.b = lt::create_matrix_layout(f16_t, inp, t, inp as i64).map_err(blas_err(ctx()))?;
        plan.c = lt::create_matrix_layout(f16_t, out, t, out as i64).map_err(blas_err(ctx()))?;
        Ok(plan)
    }

    /// cuBLASLt's ranked algorithms for `plan`'s shape, best guess first; with `split`, also
    /// split-K variants of the top three (for tuning).
    fn candidates(
        &self,
        plan: &Plan,
        shape: Shape,
        split: bool,
    ) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let ctx = || {
            format!(
                "choosing an algorithm for linear {}->{} over {} tokens",
                shape.inp, shape.out, shape.t
            )
        };
        let pref = lt::create_matmul_pref().map_err(blas_err(ctx()))?;
        let ws = WORKSPACE_BYTES as u64;
        let mut heuristics: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            Vec::with_capacity(CANDIDATES);
        let mut found = 0i32;
        // SAFETY: all descriptors are live; `heuristics` has room for CANDIDATES results and
        // its length is set to what cuBLASLt wrote.
        let status = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    CANDIDATES as i32,
                    heuristics.as_mut_ptr(),
                    &mut found,
                )
                .result()
            })
        };
        // SAFETY: cuBLASLt initialised `found` entries.
        unsafe {
            heuristics.set_len(found.max(0) as usize);
            let _ = lt::destroy_matmul_pref(pref);
        }
        status.map_err(blas_err(ctx()))?;
        let mut candidates: Vec<_> = heuristics
            .iter()
            .filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|h| h.algo)
            .collect();
        if split {
            // Few output tiles (4,096 outputs at a decode batch) leave SMs idle; splitting the
            // reduction dimension gives every SM a share of the weight stream. The heuristic
            // rarely offers it for these shapes, so the top algorithms are also tried split.
            let heuristic: Vec<_> = candidates.iter().take(3).copied().collect();
            for base in heuristic {
                for split in SPLIT_K {
                    let mut algo = base;
                    // SAFETY: `algo` is a valid algorithm value; the attribute is a u32, and
                    // `runs` rejects a configuration these descriptors cannot run.
                    let set = unsafe {
                        sys::cublasLtMatmulAlgoConfigSetAttribute(
                            &mut algo,
                            sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                            (&split) as *const u32 as *const c_void,
                            std::mem::size_of::<u32>(),
                        ) == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    };
                    if set && self.runs(plan, &algo) {
                        candidates.push(algo);
                    }
                }
            }
        }
        if candidates.is_empty() {
            return Err(Error::Blas {
                context: ctx(),
                message: "cuBLASLt offers no algorithm for this shape".into(),
            });
        }
        Ok(candidates)
    }

    /// Whether `algo` can run `plan`'s shape within the workspace.
    fn runs(&self, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t) -> bool {
        // SAFETY: all descriptors are live; `check` is written by cuBLASLt.
        unsafe {
            let mut check = MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::zeroed();
            sys::cublasLtMatmulAlgoCheck(
                self.handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                plan.c,
                algo,
                check.as_mut_ptr(),
            ) == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && check.assume_init().workspaceSize <= WORKSPACE_BYTES
        }
    }

    /// Times the candidates of `bucket` at its top size (`bucket.t` tokens) and records the
    /// fastest. Every size of a bucket then runs the algorithm chosen at its top, whatever
    /// size the server happened to meet first: a step's cost depends on its shape only, not
    /// on the history of the process (which the simulator cannot know). The input rows are
    /// the first rows of the weight `w` itself (real fp16 values; `out >= t` for every layer
    /// of the presets), else zeros. `None` when there is a single candidate or none ran.
    fn tune_bucket(&self, gpu: &Gpu, bucket: Bucket, w: u64) -> Result<Option<Tuned>> {
        let shape = Shape {
            t: bucket.t,
            inp: bucket.inp,
            out: bucket.out,
            accumulate: bucket.accumulate,
            sm_target: bucket.sm_target,
        };
        let mut plan = self.describe(shape)?;
        let candidates = self.candidates(&plan, shape, true)?;
        if candidates.len() == 1 {
            return Ok(None);
        }
        let mut x = gpu
            .stream
            .alloc_zeros::<f16>(shape.t * shape.inp)
            .map_err(driver_err("allocating GEMM tuning input"))?;
        if shape.out >= shape.t {
            let (xp, _gx) = x.device_ptr_mut(&gpu.stream);
            // SAFETY: `w` holds out × inp ≥ t × inp fp16 values; `x` holds t × inp; both on
            // this device, copied in stream order.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    xp,
                    w,
                    shape.t * shape.inp * std::mem::size_of::<f16>(),
                    gpu.stream.cu_stream(),
                )
            }
            .map_err(driver_err("copying GEMM tuning input"))?;
        }
        // Time every candidate into a scratch output.
        let scratch = gpu
            .stream
            .alloc_zeros::<f16>(shape.t * shape.out)
            .map_err(driver_err("allocating GEMM tuning scratch"))?;
        let (xp, _gx) = x.device_ptr(&gpu.stream);
        let (sp, _gs) = scratch.device_ptr(&gpu.stream);
        // Decode GEMMs read their weights from HBM (a step streams gigabytes through the
        // 60 MB L2); overwriting a buffer larger than the L2 before each timed run keeps a
        // 32 MB weight matrix from being timed out of the cache.
        let mut flush = gpu
            .stream
            .alloc_zeros::<u8>(L2_FLUSH_BYTES)
            .map_err(driver_err("allocating the L2 flush buffer"))?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut best = (f64::INFINITY, candidates[0]);
        let mut heuristic_ms = f64::NAN;
        for (i, algo) in candidates.iter().enumerate() {
            plan.algo = *algo;
            // A candidate the heuristic offered can still refuse these pointers' alignment:
            // skip it rather than fail the step.
            if self.launch(gpu, &plan, shape, xp, w, sp).is_err() {
                continue;
            }
            let mut times = Vec::with_capacity(TUNING_REPS);
            for _ in 0..TUNING_REPS {
                gpu.stream
                    .memset_zeros(&mut flush)
                    .map_err(driver_err("flushing the L2"))?;
                let start = gpu
                    .stream
                    .record_event(flags)
                    .map_err(driver_err("event"))?;
                self.launch(gpu, &plan, shape, xp, w, sp)?;
                let end = gpu
                    .stream
                    .record_event(flags)
                    .map_err(driver_err("event"))?;
                end.synchronize().map_err(driver_err("event sync"))?;
                times.push(start.elapsed_ms(&end).map_err(driver_err("event time"))? as f64);
            }
            times.sort_by(|a, b| a.total_cmp(b));
            let ms = times[times.len() / 2];
            if i == 0 {
                heuristic_ms = ms;
            }
            if ms < best.0 {
                best = (ms, *algo);
            }
        }
        if !best.0.is_finite() {
            return Ok(None);
        }
        let tuned = Tuned {
            algo: best.1,
            timed_at: shape.t,
            heuristic_ms,
            chosen_ms: best.0,
            adopted: false,
        };
        self.tuned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bucket, tuned);
        Ok(Some(tuned))
    }
}

pub use crate::measurement::bucket_top;

/// The GPU check of [`LtGemm::adopt`] (`doctor`): one cuBLASLt instance tunes the buckets of a
/// few token counts on random data, a second adopts what the first recorded, and the second
/// must then hold the same algorithms (it times none) and give the same outputs (within the
/// kernels' fp16 tolerance; the table shows the difference, which should be 0). An entry at
/// a count that is no bucket's top must be refused, not adopted.
pub fn check_adoption(gpu: &Gpu) -> Result<crate::ops::layers::CheckResult> {
    use crate::ops::layers::{compare_f16, download, upload, TestRng};
    let (inp, out) = (1024, 3072);
    let mut rng = TestRng::new(0x0a1d_0b7e_d000);
    let w = upload(gpu, &rng.f16s(out * inp, -0.05, 0.05))?;
    let tuner = LtGemm::new(&gpu.stream)?;
    let adopter = LtGemm::new(&gpu.stream)?;
    let counts = [1usize, 37, 100, 300];
    let mut worst: Option<crate::ops::layers::CheckResult> = None;
    let mut outputs = Vec::new();
    for &t in &counts {
        let x = upload(gpu, &rng.f16s(t * inp, -1.0, 1.0))?;
        let mut y = upload(gpu, &vec![f16::ZERO; t * out])?;
        tuner.linear(gpu, &x, &w, &mut y, t, inp, out, false, 0)?;
        outputs.push((x, download(gpu, &y.as_view())?));
    }
    let recorded = tuner.algorithms();
    let mut entries = recorded.clone();
    let mut off_bucket = recorded[0];
    off_bucket.tokens = 37; // inside the bucket 33..=40
    entries.push(off_bucket);
    let adoption = adopter.adopt(&entries)?;
    let mut passed = adoption.adopted == recorded.len()
        && adoption.refused.len() == 1
        && adoption.refused[0].0.tokens == 37;
    for (k, &t) in counts.iter().enumerate() {
        let (x, want) = &outputs[k];
        let mut y = upload(gpu, &vec![f16::ZERO; t * out])?;
        adopter.linear(gpu, x, &w, &mut y, t, inp, out, false, 0)?;
        let got = download(gpu, &y.as_view())?;
        let r = compare_f16(String::new(), &got, want);
        if worst.as_ref().is_none_or(|w| r.max_abs_err > w.max_abs_err) {
            worst = Some(r);
        }
    }
    // Nothing was timed by the adopter: every bucket it ran was adopted.
    passed &= adopter.report().is_empty() && adopter.algorithms() == recorded;
    let mut r = worst.expect("four counts ran");
    r.kernel = format!(
        "GEMM algorithms adopted from a record ({} buckets, 1-300 tokens; same outputs)",
        recorded.len()
    );
    // The same algorithm on the same inputs: the outputs should agree bit for bit; the
    // kernels' fp16 tolerance is what the check demands, and the table shows the difference.
    r.passed &= passed;
    Ok(r)
}
