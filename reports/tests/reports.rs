//! End-to-end tests: write a synthetic run and sweep, then check the files, not the pixels.

mod common;

use slora_reports::{capacity, write_run, write_sweep, ReportError};
use slora_sim::metrics::{Metrics, RunResult, SweepResult};
use std::fs;
use std::path::{Path, PathBuf};

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

const RUN_CHARTS: [&str; 5] = [
    "latency_cdf",
    "pool_occupancy",
    "batch",
    "step_breakdown",
    "adapter_ttft",
];
const SWEEP_CHARTS: [&str; 3] = ["throughput_vs_rate", "attainment_vs_rate", "capacity"];

fn expected(data: &[&str], charts: &[&str], pages: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = data.iter().map(|s| s.to_string()).collect();
    for c in charts {
        names.push(format!("{c}.png"));
        names.push(format!("{c}.svg"));
    }
    names.extend(pages.iter().map(|s| s.to_string()));
    names
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name)).unwrap()
}

/// No resource the page would fetch: no http(s) in src/href/url(), no scripts.
fn assert_self_contained(html: &str) {
    for bad in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "href='http",
        "url(http",
        "<script",
        "<link",
        "@import",
    ] {
        assert!(!html.contains(bad), "report references {bad}");
    }
}

fn assert_files(dir: &Path, written: &[PathBuf], expected: &[String]) {
    assert_eq!(names(written), expected);
    for path in written {
        assert!(path.starts_with(dir));
        let bytes = fs::read(path).unwrap();
        assert!(!bytes.is_empty(), "{} is empty", path.display());
        match path.extension().and_then(|e| e.to_str()) {
            Some("png") => assert!(bytes.starts_with(PNG_SIGNATURE), "{}", path.display()),
            Some("svg") => assert!(String::from_utf8(bytes).unwrap().contains("<svg")),
            _ => {}
        }
    }
}

#[test]
fn a_run_writes_every_file() {
    let run = common::run(400, 3_000, 12);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/run");
    let written = write_run(&dir, &run).unwrap();
    assert_files(
        &dir,
        &written,
        &expected(
            &["metrics.json", "requests.csv", "steps.csv"],
            &RUN_CHARTS,
            &["report.html", "report.md"],
        ),
    );

    // Axis titles are SVG text, so the charts say what they measure.
    for (chart, label) in [
        ("latency_cdf", "latency (s"),
        ("latency_cdf", "share of requests"),
        ("pool_occupancy", "time (s)"),
        ("pool_occupancy", "pool (GB)"),
        ("batch", "requests"),
        ("batch", "adapters"),
        ("step_breakdown", "step time (s)"),
        ("adapter_ttft", "TTFT (s)"),
        ("adapter_ttft", "adapter popularity rank"),
    ] {
        let svg = read(&dir, &format!("{chart}.svg"));
        assert!(svg.contains(label), "{chart}.svg lacks {label:?}");
    }

    let html = read(&dir, "report.html");
    assert_self_contained(&html);
    assert!(html.contains("<span class=\"badge derived\""));
    // The scenario name is escaped, every chart is inlined, the definitions are there.
    assert!(html.contains("synthetic &lt;llama-7b&gt; &amp; friends"));
    assert_eq!(html.matches("<svg").count(), RUN_CHARTS.len());
    assert!(html.contains("vLLM&#39;s definition"));
    for word in [
        "TTFT",
        "TPOT",
        "ITL",
        "E2E",
        "queueing",
        "goodput",
        "evictions",
    ] {
        assert!(html.contains(word), "report.html lacks {word}");
    }

    let md = read(&dir, "report.md");
    for chart in RUN_CHARTS {
        assert!(
            md.contains(&format!("]({chart}.png)")),
            "report.md lacks {chart}"
        );
    }
    assert!(md.contains("DERIVED"));

    let metrics: Metrics = serde_json::from_str(&read(&dir, "metrics.json")).unwrap();
    assert_eq!(metrics, run.metrics);

    let requests = read(&dir, "requests.csv");
    assert_eq!(requests.lines().count(), run.requests.len() + 1);
    let header: Vec<&str> = requests.lines().next().unwrap().split(',').collect();
    assert_eq!(header.len(), 15);
    assert!(requests.lines().all(|l| l.split(',').count() == 15));
    // A rejected request has no admission, first token, finish or latencies.
    let rejected = requests.lines().find(|l| l.contains(",rejected,")).unwrap();
    let cells: Vec<&str> = rejected.split(',').collect();
    assert_eq!(&cells[6..13], &["", "", "", "", "", "", ""]);

    let steps = read(&dir, "steps.csv");
    assert_eq!(steps.lines().count(), run.steps.len() + 1);
    assert!(steps.lines().all(|l| l.split(',').count() == 15));
}

#[test]
fn identical_runs_give_identical_bytes() {
    let run = common::run(300, 2_000, 6);
    let tmp = tempfile::tempdir().unwrap();
    let first = write_run(&tmp.path().join("a"), &run).unwrap();
    let second = write_run(&tmp.path().join("b"), &run).unwrap();
    for (a, b) in first.iter().zip(&second) {
        if a.extension().is_some_and(|e| e == "png") {
            continue;
        }
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "{} differs",
            a.display()
        );
    }
}

#[test]
fn a_sweep_writes_every_file() {
    let sweep = common::sweep(&[8, 64, 512], &[1.0, 2.0, 4.0, 8.0, 16.0]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let written = write_sweep(&dir, &sweep).unwrap();
    assert_files(
        &dir,
        &written,
        &expected(
            &["sweep.json", "sweep.csv"],
            &SWEEP_CHARTS,
            &["sweep.html", "sweep.md"],
        ),
    );
    for (chart, label) in [
        ("throughput_vs_rate", "offered rate (req/s)"),
        ("throughput_vs_rate", "achieved throughput (req/s)"),
        ("attainment_vs_rate", "SLO attainment"),
        ("attainment_vs_rate", "target 95%"),
        ("capacity", "adapters (log scale)"),
        ("capacity", "no tested rate met the SLO"),
    ] {
        let svg = read(&dir, &format!("{chart}.svg"));
        assert!(svg.contains(label), "{chart}.svg lacks {label:?}");
    }
    let html = read(&dir, "sweep.html");
    assert_self_contained(&html);
    assert!(html.contains("<span class=\"badge calibrated\""));
    assert_eq!(html.matches("<svg").count(), SWEEP_CHARTS.len());

    let back: SweepResult = serde_json::from_str(&read(&dir, "sweep.json")).unwrap();
    assert_eq!(back, sweep);
    let csv = read(&dir, "sweep.csv");
    assert_eq!(csv.lines().count(), 16);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("adapters.count,workload.rate,adapters,"));

    let cap = capacity(&sweep);
    let by_count: Vec<(u32, Option<f64>, bool)> = cap
        .iter()
        .map(|c| (c.adapters, c.max_rate_meeting_slo, c.is_lower_bound()))
        .collect();
    assert_eq!(
        by_count,
        vec![
            (8, Some(16.0), true),
            (64, Some(4.0), false),
            (512, None, false)
        ]
    );
}

#[test]
fn identical_sweeps_give_identical_bytes() {
    let sweep = common::sweep(&[8, 64, 512], &[1.0, 2.0, 4.0, 8.0, 16.0]);
    let tmp = tempfile::tempdir().unwrap();
    let first = write_sweep(&tmp.path().join("a"), &sweep).unwrap();
    let second = write_sweep(&tmp.path().join("b"), &sweep).unwrap();
    for (a, b) in first.iter().zip(&second) {
        if a.extension().is_some_and(|e| e == "png") {
            continue;
        }
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "{} differs",
            a.display()
        );
    }
}

#[test]
fn degenerate_sweeps_still_render() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, sweep) in [
        ("one-count", common::sweep(&[16], &[1.0, 2.0, 4.0])),
        ("one-rate", common::sweep(&[1, 8, 64], &[3.0])),
        ("one-point", common::sweep(&[4], &[2.0])),
        ("empty", SweepResult::default()),
    ] {
        let written =
            write_sweep(&tmp.path().join(name), &sweep).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(written.len(), 10, "{name}");
    }
}

#[test]
fn an_empty_run_still_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let written = write_run(tmp.path(), &RunResult::default()).unwrap();
    assert_eq!(written.len(), 15);
    assert!(read(tmp.path(), "latency_cdf.svg").contains("No completed requests"));
    assert_eq!(read(tmp.path(), "requests.csv").lines().count(), 1);
}

#[test]
fn a_file_in_the_way_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let err = write_run(&file, &common::run(10, 10, 2)).unwrap_err();
    assert!(matches!(err, ReportError::CreateDir { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );

    let err = write_sweep(&file, &SweepResult::default()).unwrap_err();
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_chart_that_cannot_be_written_names_the_chart_and_path() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory where the PNG should go makes the encoder's write fail.
    let blocker = tmp.path().join("batch.png");
    fs::create_dir(&blocker).unwrap();
    let err = write_run(tmp.path(), &common::run(20, 50, 2)).unwrap_err();
    match &err {
        ReportError::Chart { chart, path, .. } => {
            assert_eq!(*chart, "batch");
            assert_eq!(path, &blocker);
        }
        other => panic!("expected a chart error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("batch") && text.contains(&blocker.display().to_string()));

    // And a data file in the way names the data file.
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("steps.csv")).unwrap();
    let err = write_run(tmp.path(), &common::run(20, 50, 2)).unwrap_err();
    assert!(matches!(err, ReportError::Write { .. }), "{err:?}");
    assert!(err.to_string().contains("steps.csv"), "{err}");
}

/// A million requests and a million steps: a smoke test of the streaming and downsampling
/// paths (the timing itself belongs in a benchmark). Ignored by default: it writes ~200 MB.
#[test]
#[ignore = "writes ~200 MB; run with --ignored"]
fn a_million_requests_and_steps() {
    let run = common::run(1_000_000, 1_000_000, 2_000);
    let tmp = tempfile::tempdir().unwrap();
    let written = write_run(tmp.path(), &run).unwrap();
    assert_eq!(written.len(), 15);
    assert_eq!(read(tmp.path(), "requests.csv").lines().count(), 1_000_001);
    // Downsampled: each CDF curve is one polyline of at most 2,000 points.
    let svg = read(tmp.path(), "latency_cdf.svg");
    assert!(
        svg.len() < 1_000_000,
        "latency_cdf.svg is {} bytes",
        svg.len()
    );
}
