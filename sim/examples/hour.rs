//! One simulated hour at saturation, for profiling (`perf record`); the benchmark is
//! `cargo bench -p slora-sim --bench simulate`.
use slora_sim::{simulate, Scenario};
use std::path::Path;
fn main() {
    let text = include_str!("../benches/hour.yaml");
    let loaded = Scenario::parse(text, Path::new("hour.yaml")).unwrap();
    let setup = loaded.points[0]
        .scenario
        .build(Path::new("hour.yaml"))
        .unwrap();
    let t = std::time::Instant::now();
    let run = simulate(&setup, None).unwrap();
    println!(
        "{} steps in {:.3} s",
        run.metrics.batch.steps,
        t.elapsed().as_secs_f64()
    );
}
