//! Scenarios at `tensor_parallel` > 1: what builds, what is refused (naming the field), and
//! what a run on the derived model shows.

use slora_sim::{simulate, Provenance, Scenario, ScenarioError};
use std::path::Path;

fn text(model: &str, gpu: &str, tp: u32) -> String {
    format!(
        "name: tp\nseed: 4\nmodel: {model}\ngpu: {gpu}\ntensor_parallel: {tp}\n\
         adapters: {{ count: 20, ranks: [8, 32] }}\n\
         workload:\n  arrivals: {{ process: poisson, rate: 20 }}\n  requests: 300\n  \
         input: {{ dist: uniform, min: 16, max: 256 }}\n  \
         output: {{ dist: uniform, min: 8, max: 64 }}\n"
    )
}

fn build(text: &str) -> Result<slora_sim::RunSetup, ScenarioError> {
    let path = Path::new("tp.yaml");
    let loaded = Scenario::parse(text, path)?;
    loaded.points[0].scenario.build(path)
}

#[test]
fn llama_2_70b_builds_on_two_80gb_gpus_and_not_on_one() {
    let err = build(&text("llama-2-70b", "h100", 1))
        .err()
        .expect("70B does not fit one 80 GB GPU")
        .to_string();
    assert!(
        err.contains("does not fit") && err.contains("`tensor_parallel`"),
        "{err}"
    );
    let mut pages = 0;
    for tp in [2, 4, 8] {
        let setup = build(&text("llama-2-70b", "h100", tp)).unwrap();
        assert!(setup.engine.pool_pages > 2 * pages, "TP {tp}");
        pages = setup.engine.pool_pages;
        assert_eq!(setup.cost.provenance(), Provenance::Derived);
        assert!(
            setup.cost.describe().contains(&format!("TP {tp}")),
            "{}",
            setup.cost.describe()
        );
    }
    let setup = build(&text("llama-2-70b", "h100", 4)).unwrap();
    let run = simulate(&setup, None).unwrap();
    assert_eq!(run.metrics.requests.completed, 300);
    assert!(run.metrics.step_time_breakdown_s["tp_communication"] > 0.0);
}

#[test]
fn degrees_that_do_not_split_the_model_are_refused_naming_the_field() {
    let invalid = |text: &str| match build(text) {
        Err(ScenarioError::Invalid { field, reason, .. }) => (field, reason),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("built"),
    };
    for tp in [0, 3, 16] {
        let (field, reason) = invalid(&text("llama-7b", "h200", tp));
        assert_eq!(field, "tensor_parallel");
        assert!(reason.contains("1, 2, 4 and 8"), "{reason}");
    }
    // Llama-30B's 52 heads do not split over 8 GPUs.
    let (field, reason) = invalid(&text("llama-30b", "h200", 8));
    assert_eq!(field, "tensor_parallel");
    assert!(
        reason.contains("`num_heads`") && reason.contains("52"),
        "{reason}"
    );
    // Four KV heads cannot go to 8 GPUs without replicating them.
    let custom = "{ name: gqa4, hidden_size: 4096, num_layers: 32, num_heads: 32, \
                  num_kv_heads: 4, intermediate_size: 11008, vocab_size: 32000, \
                  max_position: 4096, rope_theta: 10000.0, dtype: fp16 }";
    let (field, reason) = invalid(&text(custom, "h200", 8));
    assert_eq!(field, "tensor_parallel");
    assert!(reason.contains("`num_kv_heads`"), "{reason}");
    assert!(build(&text(custom, "h200", 4)).is_ok());
}

#[test]
fn tensor_parallel_runs_on_the_derived_model_with_collectives_in_the_breakdown() {
    // The embedded H200 Llama-7B profile is TP 1: it makes TP 1 calibrated, TP 2 derived
    // (with efficiencies fitted to it).
    let one = build(&text("llama-7b", "h200", 1)).unwrap();
    let two = build(&text("llama-7b", "h200", 2)).unwrap();
    assert_eq!(two.cost.provenance(), Provenance::Derived);
    assert!(
        two.cost.describe().contains("TP 2"),
        "{}",
        two.cost.describe()
    );
    // Each GPU keeps half of every page: twice the pages, and more, since the weights halve.
    assert!(two.engine.pool_pages > 2 * one.engine.pool_pages);
    let run = simulate(&two, None).unwrap();
    assert_eq!(run.metrics.requests.completed, 300);
    let parts = &run.metrics.step_time_breakdown_s;
    assert!(parts["tp_communication"] > 0.0);
    assert!(parts["tp_communication"] < parts["base_gemm"]);
}
