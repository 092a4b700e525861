//! End-to-end tests of the command line: outputs, determinism, every shipped scenario, and
//! bad input (specific error, exit code 2, no panic).

mod common;

use common::{assert_clean_failure, bin, run, stderr, tmp};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small, fast scenario text with placeholders replaced.
fn small_scenario(extra: &str) -> String {
    format!(
        "name: small\nseed: 1\nmodel: llama-7b\ngpu: h200\n\
         adapters: {{ count: 20, ranks: [8, 16] }}\n\
         workload:\n  arrivals: {{ process: poisson, rate: 5 }}\n  duration_s: 20\n  \
         input: {{ dist: uniform, min: 8, max: 256 }}\n  output: {{ dist: uniform, min: 8, max: 128 }}\n\
         slo: {{ ttft_s: 1.0 }}\n{extra}"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_default_scenario_writes_every_output() {
    let dir = tmp("default");
    let out = dir.join("out");
    let o = run(&["simulate", "--quiet", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "metrics.json",
        "requests.csv",
        "steps.csv",
        "report.html",
        "report.md",
        "latency_cdf.png",
        "latency_cdf.svg",
        "pool_occupancy.png",
        "pool_occupancy.svg",
        "batch.png",
        "batch.svg",
        "step_breakdown.png",
        "step_breakdown.svg",
    ] {
        let p = out.join(f);
        assert!(
            p.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "missing {f}"
        );
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    for key in ["requests_per_s", "output_tokens_per_s"] {
        assert!(m["throughput"][key].as_f64().unwrap() > 0.0);
    }
    for key in ["ttft_s", "tpot_s", "e2e_s"] {
        for stat in ["mean", "p50", "p90", "p95", "p99"] {
            assert!(m[key][stat].is_number(), "{key}.{stat}");
        }
    }
    assert!(m["slo_attainment"].is_number());
    // The default scenario (Llama-7B on an H200) runs on the embedded H200 profile.
    assert_eq!(m["provenance"], "calibrated");
    let submitted = m["requests"]["submitted"].as_u64().unwrap();
    let ended = m["requests"]["completed"].as_u64().unwrap()
        + m["requests"]["aborted"].as_u64().unwrap()
        + m["requests"]["rejected"].as_u64().unwrap();
    assert_eq!(ended, submitted);
    // The embedded default is the shipped file.
    let embedded = std::fs::read(out.join("metrics.json")).unwrap();
    let out2 = dir.join("out2");
    let o = run(&[
        "simulate",
        "--quiet",
        "scenarios/default.yaml",
        "--out",
        out2.to_str().unwrap(),
    ]);
    let o = if o.status.success() {
        o
    } else {
        let path = repo().join("scenarios/default.yaml");
        run(&[
            "simulate",
            "--quiet",
            path.to_str().unwrap(),
            "--out",
            out2.to_str().unwrap(),
        ])
    };
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(embedded, std::fs::read(out2.join("metrics.json")).unwrap());
}

#[test]
fn same_seed_same_metrics_different_seed_different() {
    let dir = tmp("seed");
    let s = write(&dir, "s.yaml", &small_scenario(""));
    let go = |out: &str, seed: &str| {
        let out = dir.join(out);
        let o = run(&[
            "simulate",
            "--quiet",
            s.to_str().unwrap(),
            "--seed",
            seed,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out.join("metrics.json")).unwrap()
    };
    let a = go("a", "9");
    let b = go("b", "9");
    let c = go("c", "10");
    assert_eq!(a, b, "same seed must give a byte-identical metrics.json");
    assert_ne!(a, c, "a different seed must give a different run");
}

#[test]
fn every_shipped_scenario_runs() {
    let traces = repo().join("../shared/traces");
    let dir = tmp("shipped");
    for entry in std::fs::read_dir(repo().join("scenarios")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("shared/traces") && !traces.exists() {
            println!("skipping {}: ../shared/traces is absent", path.display());
            continue;
        }
        let out = dir.join(path.file_stem().unwrap());
        let o = run(&[
            "simulate",
            "--quiet",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}: {}", path.display(), stderr(&o));
        let has_sweep = text.contains("\nsweep:");
        let main_file = if has_sweep {
            "sweep.json"
        } else {
            "metrics.json"
        };
        assert!(
            out.join(main_file).exists(),
            "{}: no {main_file}",
            path.display()
        );
        if has_sweep {
            for f in [
                "capacity.png",
                "capacity.svg",
                "throughput_vs_rate.png",
                "attainment_vs_rate.png",
                "sweep.html",
            ] {
                assert!(out.join(f).exists(), "{}: no {f}", path.display());
            }
        }
    }
}

#[test]
fn unknown_fields_name_the_file_field_and_line() {
    let dir = tmp("unknown");
    let s = write(
        &dir,
        "typo.yaml",
        &small_scenario("polcy:\n  clustering: true\n"),
    );
    let o = run(&["simulate", s.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["typo.yaml", "unknown field `polcy`", "line 12"]);
    let s = write(
        &dir,
        "nested.yaml",
        &small_scenario("policy:\n  clustring: true\n"),
    );
    let o = run(&["simulate", s.to_str().unwrap()]);
    assert_clean_failure(
        &o,
        2,
        &["nested.yaml", "clustring", "line 13", "clustering"],
    );
}

#[test]
fn wrong_types_and_impossible_values_are_bad_input() {
    let dir = tmp("values");
    let cases = [
        (
            "type.yaml",
            small_scenario("").replace("count: 20", "count: twenty"),
            vec!["type.yaml", "adapters.count", "invalid type"],
        ),
        (
            "rate.yaml",
            small_scenario("").replace("rate: 5", "rate: -5"),
            vec!["rate.yaml", "workload.arrivals.rate", "-5"],
        ),
        (
            "rank.yaml",
            small_scenario("").replace("ranks: [8, 16]", "ranks: [0]"),
            vec!["rank.yaml", "adapters.ranks", "rank 0"],
        ),
        (
            "budget.yaml",
            small_scenario("policy: { max_prefill_tokens: -1 }\n"),
            vec!["budget.yaml", "max_prefill_tokens"],
        ),
        (
            "batch.yaml",
            small_scenario("policy: { max_batch_size: 0 }\n"),
            vec!["batch.yaml", "policy.max_batch_size", "at least 1"],
        ),
        (
            "gpu.yaml",
            small_scenario("").replace("gpu: h200", "gpu: h900"),
            vec!["gpu.yaml", "`gpu`", "h200"],
        ),
        (
            "abort.yaml",
            small_scenario("policy: { early_abort: true }\n").replace("slo: { ttft_s: 1.0 }\n", ""),
            vec!["abort.yaml", "slo.ttft_s"],
        ),
        (
            "sweep.yaml",
            small_scenario("sweep:\n  workload.arrivals.rat: [1, 2]\n"),
            vec!["sweep.yaml", "workload.arrivals.rat"],
        ),
    ];
    for (name, text, needles) in cases {
        let s = write(&dir, name, &text);
        let o = run(&["simulate", s.to_str().unwrap()]);
        assert_clean_failure(&o, 2, &needles);
    }
}

#[test]
fn a_model_that_does_not_fit_says_so_with_sizes() {
    let dir = tmp("fit");
    let text = small_scenario("")
        .replace("llama-7b", "llama-2-70b")
        .replace("gpu: h200", "gpu: l4");
    let s = write(&dir, "fit.yaml", &text);
    let o = run(&["simulate", s.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["fit.yaml", "llama-2-70b", "GB"]);
}

#[test]
fn missing_files_and_bad_arguments_exit_2() {
    let o = run(&["simulate", "/nonexistent/scenario.yaml"]);
    assert_clean_failure(&o, 2, &["/nonexistent/scenario.yaml", "cannot read"]);
    let o = run(&["simulate", "--no-such-flag"]);
    assert_clean_failure(&o, 2, &["--no-such-flag"]);
    let dir = tmp("garbage");
    let s = write(&dir, "garbage.yaml", "\u{0}\u{1}: [[[");
    let o = run(&["simulate", s.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["garbage.yaml"]);
}

#[test]
fn an_unwritable_output_folder_is_a_failed_run() {
    let dir = tmp("unwritable");
    let s = write(&dir, "s.yaml", &small_scenario(""));
    let blocker = write(&dir, "file", "not a folder");
    let o = run(&[
        "simulate",
        "--quiet",
        s.to_str().unwrap(),
        "--out",
        blocker.join("x").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 1, &["writing outputs"]);
}

#[test]
fn doctor_without_a_gpu_says_what_is_missing() {
    // Without the `cuda` feature it names the rebuild command; with it, on a machine without
    // a driver or GPU, it says which. Either way: exit 1, no panic.
    for args in [&["doctor"][..], &["bench-gpu"][..]] {
        let o = run(args);
        if o.status.success() {
            println!("a GPU is present: `{}` ran", args.join(" "));
            continue;
        }
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains("--features cuda") || err.contains("no usable NVIDIA GPU"),
            "{err}"
        );
        // The message names the command that failed, not another one.
        assert!(err.contains(&format!("slora-plan: {}:", args[0])), "{err}");
    }
}

#[test]
fn a_model_can_come_from_a_hugging_face_config() {
    let dir = tmp("hf");
    let model = dir.join("my-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "torch_dtype": "float16"}"#,
    )
    .unwrap();
    let s = write(
        &dir,
        "hf.yaml",
        &small_scenario("").replace("model: llama-7b", "model: { path: my-model }"),
    );
    let out = dir.join("out");
    let o = run(&[
        "simulate",
        "--quiet",
        s.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert!(
        m["cost_model"].as_str().unwrap().contains("my-model"),
        "{}",
        m["cost_model"]
    );
    // A folder without config.json is bad input naming the file.
    let s = write(
        &dir,
        "missing.yaml",
        &small_scenario("").replace("model: llama-7b", "model: { path: nowhere }"),
    );
    let o = run(&["simulate", s.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["missing.yaml", "`model`", "config.json"]);
}

/// Simulates the embedded default scenario with `seed` into `dir/name` and returns the folder.
fn simulate_default(dir: &Path, name: &str, seed: &str) -> PathBuf {
    let out = dir.join(name);
    let o = run(&[
        "simulate",
        "--quiet",
        "--seed",
        seed,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// `small_scenario("")` written into `dir` and simulated into `dir/name`: (scenario, run).
fn simulate_small(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let scenario = write(dir, "s.yaml", &small_scenario(""));
    let out = dir.join(name);
    let o = run(&[
        "simulate",
        "--quiet",
        scenario.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    (scenario, out)
}

#[test]
fn compare_two_runs_writes_every_output() {
    let dir = tmp("compare");
    let a = simulate_default(&dir, "a", "1");
    let b = simulate_default(&dir, "b", "2");
    let out = dir.join("cmp");
    // A folder and a metrics.json are both accepted.
    let o = run(&[
        "compare",
        a.to_str().unwrap(),
        b.join("metrics.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "| TTFT p99 (s) |",
        "| SLO attainment |",
        "Per-adapter TTFT p99",
    ] {
        assert!(stdout.contains(needle), "expected `{needle}` in: {stdout}");
    }
    for f in [
        "compare.json",
        "compare.md",
        "compare.html",
        "compare-cdf.png",
        "compare-cdf.svg",
    ] {
        let p = out.join(f);
        assert!(
            p.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "missing {f}"
        );
    }
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compare.json")).unwrap()).unwrap();
    // Neither run was executed: the first argument is the reference.
    assert_eq!(c["reference"]["seed"], 1);
    assert_eq!(c["predicted"]["seed"], 2);
    assert_eq!(c["reference"]["provenance"], "calibrated");
    let rows = c["rows"].as_array().unwrap();
    let row = |key: &str| {
        rows.iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("no row {key}"))
    };
    for key in [
        "request_throughput_req_s",
        "output_throughput_tok_s",
        "ttft_mean_s",
        "ttft_p50_s",
        "ttft_p90_s",
        "ttft_p99_s",
        "tpot_mean_s",
        "tpot_p99_s",
        "e2e_mean_s",
        "e2e_p99_s",
        "slo_attainment",
        "aborted",
        "rejected",
    ] {
        let r = row(key);
        assert!(
            r["reference"].is_number() && r["predicted"].is_number(),
            "{r}"
        );
    }
    // Different seeds differ, and the error is stated against the first run.
    let ttft = row("ttft_p99_s");
    let (reference, predicted) = (
        ttft["reference"].as_f64().unwrap(),
        ttft["predicted"].as_f64().unwrap(),
    );
    assert_ne!(reference, predicted);
    let signed = ttft["signed_error"].as_f64().unwrap();
    assert!((signed - (predicted - reference) / reference).abs() < 1e-12);
    assert_eq!(ttft["abs_error"].as_f64().unwrap(), signed.abs());
    // Latency rows carry the reference's sampling interval, around the reference's value.
    let interval = &ttft["reference_interval"];
    let (lo, hi) = (
        interval["lo"].as_f64().unwrap(),
        interval["hi"].as_f64().unwrap(),
    );
    assert!(lo <= reference && reference <= hi, "{ttft}");
    assert_eq!(
        ttft["within_reference_interval"].as_bool().unwrap(),
        lo <= predicted && predicted <= hi
    );
    assert!(row("request_throughput_req_s")["reference_interval"].is_null());
    // The default scenario's Zipf popularity gives several adapters 20+ requests.
    let adapters = &c["per_adapter_ttft_p99"];
    assert!(adapters["compared"].as_u64().unwrap() >= 5, "{adapters}");
    assert!(adapters["max_abs_error"].as_f64().unwrap() > 0.0);

    // A run against itself: every defined error is zero; run from another folder, the
    // output goes to out/compare-<scenario>/ there.
    let o = bin()
        .args([
            "compare",
            a.to_str().unwrap(),
            a.to_str().unwrap(),
            "--quiet",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty(), "--quiet printed output");
    let c: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("out/compare-default/compare.json")).unwrap(),
    )
    .unwrap();
    for r in c["rows"].as_array().unwrap() {
        assert!(
            r["signed_error"].is_null() || r["signed_error"] == 0.0,
            "{r}"
        );
    }
    assert_eq!(c["per_adapter_ttft_p99"]["within_target"], true);
}

/// Gzips `dir/name` into `dir/name.gz` and removes the plain file.
fn gzip_in_place(dir: &Path, name: &str) {
    use std::io::Write;
    let plain = dir.join(name);
    let bytes = std::fs::read(&plain).unwrap();
    let file = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    gz.write_all(&bytes).unwrap();
    gz.finish().unwrap();
    std::fs::remove_file(plain).unwrap();
}

#[test]
fn compare_reads_runs_stored_gzipped() {
    let dir = tmp("compare-gz");
    let a = simulate_default(&dir, "a", "1");
    let b = simulate_default(&dir, "b", "2");
    let compare_into = |out: &Path| {
        let o = run(&[
            "compare",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let plain_out = dir.join("plain");
    compare_into(&plain_out);
    // The repository keeps live runs as metrics.json.gz and requests.csv.gz.
    gzip_in_place(&b, "metrics.json");
    gzip_in_place(&b, "requests.csv");
    let gz_out = dir.join("gz");
    compare_into(&gz_out);
    let read = |d: &Path| std::fs::read_to_string(d.join("compare.json")).unwrap();
    let (plain, gz) = (read(&plain_out), read(&gz_out));
    // Same comparison; only the folders' names differ.
    let strip = |t: &str| {
        t.replace(&plain_out.display().to_string(), "")
            .replace(&gz_out.display().to_string(), "")
    };
    assert_eq!(strip(&plain), strip(&gz));
    // A truncated gzip is bad input naming the file, not a panic.
    let bytes = std::fs::read(b.join("requests.csv.gz")).unwrap();
    std::fs::write(b.join("requests.csv.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&[
        "compare",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--quiet",
    ]);
    assert_clean_failure(&o, 2, &["requests.csv.gz"]);
    // So is a metrics.json.gz that is not gzip at all.
    std::fs::write(b.join("metrics.json.gz"), "{\"scenario\": ").unwrap();
    let o = run(&[
        "compare",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--quiet",
    ]);
    assert_clean_failure(&o, 2, &["metrics.json.gz"]);
}

#[test]
fn compare_bad_input_exits_2_naming_the_file() {
    let dir = tmp("compare-bad");
    let (_, good) = simulate_small(&dir, "good");
    let good = good.to_str().unwrap();

    let missing = dir.join("no-such-run");
    let o = run(&["compare", missing.to_str().unwrap(), good]);
    assert_clean_failure(&o, 2, &["no-such-run", "cannot read"]);

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(&["compare", good, empty.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["empty", "no metrics.json"]);

    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    write(&broken, "metrics.json", "{\"scenario\": ");
    let o = run(&["compare", good, broken.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["broken/metrics.json", "line"]);

    let no_requests = dir.join("no-requests");
    std::fs::create_dir_all(&no_requests).unwrap();
    std::fs::copy(
        Path::new(good).join("metrics.json"),
        no_requests.join("metrics.json"),
    )
    .unwrap();
    let o = run(&["compare", good, no_requests.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["no-requests/requests.csv"]);

    let o = run(&["compare", good]);
    assert_clean_failure(&o, 2, &["<B>"]);

    // Runs of different scenarios compare, with a warning; an unwritable output is exit 1.
    let other = simulate_default(&dir, "other", "3");
    let out = dir.join("cmp");
    let o = run(&[
        "compare",
        good,
        other.to_str().unwrap(),
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("different scenarios"), "{}", stderr(&o));
    let blocker = write(&dir, "file", "not a folder");
    let o = run(&[
        "compare",
        good,
        good,
        "--out",
        blocker.join("x").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 1, &["writing outputs"]);
}

/// A simulated run replayed with its own scenario: the replay makes every step again, and
/// the cost model's parts of each step add up to the time the simulation gave it (the same
/// model priced the same plan), which only holds if the replay's shapes are the run's.
#[test]
fn replay_makes_a_runs_steps_again_and_prices_them() {
    let dir = tmp("replay");
    let (s, out) = simulate_small(&dir, "run");
    // The repository keeps runs gzipped; the replay reads either, or the run folder.
    gzip_in_place(&out, "steps.csv");
    let table = dir.join("replay.csv");
    let o = run(&[
        "replay",
        s.to_str().unwrap(),
        "--steps",
        out.to_str().unwrap(),
        "--out",
        table.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("0 with other prompt tokens or decode rows"),
        "{err}"
    );
    let text = std::fs::read_to_string(&table).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let parts: Vec<usize> = (0..header.len())
        .filter(|&i| header[i].ends_with("_s") && !["measured_s", "span_s"].contains(&header[i]))
        .collect();
    assert!(parts.len() >= 8, "{header:?}");
    let mut rows = 0;
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        let measured: f64 = cells[1].parse().unwrap();
        let model: f64 = parts
            .iter()
            .map(|&i| cells[i].parse::<f64>().unwrap())
            .sum();
        assert!(
            (model - measured).abs() < 1e-8 + 1e-6 * measured,
            "step {}: parts sum to {model}, the simulation gave {measured}",
            cells[0]
        );
        rows += 1;
    }
    assert!(rows > 100, "only {rows} steps");
    assert!(
        err.contains(&format!("{rows} of {rows} recorded steps")),
        "{err}"
    );
}

#[test]
fn replay_bad_input_is_named_and_exits_2() {
    let dir = tmp("replay-bad");
    let s = write(&dir, "s.yaml", &small_scenario(""));
    let o = run(&[
        "replay",
        s.to_str().unwrap(),
        "--steps",
        dir.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 2, &["without steps.csv or steps.csv.gz"]);
    let bad = write(
        &dir,
        "steps.csv",
        "start_s,duration_s,prefill_tokens\n0,1,2\n",
    );
    let o = run(&[
        "replay",
        s.to_str().unwrap(),
        "--steps",
        bad.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 2, &["steps.csv", "`decode_requests`"]);
    let sweep = write(
        &dir,
        "sweep.yaml",
        &small_scenario("sweep:\n  workload.arrivals.rate: [2, 4]\n"),
    );
    let o = run(&[
        "replay",
        sweep.to_str().unwrap(),
        "--steps",
        bad.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 2, &["sweep.yaml", "2 sweep points"]);
}

/// `catalog` lists which GPU x model combinations run on measured costs: every embedded
/// profile, by GPU key, model and date, and the GPU it was measured on.
#[test]
fn catalog_lists_the_embedded_calibration_profiles() {
    let o = run(&["catalog"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let listed: Vec<(String, String)> = out
        .split("Calibrated profiles embedded")
        .nth(1)
        .expect("a section of embedded profiles")
        .lines()
        .skip(2)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect();
    for (gpu, model) in [
        ("h200", "llama-7b"),
        ("h200", "llama-13b"),
        ("h200", "llama-3-8b"),
        ("h100-sxm", "llama-7b"),
        ("h100-sxm", "llama-3-8b"),
    ] {
        assert!(
            listed.contains(&(gpu.to_string(), model.to_string())),
            "{gpu} x {model} missing from:\n{out}"
        );
    }
    assert_eq!(listed.len(), slora_sim::embedded_profiles().len(), "{out}");
    assert!(out.contains("NVIDIA H100 80GB HBM3"), "{out}");
}

/// `--tune-gemms` only changes a live run: without `--execute` or `--compare` it is a usage
/// error, not silently ignored, and nothing is written.
#[test]
fn tune_gemms_without_a_live_run_is_a_usage_error() {
    let dir = tmp("tune-gemms");
    let o = run(&["simulate", "--tune-gemms", "--out", dir.to_str().unwrap()]);
    assert_clean_failure(&o, 2, &["--tune-gemms", "--execute or --compare"]);
    assert!(
        std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none()),
        "nothing is written for a usage error"
    );
}

/// `--step-time-scale F` simulates with every step F times as long: the same plans at light
/// load take F times as long per token, the cost model's line says so, and a factor that is
/// not a finite number above 0, or given with a live run, is a usage error.
#[test]
fn step_time_scale_multiplies_every_simulated_step() {
    let dir = tmp("step-time-scale");
    let scenario = write(&dir, "small.yaml", &small_scenario(""));
    let metrics = |args: &[&str], out: &str| {
        let out = dir.join(out);
        let mut all = vec!["simulate", scenario.to_str().unwrap(), "--quiet", "--out"];
        all.push(out.to_str().unwrap());
        all.extend_from_slice(args);
        let o = run(&all);
        assert!(o.status.success(), "{}", stderr(&o));
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
        m
    };
    let plain = metrics(&[], "plain");
    let slow = metrics(&["--step-time-scale", "1.5"], "slow");
    assert!(
        slow["cost_model"]
            .as_str()
            .unwrap()
            .ends_with("every step time x 1.5 (--step-time-scale)"),
        "{}",
        slow["cost_model"]
    );
    // 5 req/s on an H200 is far from any queue: a token takes 1.5 times as long.
    let (a, b) = (
        plain["tpot_s"]["p50"].as_f64().unwrap(),
        slow["tpot_s"]["p50"].as_f64().unwrap(),
    );
    assert!((b / a - 1.5).abs() < 0.05, "TPOT p50 {a} -> {b}");
    for (value, says) in [
        ("0", "finite and above 0, got 0"),
        ("-1", "finite and above 0, got -1"),
        ("inf", "finite and above 0, got inf"),
        ("fast", "not a number"),
    ] {
        let flag = format!("--step-time-scale={value}");
        let o = run(&["simulate", scenario.to_str().unwrap(), &flag]);
        assert_clean_failure(&o, 2, &["--step-time-scale", says]);
    }
    let o = run(&[
        "simulate",
        scenario.to_str().unwrap(),
        "--execute",
        "--step-time-scale",
        "1.1",
    ]);
    assert_clean_failure(&o, 2, &["--step-time-scale", "--execute or --compare"]);
}
