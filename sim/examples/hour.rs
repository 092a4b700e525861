//! One simulated hour at saturation, for profiling (`perf record`); the benchmark is
//! `cargo bench -p slora-sim --bench simulate`. An optional argument names another scenario
//! file to time instead (for example the same hour on another `gpu_profile:`).
use slora_sim::{simulate, Scenario};
use std::path::{Path, PathBuf};
fn main() {
    let (text, path) = match std::env::args().nth(1) {
        Some(p) => (
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}")),
            PathBuf::from(p),
        ),
        None => (
            include_str!("../benches/hour.yaml").to_string(),
            PathBuf::from("hour.yaml"),
        ),
    };
    let loaded = Scenario::parse(&text, &path).unwrap();
    let setup = loaded.points[0].scenario.build(Path::new(&path)).unwrap();
    let t = std::time::Instant::now();
    let run = simulate(&setup, None).unwrap();
    println!(
        "{} steps (mean batch {:.0}) in {:.3} s",
        run.metrics.batch.steps,
        run.metrics.batch.mean_batch_size,
        t.elapsed().as_secs_f64()
    );
}
