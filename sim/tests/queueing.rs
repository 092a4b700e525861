//! Independent checks of the event loop against queueing theory and conservation laws.

use slora_engine::Nanos;
use slora_sim::{simulate, BatchShape, Scenario};
use std::path::Path;

fn scenario(text: &str) -> slora_sim::RunSetup {
    let loaded = Scenario::parse(text, Path::new("test.yaml")).unwrap();
    loaded.points[0]
        .scenario
        .build(Path::new("test.yaml"))
        .unwrap()
}

/// Batch size 1, fixed prompt, one output token, no adapters: every request is one step of
/// the same cost D, so the server is an M/D/1 queue with mean wait `rho D / (2 (1 - rho))`.
#[test]
fn constant_service_matches_the_md1_mean_waiting_time() {
    // Find D from the cost model first, for the shape every step will have.
    let probe = scenario(&md1_text(1.0, 10));
    let shape = BatchShape {
        prefill_requests: 1,
        prefill_tokens: 64,
        prefill_attention_pairs: 64 * 65 / 2,
        max_prefill_tokens: 64,
        ..BatchShape::default()
    };
    let d = probe.cost.step_cost(&shape).total().as_secs_f64();
    for rho in [0.5, 0.8] {
        let rate = rho / d;
        let setup = scenario(&md1_text(rate, 200_000));
        let run = simulate(&setup, None).unwrap();
        // Every step has the same duration D.
        assert!(run
            .steps
            .iter()
            .all(|s| (s.duration.as_secs_f64() - d).abs() < 1e-9));
        let measured_rho = rate * d;
        let expected = measured_rho * d / (2.0 * (1.0 - measured_rho));
        let waits: Vec<f64> = run
            .requests
            .iter()
            .map(|r| r.queueing().unwrap().as_secs_f64())
            .collect();
        let mean = waits.iter().sum::<f64>() / waits.len() as f64;
        let err = (mean - expected).abs() / expected;
        assert!(
            err < 0.03,
            "rho {rho}: mean wait {mean:.6} s vs M/D/1 {expected:.6} s ({:.1}%)",
            err * 100.0
        );
    }
}

fn md1_text(rate: f64, requests: u64) -> String {
    format!(
        "name: md1\nseed: 3\nmodel: llama-7b\ngpu: h200\n\
         adapters: {{ count: 0, ranks: [] }}\n\
         workload:\n  arrivals: {{ process: poisson, rate: {rate} }}\n  requests: {requests}\n  \
         input: {{ dist: fixed, value: 64 }}\n  output: {{ dist: fixed, value: 1 }}\n\
         policy: {{ max_batch_size: 1 }}\n"
    )
}

#[test]
fn throughput_never_exceeds_the_offered_rate_and_every_request_ends() {
    for (rate, cv, abort) in [
        (2.0, 1.0, false),
        (40.0, 1.0, true),
        (200.0, 4.0, true),
        (200.0, 1.0, false),
    ] {
        let text = format!(
            "name: load\nseed: 9\nmodel: llama-7b\ngpu: h200\n\
             adapters: {{ count: 200, ranks: [8, 64] }}\n\
             workload:\n  arrivals: {{ process: gamma, rate: {rate}, cv: {cv} }}\n  duration_s: 30\n  \
             input: {{ dist: uniform, min: 8, max: 512 }}\n  output: {{ dist: uniform, min: 8, max: 512 }}\n\
             policy: {{ early_abort: {abort}, min_time_to_first_token_s: 0.5 }}\n\
             slo: {{ ttft_s: 6 }}\n"
        );
        let setup = scenario(&text);
        let run = simulate(&setup, None).unwrap();
        let m = &run.metrics;
        let c = &m.requests;
        assert_eq!(
            c.completed + c.aborted + c.rejected,
            c.submitted,
            "rate {rate}"
        );
        assert_eq!(c.submitted as usize, setup.arrivals.len());
        // Completed requests over the window cannot outnumber arrivals over it.
        assert!(
            m.throughput.requests_per_s <= c.submitted as f64 / m.throughput.window_s + 1e-9,
            "rate {rate}: {} > offered",
            m.throughput.requests_per_s
        );
        assert!(
            m.throughput.requests_per_s <= rate * 1.25,
            "rate {rate}: {}",
            m.throughput.requests_per_s
        );
        if abort {
            assert!(run
                .requests
                .iter()
                .filter(|r| r.first_token.is_some())
                .all(|r| r.ttft().unwrap() <= Nanos::from_secs(6) + Nanos::from_millis(600)));
        }
    }
}

#[test]
fn one_rng_per_run_same_seed_same_result() {
    let text = "name: det\nseed: 4\nmodel: llama-7b\ngpu: h200\n\
        adapters: { count: 50, ranks: [8, 16, 32, 64], popularity: { law: zipf, s: 1.1 } }\n\
        workload:\n  arrivals: { process: gamma, rate: 20, cv: 2 }\n  duration_s: 20\n  \
        input: { dist: uniform, min: 8, max: 512 }\n  output: { dist: uniform, min: 8, max: 512 }\n";
    let a = simulate(&scenario(text), None).unwrap();
    let b = simulate(&scenario(text), None).unwrap();
    assert_eq!(
        serde_json::to_string(&a.metrics).unwrap(),
        serde_json::to_string(&b.metrics).unwrap()
    );
    assert_eq!(a.requests, b.requests);
}
