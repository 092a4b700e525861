//! `slora-plan plan` end to end: every output, exit codes 0 / 1 / 2, and bad input named
//! without a panic.

mod common;

use common::{assert_clean_failure, run, stderr, tmp};
use std::path::{Path, PathBuf};

/// A small, quick plan scenario; `plan` is appended inside its `plan:` section.
fn write_scenario(dir: &Path, slo: &str, plan: &str) -> PathBuf {
    let text = format!(
        "name: tiny\nseed: 1\nmodel: llama-7b\ngpu: h200\n\
         adapters: {{ count: 20, ranks: [8, 16] }}\n\
         workload:\n  arrivals: {{ process: poisson, rate: 5 }}\n  duration_s: 20\n  \
         input: {{ dist: uniform, min: 8, max: 256 }}\n  output: {{ dist: uniform, min: 8, max: 128 }}\n\
         slo: {slo}\n\
         plan:\n  target_rate: 10\n  max_replicas: 2\n  \
         search: {{ granularity: 0.1, duration_s: 20, min_requests: 50 }}\n{plan}"
    );
    let path = dir.join("tiny.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_plan_writes_every_output_and_recommends() {
    let dir = tmp("outputs");
    let scenario = write_scenario(&dir, "{ ttft_s: 1.0 }", "  gpus: [h200, l40s]\n");
    let out = dir.join("out");
    let o = run(&[
        "plan",
        scenario.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for needle in ["Buy: ", "What breaks first", "simulations in"] {
        assert!(stdout.contains(needle), "`{needle}` in: {stdout}");
    }
    for f in [
        "plan.json",
        "plan.html",
        "plan.md",
        "plan_capacity.png",
        "plan_capacity.svg",
        "plan_cost_vs_rate.png",
        "plan_cost_vs_rate.svg",
        "plan_pareto.png",
        "plan_pareto.svg",
    ] {
        assert!(out.join(f).exists(), "no {f}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("plan.json")).unwrap()).unwrap();
    assert_eq!(json["verdict"]["kind"], "recommended");
    assert!(json["simulations"].as_u64().unwrap() > 10);
    let top = &json["recommendations"][0];
    assert!(top["usd_per_hour"].as_f64().unwrap() > 0.0);
    assert!(top["headroom"].as_f64().unwrap() >= 1.0);
    let html = std::fs::read_to_string(out.join("plan.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("Recommendation"));
    // --quiet: no summary, same answer.
    let quiet = dir.join("quiet");
    let o = run(&[
        "plan",
        scenario.to_str().unwrap(),
        "--quiet",
        "--out",
        quiet.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert_eq!(
        std::fs::read(out.join("plan.json")).unwrap(),
        std::fs::read(quiet.join("plan.json")).unwrap()
    );
}

#[test]
fn no_configuration_meeting_the_target_exits_1_with_the_report() {
    let dir = tmp("none");
    let scenario = write_scenario(&dir, "{ ttft_s: 1.0 }", "");
    let out = dir.join("out");
    let o = run(&[
        "plan",
        scenario.to_str().unwrap(),
        "--target-rate",
        "100000",
        "--max-replicas",
        "1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(
        &o,
        1,
        &["no configuration tried meets 100000 req/s", "report:"],
    );
    assert!(out.join("plan.html").exists());
    let o = run(&[
        "plan",
        scenario.to_str().unwrap(),
        "--budget",
        "0.5",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 1, &["budget of $0.50/hour", "cheapest that does costs"]);
}

#[test]
fn bad_plan_input_exits_2_naming_the_field() {
    let dir = tmp("bad");
    let scenario = write_scenario(&dir, "{ ttft_s: 1.0 }", "");
    let s = scenario.to_str().unwrap();
    assert_clean_failure(
        &run(&["plan", s, "--target-rate", "0"]),
        2,
        &["--target-rate", "must be a request rate > 0"],
    );
    assert_clean_failure(
        &run(&["plan", s, "--gpus", "h200,h300"]),
        2,
        &["--gpus", "unknown GPU `h300`", "a100-80g"],
    );
    assert_clean_failure(
        &run(&["plan", s, "--tp", "3"]),
        2,
        &["--tp", "3 is not a tensor-parallel degree"],
    );
    assert_clean_failure(
        &run(&["plan", s, "--router", "random"]),
        2,
        &["--router", "unknown router `random`"],
    );
    let no_slo = write_scenario(&dir, "{ attainment_target: 0.9 }", "");
    assert_clean_failure(
        &run(&["plan", no_slo.to_str().unwrap()]),
        2,
        &["slo", "latency objective"],
    );
    let typo = write_scenario(&dir, "{ ttft_s: 1.0 }", "  gpu_kinds: [h200]\n");
    assert_clean_failure(
        &run(&["plan", typo.to_str().unwrap()]),
        2,
        &["plan:", "gpu_kinds", "line"],
    );
    assert_clean_failure(
        &run(&["plan", dir.join("missing.yaml").to_str().unwrap()]),
        2,
        &["missing.yaml", "cannot read"],
    );
}
