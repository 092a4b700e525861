//! Recovers the full shape of every step of a live run, and the cost model's parts for it.
//!
//! A live run's `steps.csv` has one row per step but not the batch's whole shape (context of
//! every request, ranks of its adapters). The engine is deterministic, so replaying the same
//! arrivals through the simulator with each step taking exactly the time it took live (from
//! one recorded start to the next, host gaps included) makes the same plans; this prints, per
//! step, the measured time, the cost model's parts and the shape fields they depend on.
//! Rows whose replayed plan differs from the recorded one (prompt tokens or decode rows) are
//! counted on stderr; then the replay has drifted and the shapes after it are not the run's.
//!
//!     cargo run --release -p slora-sim --example replay_steps -- SCENARIO.yaml STEPS.csv > parts.csv

use slora_engine::Nanos;
use slora_sim::cost::StepCost;
use slora_sim::des::simulate_with;
use slora_sim::{Recorder, Scenario};
use std::path::Path;

struct Recorded {
    start: f64,
    duration: f64,
    prefill_tokens: u32,
    decode_requests: u32,
    compute: bool,
}

fn read_steps(path: &Path) -> Result<Vec<Recorded>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty steps.csv")?.split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or(format!("{}: no column {name}", path.display()))
    };
    let (start, duration, prefill, decode, loads) = (
        col("start_s")?,
        col("duration_s")?,
        col("prefill_tokens")?,
        col("decode_requests")?,
        col("loads")?,
    );
    lines
        .enumerate()
        .map(|(i, line)| {
            let cells: Vec<&str> = line.split(',').collect();
            let num = |c: usize| -> Result<f64, String> {
                cells
                    .get(c)
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or(format!("{} line {}: bad cell {c}", path.display(), i + 2))
            };
            let (p, d, l) = (
                num(prefill)? as u32,
                num(decode)? as u32,
                num(loads)? as u32,
            );
            Ok(Recorded {
                start: num(start)?,
                duration: num(duration)?,
                prefill_tokens: p,
                decode_requests: d,
                compute: p > 0 || d > 0 || l > 0,
            })
        })
        .collect()
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, scenario, steps] = args.as_slice() else {
        return Err("usage: replay_steps SCENARIO.yaml STEPS.csv".into());
    };
    let path = Path::new(scenario);
    let loaded = Scenario::load(path).map_err(|e| e.to_string())?;
    let setup = loaded.points[0]
        .scenario
        .build(path)
        .map_err(|e| e.to_string())?;
    let recorded = read_steps(Path::new(steps))?;
    // Each compute step lasts until the next recorded step starts (the live driver's host
    // work between steps included), so the replay plans at the instants the live run did.
    let compute: Vec<usize> = (0..recorded.len())
        .filter(|&i| recorded[i].compute)
        .collect();
    let mut next = 0usize;
    let mut drifted = 0usize;
    println!(
        "step,measured_s,span_s,{},prefill_tokens,decode_requests,decode_context_tokens,lora_tokens,lora_token_rank,prefill_lora_tokens,distinct_adapters,distinct_rank_sum,blocking_load_bytes,prefetch_load_bytes,max_decode_rank,decode_rank_buckets",
        StepCost::PARTS.map(|p| format!("{p}_s")).join(",")
    );
    let cost = setup.cost.as_ref();
    let mut timer = |plan: &slora_engine::StepPlan, shape: &slora_sim::BatchShape| {
        let Some(&i) = compute.get(next) else {
            return cost.step_cost(shape);
        };
        next += 1;
        let r = &recorded[i];
        if r.prefill_tokens != plan.prefill_tokens()
            || r.decode_requests != plan.decode.len() as u32
        {
            drifted += 1;
        }
        let span = recorded
            .get(i + 1)
            .map_or(r.duration, |n| (n.start - r.start).max(r.duration));
        let parts = cost.step_cost(shape).parts();
        println!(
            "{i},{:.9},{span:.9},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.duration,
            parts.map(|p| format!("{:.9}", p.as_secs_f64())).join(","),
            shape.prefill_tokens,
            shape.decode_requests,
            shape.decode_context_tokens,
            shape.lora_tokens,
            shape.lora_token_rank,
            shape.prefill_lora_tokens,
            shape.distinct_adapters,
            shape.distinct_rank_sum,
            shape.blocking_load_bytes,
            shape.prefetch_load_bytes,
            shape.max_decode_rank,
            // rows:rank sum of each non-empty rank bucket (a power of two and above).
            (0..slora_engine::ContextHistogram::BUCKETS)
                .filter(|&b| shape.decode_rank_histogram.counts[b] > 0)
                .map(|b| format!(
                    "{}:{}",
                    shape.decode_rank_histogram.counts[b], shape.decode_rank_histogram.rows[b]
                ))
                .collect::<Vec<_>>()
                .join(" "),
        );
        StepCost {
            fixed_overhead: Nanos::from_secs_f64(span),
            ..StepCost::default()
        }
    };
    let recorder = Recorder::new(&setup, cost);
    simulate_with(&setup, recorder, &mut timer, None, None).map_err(|e| e.to_string())?;
    eprintln!(
        "{} compute steps recorded, {next} replayed, {drifted} with a different prompt/decode count",
        compute.len()
    );
    Ok(())
}
