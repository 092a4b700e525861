//! Host-side packing of adapter weights into pool rows (layout: `kernels/README.md`). Pure,
//! always compiled, tested on the CPU; the executor copies the packed rows to the device.

use half::f16;
use slora_engine::{ModelSpec, TargetModule};

/// Pool indices one rank row of `module` spans: `max(ceil(in / W), ceil(out / W))`.
pub fn slots_per_row(model: &ModelSpec, module: TargetModule) -> usize {
    let w = model.page_width() as usize;
    let (i, o) = model.module_shape(module);
    (i as usize).div_ceil(w).max((o as usize).div_ceil(w))
}

/// Offset, within an adapter's page list, of `module`'s first row: `rank` times the slots of
/// the modules listed before it in `targets`.
pub fn module_row_offset(
    model: &ModelSpec,
    rank: u32,
    targets: &[TargetModule],
    module: TargetModule,
) -> usize {
    targets
        .iter()
        .take_while(|&&t| t != module)
        .map(|&t| rank as usize * slots_per_row(model, t))
        .sum()
}

/// Packs `A` (`[r, in]` per layer and module) and `B` (`[out, r]`) into
/// `[layers][K side, V side][pages][W]` rows in page-list order, each module laid out by
/// `ops::lora::pack_adapter_rows` (the same packing the LoRA kernels' checks use). Modules
/// with no tensors (`None`) pack as zeros; the loader has already checked every tensor.
pub fn pack_adapter<'a>(
    model: &ModelSpec,
    rank: u32,
    targets: &[TargetModule],
    a: &dyn Fn(u32, TargetModule) -> Option<&'a [f16]>,
    b: &dyn Fn(u32, TargetModule) -> Option<&'a [f16]>,
) -> crate::Result<Vec<f16>> {
    let w = model.page_width() as usize;
    let r = rank as usize;
    let pages: usize = targets.iter().map(|&t| r * slots_per_row(model, t)).sum();
    let layers = model.num_layers as usize;
    let mut out = vec![f16::ZERO; layers * 2 * pages * w];
    for layer in 0..layers {
        let k_side = (layer * 2) * pages * w;
        let v_side = (layer * 2 + 1) * pages * w;
        for &module in targets {
            let (Some(a_rows), Some(b_rows)) = (a(layer as u32, module), b(layer as u32, module))
            else {
                continue;
            };
            let (inp, outp) = model.module_shape(module);
            let base = module_row_offset(model, rank, targets, module);
            let local: Vec<i32> = (base..base + r * slots_per_row(model, module))
                .map(|p| p as i32)
                .collect();
            let packed = crate::ops::lora::pack_adapter_rows(
                inp as usize,
                outp as usize,
                w,
                r,
                a_rows,
                b_rows,
                &local,
            )?;
            for p in packed {
                let page = p.page as usize;
                out[k_side + page * w..k_side + (page + 1) * w].copy_from_slice(&p.k_row);
                out[v_side + page * w..v_side + (page + 1) * w].copy_from_slice(&p.v_row);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(kv_heads: u32) -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: kv_heads,
            intermediate_size: 96,
            vocab_size: 100,
            max_position: 512,
            rope_theta: 10_000.0,
            dtype: slora_engine::DType::Fp16,
        }
    }

    #[test]
    fn offsets_and_slots_follow_the_engine_page_count() {
        for kv in [4, 1] {
            let m = tiny(kv);
            let targets = TargetModule::ALL.to_vec();
            let spec = slora_engine::AdapterSpec {
                rank: 3,
                targets: targets.clone(),
            };
            let total: usize = targets.iter().map(|&t| 3 * slots_per_row(&m, t)).sum();
            assert_eq!(total as u64, spec.pages(&m));
            assert_eq!(module_row_offset(&m, 3, &targets, TargetModule::Q), 0);
            assert_eq!(
                module_row_offset(&m, 3, &targets, TargetModule::K),
                3 * slots_per_row(&m, TargetModule::Q)
            );
        }
    }

    #[test]
    fn packed_rows_hold_a_and_b_transposed_at_their_pages() {
        let m = tiny(1); // GQA: page width 16, q rows span 4 slots
        let targets = vec![TargetModule::Q, TargetModule::V];
        let r = 2usize;
        let val = |layer: u32, module: TargetModule, k: usize| {
            f16::from_f32(
                (layer as f32) * 1000.0 + (module as u32 as f32) * 100.0 + k as f32 * 0.5 + 0.25,
            )
        };
        let mut a_store = std::collections::BTreeMap::new();
        let mut b_store = std::collections::BTreeMap::new();
        for layer in 0..2u32 {
            for &t in &targets {
                let (i, o) = m.module_shape(t);
                a_store.insert(
                    (layer, t),
                    (0..r * i as usize)
                        .map(|k| val(layer, t, k))
                        .collect::<Vec<_>>(),
                );
                b_store.insert(
                    (layer, t),
                    (0..o as usize * r)
                        .map(|k| val(layer, t, k + 7))
                        .collect::<Vec<_>>(),
                );
            }
        }
        let packed = pack_adapter(
            &m,
            r as u32,
            &targets,
            &|l, t| a_store.get(&(l, t)).map(|v| v.as_slice()),
            &|l, t| b_store.get(&(l, t)).map(|v| v.as_slice()),
        )
        .expect("shapes are valid");
        let w = m.page_width() as usize;
        let pages: usize = targets.iter().map(|&t| r * slots_per_row(&m, t)).sum();
        for layer in 0..2usize {
            for &t in &targets {
                let (inp, outp) = m.module_shape(t);
                let slots = slots_per_row(&m, t);
                let base = module_row_offset(&m, r as u32, &targets, t);
                for i in 0..r {
                    for j in 0..inp as usize {
                        let page = base + i * slots + j / w;
                        let got = packed[((layer * 2) * pages + page) * w + j % w];
                        assert_eq!(got, a_store[&(layer as u32, t)][i * inp as usize + j]);
                    }
                    for o in 0..outp as usize {
                        let page = base + i * slots + o / w;
                        let got = packed[((layer * 2 + 1) * pages + page) * w + o % w];
                        assert_eq!(got, b_store[&(layer as u32, t)][o * r + i]);
                    }
                }
            }
        }
    }
}
