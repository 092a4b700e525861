//! slora-reports: the files a run or a sweep leaves behind.
//!
//! - [`write_run`]: `metrics.json`, `requests.csv`, `steps.csv`, five charts (PNG + SVG),
//!   `report.html` and `report.md`.
//! - [`write_sweep`]: `sweep.json`, `sweep.csv`, three charts (PNG + SVG) including the
//!   capacity chart, `sweep.html` and `sweep.md`.
//! - [`compare`] and [`write_comparison`]: two runs of one scenario side by side (a
//!   simulation against a live execution): `compare.json`, overlaid latency CDFs (PNG + SVG),
//!   `compare.html` and `compare.md`; [`load_run`] reads a run folder back.
//! - [`write_plan`]: a capacity plan (`slora-planner`): `plan.json`, three charts (PNG + SVG),
//!   `plan.html` and `plan.md`.
//!
//! Guarantees:
//! - **Deterministic.** Identical input gives byte-identical JSON, CSV, SVG, HTML and Markdown:
//!   nothing reads the clock or iterates a hash map. (PNG is deterministic too in practice,
//!   but only the encoder promises it.)
//! - **Self-contained.** The HTML inlines its CSS and SVGs and references no URL; the chart
//!   font is embedded in the library (`assets/DejaVuSans.ttf`), so output does not depend on
//!   the machine's fonts.
//! - **Bounded.** Charts draw at most 2,000 points per series however long the run (CDFs by
//!   quantile, time series by time bin), and CSVs stream, so a run of a million requests and a
//!   million steps costs one pass over each plus a sort per latency.
//! - **No panics.** Every failure is a [`ReportError`] naming the path (and chart) involved.

mod capacity;
mod charts;
mod compare;
mod downsample;
mod error;
mod files;
mod format;
mod html;
mod markdown;
mod page;
mod plan;
mod spread;
mod tables;

pub use capacity::{capacity, CapacityPoint};
pub use compare::{
    compare, load_run, pick_reference, read_run_text, relative_error, write_comparison,
    AdapterComparison, AdapterRow, Comparison, MetricRow, RunData, RunLabel, ADAPTER_TTFT_TARGET,
    MIN_ADAPTER_REQUESTS,
};
pub use error::ReportError;
pub use plan::write_plan;

use page::Page;
use slora_sim::metrics::{RunResult, SweepResult};
use std::path::{Path, PathBuf};

/// Writes every output of one run into `dir` (created if missing) and returns the paths
/// written, data files first, then charts (PNG, SVG per chart), then `report.html` and
/// `report.md`.
pub fn write_run(dir: &Path, run: &RunResult) -> Result<Vec<PathBuf>, ReportError> {
    files::create_dir(dir)?;
    let m = &run.metrics;
    let mut written = vec![
        files::write_json(&dir.join("metrics.json"), m)?,
        files::write_requests_csv(&dir.join("requests.csv"), &run.requests)?,
        files::write_steps_csv(&dir.join("steps.csv"), &run.steps)?,
    ];
    let mut rendered = Vec::new();
    for figure in charts::run::figures(run) {
        let chart = charts::render(dir, &figure)?;
        written.push(chart.png.clone());
        written.push(chart.svg.clone());
        rendered.push(chart);
    }
    let page = Page {
        kind: "Run report",
        scenario: m.scenario.clone(),
        provenance: vec![m.provenance],
        facts: vec![
            ("cost model".into(), m.cost_model.clone()),
            ("seed".into(), m.seed.to_string()),
            ("requests".into(), format::group(run.requests.len() as u64)),
            ("steps".into(), format::group(run.steps.len() as u64)),
            ("SLO".into(), tables::slo_sentence(&m.slo)),
        ],
        summary: tables::run_summary(m),
        charts: rendered,
        details: tables::run_details(m),
        definitions: m.definitions.clone(),
        data_files: vec![
            "metrics.json".into(),
            "requests.csv".into(),
            "steps.csv".into(),
        ],
    };
    written.push(files::write_bytes(
        &dir.join("report.html"),
        html::render(&page).as_bytes(),
    )?);
    written.push(files::write_bytes(
        &dir.join("report.md"),
        markdown::render(&page).as_bytes(),
    )?);
    Ok(written)
}

/// Writes every output of a sweep into `dir` (created if missing) and returns the paths
/// written, in the same order as [`write_run`].
pub fn write_sweep(dir: &Path, sweep: &SweepResult) -> Result<Vec<PathBuf>, ReportError> {
    files::create_dir(dir)?;
    let mut written = vec![
        files::write_json(&dir.join("sweep.json"), sweep)?,
        files::write_sweep_csv(&dir.join("sweep.csv"), sweep)?,
    ];
    let mut rendered = Vec::new();
    for figure in charts::sweep::figures(sweep) {
        let chart = charts::render(dir, &figure)?;
        written.push(chart.png.clone());
        written.push(chart.svg.clone());
        rendered.push(chart);
    }
    let first = sweep.points.first().map(|p| &p.metrics);
    let mut provenance: Vec<_> = sweep.points.iter().map(|p| p.metrics.provenance).collect();
    provenance.sort_by_key(|p| p.map(|p| p as u8));
    provenance.dedup();
    let mut counts: Vec<u32> = sweep.points.iter().map(|p| p.adapters).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut rates: Vec<f64> = sweep.points.iter().map(|p| p.offered_rate).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let list = |v: Vec<String>| v.join(", ");
    let mut facts = vec![
        ("points".to_string(), sweep.points.len().to_string()),
        (
            "adapter counts".to_string(),
            list(counts.iter().map(|c| format::group(*c as u64)).collect()),
        ),
        (
            "offered rates (req/s)".to_string(),
            list(rates.iter().map(|r| format::short(*r)).collect()),
        ),
    ];
    if let Some(m) = first {
        facts.push(("cost model".into(), m.cost_model.clone()));
        facts.push(("SLO".into(), tables::slo_sentence(&m.slo)));
    }
    let page = Page {
        kind: "Sweep report",
        scenario: sweep.scenario.clone(),
        provenance,
        facts,
        summary: vec![tables::capacity_table(&capacity(sweep))],
        charts: rendered,
        details: vec![tables::points_table(sweep)],
        definitions: first.map(|m| m.definitions.clone()).unwrap_or_default(),
        data_files: vec!["sweep.json".into(), "sweep.csv".into()],
    };
    written.push(files::write_bytes(
        &dir.join("sweep.html"),
        html::render(&page).as_bytes(),
    )?);
    written.push(files::write_bytes(
        &dir.join("sweep.md"),
        markdown::render(&page).as_bytes(),
    )?);
    Ok(written)
}
