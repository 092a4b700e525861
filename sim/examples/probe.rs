use slora_sim::{simulate, Scenario};
use std::path::Path;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).cloned().unwrap_or("llama-7b".into());
    let ranks = args.get(2).cloned().unwrap_or("[64, 32, 16, 8]".into());
    let n: u32 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(1000);
    let dur: f64 = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(120.0);
    for rate in [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0] {
        let text = format!(
            "name: p\nseed: 1\nmodel: {model}\ngpu: h200\nadapters: {{ count: {n}, ranks: {ranks} }}\n\
             workload:\n  arrivals: {{ process: gamma, rate: {rate}, cv: 1 }}\n  duration_s: {dur}\n  \
             input: {{ dist: uniform, min: 8, max: 512 }}\n  output: {{ dist: uniform, min: 8, max: 512 }}\n\
             slo: {{ ttft_s: 6 }}\n"
        );
        let l = Scenario::parse(&text, Path::new("p.yaml")).unwrap();
        let setup = l.points[0].scenario.build(Path::new("p.yaml")).unwrap();
        let t = Instant::now();
        let run = simulate(&setup, None).unwrap();
        let wall = t.elapsed().as_secs_f64();
        let m = &run.metrics;
        println!(
            "rate {rate:5.1}: thr {:6.2} req/s ttft p50 {:7.3} p99 {:7.3} tpot p50 {:.4} batch {:6.1} steps {} wall {:.3}s ({:.0}x real) attain {:.2} step_ms {:.2}",
            m.throughput.requests_per_s, m.ttft_s.p50, m.ttft_s.p99, m.tpot_s.p50, m.batch.mean_batch_size,
            m.batch.steps, wall, m.throughput.window_s / wall, m.slo_attainment,
            run.steps.iter().map(|s| s.duration.as_secs_f64()).sum::<f64>() / run.steps.len() as f64 * 1e3
        );
    }
}
