//! Device-side state of the executor: model weights, the unified page pool and adapter
//! loads. Only with the `cuda` feature.

use crate::error::{Error, Result};
use crate::gpu::{driver_err, Gpu};
use crate::sources::KernelSource;
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::f16;
use slora_engine::ModelSpec;

pub const SOURCE: KernelSource = crate::sources::EXECUTOR;

/// Weights of one decoder layer on the device, row-major `[out, in]` as in Hugging Face.
pub struct LayerWeights {
    pub input_norm: CudaSlice<f16>,
    /// `q_proj`, `k_proj` and `v_proj` rows stacked: one GEMM gives `[T, qw + 2 kvw]`. Three
    /// GEMMs of 4096 outputs each leave most of an H200's SMs idle at decode batch sizes
    /// (1.9 TB/s measured, against 3.3 TB/s for one of 12,288 outputs).
    pub qkv: CudaSlice<f16>,
    pub o: CudaSlice<f16>,
    pub post_norm: CudaSlice<f16>,
    /// `gate_proj` rows followed by `up_proj` rows: one GEMM gives `[T, 2I]` for `silu_mul`.
    pub gate_up: CudaSlice<f16>,
    pub down: CudaSlice<f16>,
}

pub struct DeviceWeights {
    pub embed: CudaSlice<f16>,
    pub layers: Vec<LayerWeights>,
    pub norm: CudaSlice<f16>,
    pub lm_head: CudaSlice<f16>,
}

impl DeviceWeights {
    /// Bytes the weights of `model` take on the device.
    pub fn bytes(model: &ModelSpec) -> u64 {
        model.weight_bytes()
    }

    /// Uploads host weights (loaded from safetensors).
    pub fn upload(
        gpu: &Gpu,
        model: &ModelSpec,
        w: &crate::weights::LlamaWeights,
    ) -> Result<DeviceWeights> {
        let up = |data: &[f16], what: &str| -> Result<CudaSlice<f16>> {
            gpu.stream
                .clone_htod(data)
                .map_err(driver_err(format!("uploading {what}")))
        };
        let mut layers = Vec::with_capacity(model.num_layers as usize);
        w.check_shapes(model)?;
        for (i, l) in w.layers.iter().enumerate() {
            let mut qkv = Vec::with_capacity(l.q_proj.len() + l.k_proj.len() + l.v_proj.len());
            qkv.extend_from_slice(&l.q_proj);
            qkv.extend_from_slice(&l.k_proj);
            qkv.extend_from_slice(&l.v_proj);
            let mut gate_up = Vec::with_capacity(l.gate_proj.len() + l.up_proj.len());
            gate_up.extend_from_slice(&l.gate_proj);
            gate_up.extend_from_slice(&l.up_proj);
            layers.push(LayerWeights {
                input_norm: up(&l.input_layernorm, &format!("layer {i} input_layernorm"))?,
                qkv: up(&qkv, &format!("layer {i} q/k/v_proj"))?,
                o: up(&l.o_proj, &format!("layer {i} o_proj"))?,
                post_norm: up(
                    &l.post_attention_layernorm,
                    &format!("layer {i} post_attention_layernorm"),
                )?,
                gate_up: up(&gate_up, &format!("layer {i} gate/up_proj"))?,
                down: up(&l.down_proj, &format!("layer {i} down_proj"))?,
            });
        }
        Ok(DeviceWeights {
            embed: up(&w.embed_tokens, "embed_tokens")?,
            layers,
            norm: up(&w.norm, "norm")?,
            lm_head: up(w.lm_head(), "lm_head")?,
        })
    }

    /// Synthetic weights of `model`'s shape generated on the device from `seed`, scaled
    /// (uniform in ±1/sqrt(in)) so activations stay finite through every layer; norms are 1.
    pub fn synthetic(gpu: &Gpu, model: &ModelSpec, seed: u64) -> Result<DeviceWeights> {
        let (h, i, v) = (
            model.hidden_size as usize,
            model.intermediate_size as usize,
            model.vocab_size as usize,
        );
        let (q_out, kv_out) = (
            (model.num_heads * model.head_dim()) as usize,
            model.kv_width() as usize,
        );
        let mut salt = seed;
        let mut random = |n: usize, fan_in: usize| -> Result<CudaSlice<f16>> {
            salt = salt.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut buf = alloc(gpu, n, "synthetic weights")?;
            fill_uniform(gpu, &mut buf, salt, 1.0 / (fan_in as f32).sqrt())?;
            Ok(buf)
        };
        let mut layers = Vec::with_capacity(model.num_layers as usize);
        for _ in 0..model.num_layers {
            layers.push(LayerWeights {
                input_norm: ones(gpu, h)?,
                qkv: random((q_out + 2 * kv_out) * h, h)?,
                o: random(h * q_out, q_out)?,
                post_norm: ones(gpu, h)?,
                gate_up: random(2 * i * h, h)?,
                down: random(h * i, i)?,
            });
        }
        Ok(DeviceWeights {
            embed: random(v * h, 1)?,
            layers,
            norm: ones(gpu, h)?,
            lm_head: random(v * h, h)?,
        })
    }
}

pub fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    gpu.stream
        .alloc_zeros::<T>(n.max(1))
        .map_err(driver_err(format!("allocating {what} ({n} elements)")))
}

fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub fn fill_uniform(gpu: &Gpu, buf: &mut CudaSlice<f16>, seed: u64, scale: f32) -> Result<()> {
    let f = gpu.function(SOURCE, "fill_uniform_f16")?;
    let len = buf.len();
    let n = len as i64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(buf).arg(&n).arg(&seed).arg(&scale);
    // SAFETY: the kernel writes `n` elements of `buf`, which holds `n`; the grid-stride loop
    // bounds every index by `n`.
    unsafe { b.launch(grid_for(len)) }.map_err(driver_err("fill_uniform_f16"))?;
    Ok(())
}

fn ones(gpu: &Gpu, n: usize) -> Result<CudaSlice<f16>> {
    let mut buf = alloc(gpu, n, "norm weights")?;
    let f = gpu.function(SOURCE, "fill_constant_f16")?;
    let (len, value) = (n as i64, 1.0f32);
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&mut buf).arg(&len).arg(&value);
    // SAFETY: writes `len` elements of a buffer of `len`; bounded grid-stride loop.
    unsafe { b.launch(grid_for(n)) }.map_err(driver_err("fill_constant_f16"))?;
    Ok(buf)
}

/// Copies staged adapter rows (`[layers * 2][n_pages][width]`) into their pool pages.
#[allow(clippy::too_many_arguments)] // shapes of a scatter: each names one dimension
pub fn scatter_rows(
    gpu: &Gpu,
    stream: &cudarc::driver::CudaStream,
    staging: &CudaSlice<f16>,
    pool: &mut CudaSlice<f16>,
    pages: &CudaSlice<i32>,
    n_pages: usize,
    layers: usize,
    width: usize,
    pool_pages: usize,
) -> Result<()> {
    if n_pages == 0 {
        return Ok(());
    }
    if staging.len() < layers * 2 * n_pages * width {
        return Err(Error::Launch {
            kernel: "scatter_rows",
            reason: format!(
                "staging holds {} elements, the adapter needs {}",
                staging.len(),
                layers * 2 * n_pages * width
            ),
        });
    }
    let f = gpu.function(SOURCE, "scatter_rows")?;
    let (np, w, pp) = (n_pages as i32, width as i32, pool_pages as i64);
    let mut b = stream.launch_builder(&f);
    b.arg(staging)
        .arg(pool)
        .arg(pages)
        .arg(&np)
        .arg(&w)
        .arg(&pp);
    let cfg = LaunchConfig {
        grid_dim: (n_pages as u32, (layers * 2) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: staging holds layers*2*n_pages*width elements (checked above); every page index
    // comes from the engine, which only hands out pages below `pool_pages`; the pool holds
    // layers*2*pool_pages*width elements.
    unsafe { b.launch(cfg) }.map_err(driver_err("scatter_rows"))?;
    Ok(())
}

pub fn cast_f16_f32(
    gpu: &Gpu,
    input: &CudaView<f16>,
    out: &mut CudaViewMut<f32>,
    n: usize,
) -> Result<()> {
    let f = gpu.function(SOURCE, "cast_f16_f32")?;
    let len = n as i64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(input).arg(out).arg(&len);
    // SAFETY: both views hold at least `n` elements (callers size them so).
    unsafe { b.launch(grid_for(n)) }.map_err(driver_err("cast_f16_f32"))?;
    Ok(())
}

pub fn gather_rows(
    gpu: &Gpu,
    input: &CudaView<f16>,
    rows: &CudaView<i32>,
    out: &mut CudaViewMut<f16>,
    n_rows: usize,
    width: usize,
) -> Result<()> {
    if n_rows == 0 {
        return Ok(());
    }
    let f = gpu.function(SOURCE, "gather_rows_f16")?;
    let w = width as i32;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(input).arg(rows).arg(out).arg(&w);
    let cfg = LaunchConfig {
        grid_dim: (n_rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `rows` holds n_rows indices of rows inside `input`; `out` holds n_rows*width.
    unsafe { b.launch(cfg) }.map_err(driver_err("gather_rows_f16"))?;
    Ok(())
}

/// `y[t, out] = x[t, in] · w[out, in]ᵀ` for row-major fp16 tensors (cuBLAS, f32 accumulate).
/// Column-major cuBLAS sees `y` as `yᵀ [out, t]` = `w [out, in]` (its `wᵀ` view, transposed
/// back) times `xᵀ [in, t]`.
#[allow(clippy::too_many_arguments)] // a GEMM is its three operands and three sizes
pub fn linear<X, W, Y>(
    gpu: &Gpu,
    x: &X,
    w: &W,
    y: &mut Y,
    t: usize,
    inp: usize,
    out: usize,
    accumulate: bool,
) -> Result<()>
where
    X: DevicePtr<f16>,
    W: DevicePtr<f16>,
    Y: DevicePtrMut<f16>,
{
    if t == 0 {
        return Ok(());
    }
    gpu.gemm.linear(gpu, x, w, y, t, inp, out, accumulate, 0)
}

/// [`linear`] planned for `sm_target` SMs (0: all), leaving the others to a kernel beside it.
#[allow(clippy::too_many_arguments)]
pub fn linear_on_sms<X, W, Y>(
    gpu: &Gpu,
    x: &X,
    w: &W,
    y: &mut Y,
    t: usize,
    inp: usize,
    out: usize,
    sm_target: u32,
) -> Result<()>
where
    X: DevicePtr<f16>,
    W: DevicePtr<f16>,
    Y: DevicePtrMut<f16>,
{
    gpu.gemm.linear(gpu, x, w, y, t, inp, out, false, sm_target)
}
