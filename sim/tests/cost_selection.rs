//! Which cost model a scenario runs on: a `gpu_profile:` of the scenario's GPU makes it
//! calibrated, an H200 one fits another GPU's derived model, `efficiency:` keeps it derived,
//! and a profile that cannot serve the scenario is an error naming the field and the file.

use slora_engine::{ModelSpec, TargetModule};
use slora_sim::calibrated::{profile_from_cost_model, SyntheticGrids};
use slora_sim::cost::{find_gpu, AnalyticCost, CalibrationProfile, Efficiency};
use slora_sim::{BatchShape, CostModel, Provenance, RunSetup, Scenario, ScenarioError};
use std::path::{Path, PathBuf};

/// A folder of its own for each test, under the system's temporary folder.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "slora-cost-selection-{}-{test}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A profile "measured" on catalogue GPU `gpu` for preset `model`: the derived model's
/// predictions with the default efficiencies.
fn synthetic_profile(gpu: &str, model: &str) -> CalibrationProfile {
    let model = ModelSpec::preset(model).unwrap();
    let derived = AnalyticCost::new(
        find_gpu(gpu).unwrap(),
        &model,
        1,
        Efficiency::default(),
        &TargetModule::ATTENTION,
    )
    .unwrap();
    profile_from_cost_model(
        &derived,
        gpu,
        &model,
        &TargetModule::ATTENTION,
        &SyntheticGrids::default(),
    )
}

fn write_profile(dir: &Path, name: &str, profile: &CalibrationProfile) {
    std::fs::write(dir.join(name), serde_json::to_string(profile).unwrap()).unwrap();
}

/// A small scenario of Llama-7B on `gpu`, with `extra` lines at the top level.
fn scenario_text(gpu: &str, extra: &str) -> String {
    format!(
        "name: cost-selection\nmodel: llama-7b\ngpu: {gpu}\n{extra}\n\
         adapters: {{ count: 4, ranks: [8, 16] }}\n\
         workload:\n  arrivals: {{ process: poisson, rate: 5 }}\n  requests: 20\n  \
         input: {{ dist: fixed, value: 64 }}\n  output: {{ dist: fixed, value: 8 }}\n"
    )
}

/// Writes the scenario to `dir/scenario.yaml`, loads it from there and builds its one point.
fn build_in(dir: &Path, text: &str) -> Result<RunSetup, ScenarioError> {
    build_with(dir, text, &[])
}

fn build_with(
    dir: &Path,
    text: &str,
    extra: &[CalibrationProfile],
) -> Result<RunSetup, ScenarioError> {
    let path = dir.join("scenario.yaml");
    std::fs::write(&path, text).unwrap();
    let loaded = Scenario::load(&path)?;
    loaded.points[0]
        .scenario
        .build_with_profiles(&loaded.path, extra)
}

fn decode_shape() -> BatchShape {
    BatchShape {
        decode_requests: 32,
        decode_context_tokens: 32 * 512,
        max_decode_context: 512,
        ..BatchShape::default()
    }
}

#[test]
fn gpu_profile_of_the_scenarios_gpu_makes_the_run_calibrated() {
    let dir = temp_dir("calibrated");
    write_profile(&dir, "h200.json", &synthetic_profile("h200", "llama-7b"));
    // A relative path: resolved from the scenario's folder, not the working directory.
    let setup = build_in(&dir, &scenario_text("h200", "gpu_profile: h200.json")).unwrap();
    assert_eq!(setup.cost.provenance(), Provenance::Calibrated);
    let d = setup.cost.describe();
    for part in [
        "calibrated",
        "NVIDIA H200",
        "llama-7b",
        "2026-01-01",
        "h200.json",
    ] {
        assert!(d.contains(part), "`{part}` missing from: {d}");
    }
    // The profile is the derived model's predictions, so the two agree where it was measured
    // (the derived model built directly: an H200 scenario without a profile now runs on the
    // embedded H200 profiles).
    let derived = AnalyticCost::new(
        find_gpu("h200").unwrap(),
        &ModelSpec::preset("llama-7b").unwrap(),
        1,
        Efficiency::default(),
        &TargetModule::ATTENTION,
    )
    .unwrap();
    let (got, want) = (
        setup.cost.step_cost(&decode_shape()).total().as_secs_f64(),
        derived.step_cost(&decode_shape()).total().as_secs_f64(),
    );
    assert!((got / want - 1.0).abs() < 0.02, "{got} vs {want}");
}

#[test]
fn without_a_profile_the_run_is_derived() {
    let dir = temp_dir("derived");
    // No profile is embedded for an A100, so whatever H200 profiles the binary carries, this
    // run is derived (with efficiencies fitted to one of them, or the defaults).
    let setup = build_in(&dir, &scenario_text("a100-80g", "")).unwrap();
    assert_eq!(setup.cost.provenance(), Provenance::Derived);
    assert!(setup.cost.describe().starts_with("derived"));
}

#[test]
fn efficiency_keeps_the_derived_model_and_excludes_gpu_profile() {
    let dir = temp_dir("efficiency");
    write_profile(&dir, "h200.json", &synthetic_profile("h200", "llama-7b"));
    let extra = [synthetic_profile("h200", "llama-7b")];
    let text = scenario_text("h200", "efficiency: { weight_streaming: 0.5 }");
    // Even with a matching profile among the candidates.
    let setup = build_with(&dir, &text, &extra).unwrap();
    assert_eq!(setup.cost.provenance(), Provenance::Derived);
    let d = setup.cost.describe();
    assert!(d.contains("the scenario's efficiency factors"), "{d}");

    let text = scenario_text(
        "h200",
        "efficiency: { weight_streaming: 0.5 }\ngpu_profile: h200.json",
    );
    let e = build_in(&dir, &text).err().unwrap().to_string();
    assert!(
        e.contains("scenario.yaml") && e.contains("`efficiency`") && e.contains("`gpu_profile`"),
        "{e}"
    );
}

#[test]
fn extra_profiles_are_candidates_beside_the_embedded_ones() {
    let dir = temp_dir("extra");
    let extra = [synthetic_profile("h200", "llama-7b")];
    let setup = build_with(&dir, &scenario_text("h200", ""), &extra).unwrap();
    assert_eq!(setup.cost.provenance(), Provenance::Calibrated);
    // A candidate of another GPU does not make the run calibrated (the A100 has no embedded
    // profile; the H100 has, for Llama-7B).
    let setup = build_with(&dir, &scenario_text("a100-80g", ""), &extra).unwrap();
    assert_eq!(setup.cost.provenance(), Provenance::Derived);
}

#[test]
fn h200_profile_fits_the_derived_model_of_another_gpu() {
    let dir = temp_dir("fitted");
    write_profile(&dir, "h200.json", &synthetic_profile("h200", "llama-7b"));
    let setup = build_in(&dir, &scenario_text("h100", "gpu_profile: h200.json")).unwrap();
    assert_eq!(setup.cost.provenance(), Provenance::Derived);
    let d = setup.cost.describe();
    assert!(
        d.contains("fitted to the H200") && d.contains("h200.json"),
        "{d}"
    );
}

#[test]
fn gpu_profile_of_another_gpu_than_an_h200_is_an_error_naming_both() {
    let dir = temp_dir("other-gpu");
    write_profile(
        &dir,
        "a100.json",
        &synthetic_profile("a100-80g", "llama-7b"),
    );
    let e = build_in(&dir, &scenario_text("h100", "gpu_profile: a100.json"))
        .err()
        .unwrap()
        .to_string();
    for part in [
        "scenario.yaml",
        "`gpu_profile`",
        "a100.json",
        "A100",
        "H100",
    ] {
        assert!(e.contains(part), "`{part}` missing from: {e}");
    }
}

#[test]
fn gpu_profile_of_another_model_shape_is_an_error_naming_both_shapes() {
    let dir = temp_dir("other-model");
    write_profile(&dir, "13b.json", &synthetic_profile("h200", "llama-13b"));
    let e = build_in(&dir, &scenario_text("h200", "gpu_profile: 13b.json"))
        .err()
        .unwrap()
        .to_string();
    for part in [
        "scenario.yaml",
        "`gpu_profile`",
        "13b.json",
        "llama-13b",
        "llama-7b",
        "hidden_size: profile 5120, wanted 4096",
    ] {
        assert!(e.contains(part), "`{part}` missing from: {e}");
    }
}

#[test]
fn missing_gpu_profile_is_an_error_naming_the_path() {
    let dir = temp_dir("missing");
    let e = build_in(
        &dir,
        &scenario_text("h200", "gpu_profile: nowhere/h200.json"),
    )
    .err()
    .unwrap();
    assert!(matches!(e, ScenarioError::Invalid { ref field, .. } if field == "gpu_profile"));
    let e = e.to_string();
    let resolved = dir.join("nowhere/h200.json");
    assert!(
        e.contains("scenario.yaml") && e.contains(&resolved.display().to_string()),
        "{e}"
    );
}

#[test]
fn invalid_gpu_profile_is_an_error_naming_the_path() {
    let dir = temp_dir("invalid");
    std::fs::write(dir.join("broken.json"), "{ \"format_version\": 1 }").unwrap();
    let e = build_in(&dir, &scenario_text("h200", "gpu_profile: broken.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`gpu_profile`") && e.contains("broken.json") && e.contains("not a valid"),
        "{e}"
    );
}

/// The GEMM algorithms a run's calibrated profile recorded reach its `RunSetup` (for
/// `--execute` to adopt) only where the run is calibrated on that profile: named or among the
/// extra profiles, measured on the scenario's GPU; a derived run (another GPU, or
/// `efficiency:`) and a profile without them give none.
#[test]
fn a_calibrated_runs_setup_carries_its_profiles_gemm_algorithms() {
    use slora_sim::cost::{GemmAlgorithms, GemmBucketAlgorithm};
    let dir = temp_dir("gemm-algorithms");
    let mut h200 = synthetic_profile("h200", "llama-7b");
    h200.gemm_algorithms = Some(GemmAlgorithms {
        cublaslt_version: 130_100,
        buckets: vec![GemmBucketAlgorithm {
            tokens: 48,
            inp: 4096,
            out: 12288,
            accumulate: false,
            algo: [u64::MAX, 1, 2, 3, 4, 5, 6, 7],
        }],
    });
    write_profile(&dir, "with.json", &h200);
    write_profile(&dir, "without.json", &synthetic_profile("h200", "llama-7b"));

    let named = build_in(&dir, &scenario_text("h200", "gpu_profile: with.json")).unwrap();
    let got = named
        .gemm_algorithms
        .expect("a calibrated run on its profile's GPU");
    assert_eq!(got.algorithms, h200.gemm_algorithms.clone().unwrap());
    assert_eq!(got.gpu_name, h200.gpu_name);
    assert!(got.profile.contains("llama-7b"), "{}", got.profile);

    // The same profile among the extra ones (as `--profiles` gives them), newest of its GPU.
    let mut newest = h200.clone();
    newest.date = "2999-01-01".into();
    let extra = build_with(&dir, &scenario_text("h200", ""), &[newest]).unwrap();
    assert!(extra.gemm_algorithms.is_some());

    for (gpu, extra_line) in [
        ("h200", "gpu_profile: without.json"),
        ("h100-sxm", "gpu_profile: with.json"),
        ("h200", "efficiency: {}"),
    ] {
        let setup = build_in(&dir, &scenario_text(gpu, extra_line)).unwrap();
        assert!(setup.gemm_algorithms.is_none(), "{gpu}, {extra_line}");
    }
}
