//! Two runs of one scenario side by side: a prediction (usually the simulator) against a
//! reference (usually a live execution on a GPU, provenance `executed`).
//!
//! - [`load_run`] reads a run folder back: `metrics.json` and `requests.csv`.
//! - [`pick_reference`] decides which of two runs is the reference.
//! - [`compare`] (pure) computes every row: a headline metric of both runs with its signed and
//!   absolute relative error, and the per-adapter p99 TTFT errors; beside each latency
//!   statistic, the reference's 90% sampling interval (`crate::spread`: how precisely a run of
//!   that length measures it) and whether the prediction falls inside.
//! - [`write_comparison`] writes `compare.json`, `compare.md`, `compare.html` and the
//!   overlaid latency CDFs `compare-cdf.png` / `compare-cdf.svg`.
//!
//! Relative error is `(predicted − reference) / reference`: positive when the prediction is
//! higher (slower latencies, or more throughput, than measured). Where the reference is zero
//! (or either value is not finite) it is undefined: `None` in the data, `null` in JSON, "n/a"
//! in the reports, never an infinity.
//!
//! Per-adapter p99 TTFT uses the run's own `metrics.json` figures when it lists adapters, and
//! otherwise computes them from `requests.csv` with the simulator's estimator
//! ([`slora_sim::metrics::summarize`], over completed requests), which is the same definition.
//!
//! Cost: loading is one streamed pass over `requests.csv`; comparing is one pass over each
//! run's requests plus a sort per adapter, and 400 bootstrap resamples of the reference's
//! latencies (about 40 ms for 1,200 requests); the chart sorts each latency once.

use crate::charts::{self, color, Axis, Body, Figure, LegendAt, LineChart, Series, SeriesKind};
use crate::downsample::{cdf_points, cdf_steps, MAX_POINTS};
use crate::error::ReportError;
use crate::files;
use crate::format::{group, percent, percent_short, short};
use crate::html;
use crate::markdown;
use crate::page::Page;
use crate::spread::{self, Interval, Stat};
use crate::tables::Table;
use serde::Serialize;
use slora_engine::Nanos;
use slora_sim::cost::Provenance;
use slora_sim::metrics::{summarize, Metrics, RequestRecord, RequestStatus, Summary};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Adapters need at least this many completed requests in *each* run for their p99 TTFT to be
/// compared: below it a p99 is the maximum of a handful of samples, mostly noise.
pub const MIN_ADAPTER_REQUESTS: u64 = 20;

/// The fidelity target of the per-adapter p99 TTFT (issue 5): within 15% of the reference.
pub const ADAPTER_TTFT_TARGET: f64 = 0.15;

/// One run read back from its folder.
#[derive(Clone, Debug)]
pub struct RunData {
    /// The folder holding `metrics.json` and `requests.csv`.
    pub dir: PathBuf,
    pub metrics: Metrics,
    /// One record per row of `requests.csv`, times exact to the nanosecond.
    pub requests: Vec<RequestRecord>,
}

/// `path`, or `path.gz` when only the compressed file exists (run folders kept in the
/// repository are stored gzipped).
fn plain_or_gz(path: PathBuf) -> PathBuf {
    if path.is_file() {
        return path;
    }
    let mut gz = path.clone().into_os_string();
    gz.push(".gz");
    let gz = PathBuf::from(gz);
    if gz.is_file() {
        gz
    } else {
        path
    }
}

/// Opens `path` for buffered reading, decompressing it when its name ends in `.gz`.
fn open_run_file(path: &Path) -> Result<Box<dyn BufRead>, ReportError> {
    let file = File::open(path).map_err(|source| ReportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// The whole text of a run's file (`steps.csv`, `requests.csv`, ...), decompressed when its
/// name ends in `.gz`. Errors name the file.
pub fn read_run_text(path: &Path) -> Result<String, ReportError> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut open_run_file(path)?, &mut text).map_err(|source| {
        ReportError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(text)
}

/// Reads a run written by `slora-plan simulate` (or `simulate --execute`): `path` is the run
/// folder or its `metrics.json`; `requests.csv` must sit beside it. Either file may be stored
/// gzipped instead (`metrics.json.gz`, `requests.csv.gz`). Errors name the file and what is
/// wrong with it (missing, not a run folder, malformed JSON or gzip, a bad CSV line).
pub fn load_run(path: &Path) -> Result<RunData, ReportError> {
    let meta = std::fs::metadata(path).map_err(|source| ReportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (dir, metrics_path) = if meta.is_dir() {
        let metrics = plain_or_gz(path.join("metrics.json"));
        if !metrics.is_file() {
            let reason = if path.join("sweep.json").is_file() {
                "a sweep folder, not a run: compare one of its points (points/<point>/)"
            } else {
                "no metrics.json (or metrics.json.gz) here: not a run folder written by `slora-plan simulate`"
            };
            return Err(invalid(path, reason));
        }
        (path.to_path_buf(), metrics)
    } else {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir, path.to_path_buf())
    };
    let reader = open_run_file(&metrics_path)?;
    let metrics: Metrics = serde_json::from_reader(reader).map_err(|e| {
        invalid(
            &metrics_path,
            format!("not the metrics.json of a slora-plan run: {e}"),
        )
    })?;
    let requests = read_requests(&plain_or_gz(dir.join("requests.csv")))?;
    Ok(RunData {
        dir,
        metrics,
        requests,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> ReportError {
    ReportError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Where each field sits in a `requests.csv` row. Columns are found by name, so a file with
/// extra or reordered columns still reads; the derived columns (`ttft_s`, …) are ignored and
/// recomputed from the times, so the two runs share one definition.
struct RequestColumns {
    width: usize,
    id: Option<usize>,
    adapter: usize,
    tenant: Option<usize>,
    prompt_tokens: Option<usize>,
    output_tokens: usize,
    arrival: usize,
    admitted: Option<usize>,
    first_token: usize,
    finish: usize,
    status: usize,
    preemptions: Option<usize>,
}

impl RequestColumns {
    fn find(header: &str) -> Result<RequestColumns, String> {
        let names: Vec<&str> = header.split(',').map(str::trim).collect();
        let at = |name: &str| names.iter().position(|n| *n == name);
        let need = |name: &str| {
            at(name).ok_or_else(|| {
                format!(
                    "the header has no `{name}` column (expected slora-plan's columns: {})",
                    files::REQUEST_COLUMNS
                )
            })
        };
        Ok(RequestColumns {
            width: names.len(),
            id: at("id"),
            adapter: need("adapter")?,
            tenant: at("tenant"),
            prompt_tokens: at("prompt_tokens"),
            output_tokens: need("output_tokens")?,
            arrival: need("arrival_s")?,
            admitted: at("admitted_s"),
            first_token: need("first_token_s")?,
            finish: need("finish_s")?,
            status: need("status")?,
            preemptions: at("preemptions"),
        })
    }

    fn parse(&self, cells: &[&str], row: usize) -> Result<RequestRecord, String> {
        if cells.len() != self.width {
            return Err(format!(
                "{} cells, but the header has {}",
                cells.len(),
                self.width
            ));
        }
        let opt = |i: Option<usize>| i.map(|i| cells[i].trim()).filter(|c| !c.is_empty());
        let num = |name: &str, text: &str| -> Result<u64, String> {
            text.parse()
                .map_err(|_| format!("`{name}` is `{text}`, not a whole number"))
        };
        let small = |name: &str, text: &str| -> Result<u32, String> {
            u32::try_from(num(name, text)?).map_err(|_| format!("`{name}` {text} is too large"))
        };
        let time = |name: &str, i: Option<usize>| -> Result<Option<Nanos>, String> {
            opt(i)
                .map(|t| parse_seconds(t).map_err(|e| format!("`{name}`: {e}")))
                .transpose()
        };
        let status = match cells[self.status].trim() {
            "completed" => RequestStatus::Completed,
            "aborted" => RequestStatus::Aborted,
            "rejected" => RequestStatus::Rejected,
            other => {
                return Err(format!(
                    "`status` is `{other}`; expected completed, aborted or rejected"
                ))
            }
        };
        let arrival = time("arrival_s", Some(self.arrival))?
            .ok_or("`arrival_s` is empty: every request has an arrival time")?;
        let first_token = time("first_token_s", Some(self.first_token))?;
        let finish = time("finish_s", Some(self.finish))?;
        for (name, t) in [("first_token_s", first_token), ("finish_s", finish)] {
            if t.is_some_and(|t| t < arrival) {
                return Err(format!("`{name}` is before `arrival_s`"));
            }
        }
        Ok(RequestRecord {
            id: opt(self.id)
                .map(|t| num("id", t))
                .transpose()?
                .unwrap_or(row as u64),
            adapter: opt(Some(self.adapter))
                .map(|t| small("adapter", t))
                .transpose()?,
            tenant: opt(self.tenant).map(|t| small("tenant", t)).transpose()?,
            prompt_tokens: opt(self.prompt_tokens)
                .map(|t| small("prompt_tokens", t))
                .transpose()?
                .unwrap_or(0),
            output_tokens: small("output_tokens", cells[self.output_tokens].trim())?,
            arrival,
            admitted: time("admitted_s", self.admitted)?,
            first_token,
            finish,
            status,
            preemptions: opt(self.preemptions)
                .map(|t| small("preemptions", t))
                .transpose()?
                .unwrap_or(0),
        })
    }
}

/// Seconds as written by `write_requests_csv` (`12.000000345`) read back exactly; other
/// non-negative decimal forms (`1e-3`) are rounded to the nearest nanosecond.
fn parse_seconds(text: &str) -> Result<Nanos, String> {
    let exact = || -> Option<u64> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
            return None;
        }
        let secs: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        // Digits past the ninth are below a nanosecond: dropped.
        let ns = fraction
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(9)
            .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
        secs.checked_mul(1_000_000_000)?.checked_add(ns)
    };
    if let Some(ns) = exact() {
        return Ok(Nanos(ns));
    }
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 && s < u64::MAX as f64 / 1e9 => {
            Ok(Nanos::from_secs_f64(s))
        }
        _ => Err(format!("`{text}` is not a time in seconds")),
    }
}

/// Reads `requests.csv` in one streamed pass.
fn read_requests(path: &Path) -> Result<Vec<RequestRecord>, ReportError> {
    let read_error = |source| ReportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut lines = open_run_file(path)?.lines();
    let header = match lines.next() {
        Some(line) => line.map_err(read_error)?,
        None => return Err(invalid(path, "the file is empty; expected a header line")),
    };
    let columns = RequestColumns::find(header.trim_end_matches('\r'))
        .map_err(|reason| invalid(path, format!("line 1: {reason}")))?;
    let mut requests = Vec::new();
    for (index, line) in lines.enumerate() {
        let line = line.map_err(read_error)?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        let record = columns
            .parse(&cells, requests.len())
            .map_err(|reason| invalid(path, format!("line {}: {reason}", index + 2)))?;
        requests.push(record);
    }
    Ok(requests)
}

/// Picks the reference of two runs: the executed one when exactly one of them was executed on
/// a GPU; otherwise (two simulations, or two executions) the first. Returns
/// `(reference, predicted)`.
pub fn pick_reference<'a>(first: &'a RunData, second: &'a RunData) -> (&'a RunData, &'a RunData) {
    let executed = |r: &RunData| r.metrics.provenance == Some(Provenance::Executed);
    if executed(second) && !executed(first) {
        (second, first)
    } else {
        (first, second)
    }
}

/// Who a run is, as the reports label it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunLabel {
    /// The name in its `metrics.json`.
    pub scenario: String,
    pub provenance: Option<Provenance>,
    /// What the charts and tables call it: "executed", "simulated (derived)", …, with the
    /// seed added when both runs are of one kind.
    pub label: String,
    /// The run folder.
    pub path: PathBuf,
    pub seed: u64,
    pub cost_model: String,
    /// Rows of its `requests.csv`.
    pub requests: u64,
}

/// One headline metric of both runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricRow {
    /// A stable key, e.g. `ttft_p99_s`.
    pub key: String,
    /// What a reader sees, e.g. "TTFT p99 (s)".
    pub name: String,
    /// `req/s`, `tok/s`, `s`, `fraction` or `requests`.
    pub unit: String,
    pub reference: f64,
    pub predicted: f64,
    /// `(predicted − reference) / reference`; `None` where the reference is zero.
    pub signed_error: Option<f64>,
    /// `|signed_error|`.
    pub abs_error: Option<f64>,
    /// For latency statistics: where the reference's value could fall from sampling alone, a
    /// 90% block-bootstrap interval over its completed requests (`crate::spread`).
    pub reference_interval: Option<Interval>,
    /// Whether the predicted value lies inside `reference_interval`.
    pub within_reference_interval: Option<bool>,
}

/// One adapter's p99 TTFT in both runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdapterRow {
    pub adapter: u32,
    pub reference_completed: u64,
    pub predicted_completed: u64,
    pub reference_ttft_p99_s: f64,
    pub predicted_ttft_p99_s: f64,
    pub signed_error: Option<f64>,
    pub abs_error: Option<f64>,
    /// The reference p99's distribution-free 90% interval from the order statistics of the
    /// adapter's requests (`hi` unbounded below 298 requests).
    pub reference_interval: Option<Interval>,
    /// Whether the predicted p99 lies inside it.
    pub within_reference_interval: Option<bool>,
}

/// Per-adapter p99 TTFT, over adapters with at least `min_completed` completed requests in
/// each run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdapterComparison {
    pub min_completed: u64,
    /// The target for the largest absolute error.
    pub target: f64,
    /// Where each run's per-adapter figures come from: `metrics.json` or `requests.csv`.
    pub reference_source: String,
    pub predicted_source: String,
    /// Adapters with a defined error (enough requests in both runs, reference p99 above 0).
    pub compared: usize,
    pub max_abs_error: Option<f64>,
    pub median_abs_error: Option<f64>,
    /// The adapter with the largest absolute error.
    pub worst_adapter: Option<u32>,
    /// `max_abs_error <= target`; `None` when no adapter could be compared.
    pub within_target: Option<bool>,
    /// Compared adapters whose predicted p99 lies inside the reference p99's sampling
    /// interval.
    pub within_reference_interval: usize,
    /// Every adapter with enough requests in both runs, by adapter id.
    pub adapters: Vec<AdapterRow>,
}

/// Everything a comparison reports; `compare.json` is this, serialised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub reference: RunLabel,
    pub predicted: RunLabel,
    /// Why the reference is the reference.
    pub reference_rule: String,
    /// What a reader should know before trusting the numbers (different scenarios, …).
    pub warnings: Vec<String>,
    pub rows: Vec<MetricRow>,
    pub per_adapter_ttft_p99: AdapterComparison,
    /// The metric and error definitions, stated in the file itself.
    pub definitions: BTreeMap<String, String>,
}

impl Comparison {
    /// The row with `key`, e.g. `ttft_p99_s`.
    pub fn row(&self, key: &str) -> Option<&MetricRow> {
        self.rows.iter().find(|r| r.key == key)
    }

    /// The headline table and the per-adapter verdict as Markdown: what `slora-plan compare`
    /// prints. `compare.md` holds the same table inside the full report.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "Comparison of `{}`: reference {} ({}), predicted {} ({})\n\n",
            self.reference.scenario,
            self.reference.label,
            self.reference.path.display(),
            self.predicted.label,
            self.predicted.path.display()
        );
        for w in &self.warnings {
            let _ = writeln!(out, "**Warning:** {w}\n");
        }
        markdown::table_body(&mut out, &metrics_table(self));
        let _ = writeln!(
            out,
            "Per-adapter TTFT p99: {}",
            adapter_sentence(&self.per_adapter_ttft_p99)
        );
        out
    }
}

/// `(predicted − reference) / reference`, or `None` where that is undefined (reference zero,
/// or either value not finite).
pub fn relative_error(reference: f64, predicted: f64) -> Option<f64> {
    (reference != 0.0 && reference.is_finite() && predicted.is_finite())
        .then(|| (predicted - reference) / reference)
}

fn kind(p: Option<Provenance>) -> String {
    match p {
        Some(Provenance::Executed) => "executed".to_string(),
        Some(Provenance::Derived) => "simulated (derived)".to_string(),
        Some(Provenance::Calibrated) => "simulated (calibrated)".to_string(),
        None => "unlabelled".to_string(),
    }
}

/// Labels that tell the runs apart: their kind, then the seed, then their role.
fn labels(reference: &Metrics, predicted: &Metrics) -> (String, String) {
    let (r, p) = (kind(reference.provenance), kind(predicted.provenance));
    if r != p {
        return (r, p);
    }
    let (r, p) = (
        format!("{r}, seed {}", reference.seed),
        format!("{p}, seed {}", predicted.seed),
    );
    if r != p {
        return (r, p);
    }
    (format!("{r}, reference"), format!("{p}, predicted"))
}

fn run_label(run: &RunData, label: String) -> RunLabel {
    let m = &run.metrics;
    RunLabel {
        scenario: m.scenario.clone(),
        provenance: m.provenance,
        label,
        path: run.dir.clone(),
        seed: m.seed,
        cost_model: m.cost_model.clone(),
        requests: run.requests.len() as u64,
    }
}

fn row(key: &str, name: &str, unit: &str, reference: f64, predicted: f64) -> MetricRow {
    let signed_error = relative_error(reference, predicted);
    MetricRow {
        key: key.to_string(),
        name: name.to_string(),
        unit: unit.to_string(),
        reference,
        predicted,
        signed_error,
        abs_error: signed_error.map(f64::abs),
        reference_interval: None,
        within_reference_interval: None,
    }
}

/// Fills in the sampling intervals of the latency rows (`{ttft,tpot,e2e}_{mean,p50,p90,p99}_s`)
/// from the reference's requests.
fn add_reference_intervals(rows: &mut [MetricRow], reference: &RunData) {
    let stats = [Stat::Mean, Stat::P50, Stat::P90, Stat::P99];
    let names = ["mean", "p50", "p90", "p99"];
    // `latencies` keeps requests.csv's order (arrival order), which the blocks need.
    for (values, key) in latencies(reference).iter().zip(["ttft", "tpot", "e2e"]) {
        let Some(intervals) = spread::bootstrap(values, spread::run_block(values.len()), &stats)
        else {
            continue;
        };
        for ((interval, stat), q) in
            intervals
                .into_iter()
                .zip(names)
                .zip([None, Some(0.50), Some(0.90), Some(0.99)])
        {
            // A bootstrap never passes the sample's extremes, so a high percentile of a short
            // run would look measured more tightly than it is: widen by the order-statistic
            // interval (exact for independent requests), which is unbounded where it must be.
            let interval = match q.and_then(|q| spread::quantile_interval(values, q)) {
                Some(os) => Interval {
                    lo: interval.lo.min(os.lo),
                    hi: interval.hi.zip(os.hi).map(|(a, b)| a.max(b)),
                },
                None => interval,
            };
            let key = format!("{key}_{stat}_s");
            if let Some(row) = rows.iter_mut().find(|r| r.key == key) {
                row.reference_interval = Some(interval);
                row.within_reference_interval = Some(interval.contains(row.predicted));
            }
        }
    }
}

/// Compares `predicted` against `reference` (see [`pick_reference`] for which is which).
/// Pure: reads only its arguments.
pub fn compare(reference: &RunData, predicted: &RunData) -> Comparison {
    let (r, p) = (&reference.metrics, &predicted.metrics);
    let (ref_label, pred_label) = labels(r, p);
    let mut rows = vec![
        row(
            "request_throughput_req_s",
            "request throughput (req/s)",
            "req/s",
            r.throughput.requests_per_s,
            p.throughput.requests_per_s,
        ),
        row(
            "output_throughput_tok_s",
            "output token throughput (tok/s)",
            "tok/s",
            r.throughput.output_tokens_per_s,
            p.throughput.output_tokens_per_s,
        ),
    ];
    let latencies: [(&str, &str, &Summary, &Summary); 3] = [
        ("ttft", "TTFT", &r.ttft_s, &p.ttft_s),
        ("tpot", "TPOT", &r.tpot_s, &p.tpot_s),
        ("e2e", "E2E", &r.e2e_s, &p.e2e_s),
    ];
    for (key, name, rs, ps) in latencies {
        for (stat, rv, pv) in [
            ("mean", rs.mean, ps.mean),
            ("p50", rs.p50, ps.p50),
            ("p90", rs.p90, ps.p90),
            ("p99", rs.p99, ps.p99),
        ] {
            rows.push(row(
                &format!("{key}_{stat}_s"),
                &format!("{name} {stat} (s)"),
                "s",
                rv,
                pv,
            ));
        }
    }
    rows.push(row(
        "slo_attainment",
        "SLO attainment",
        "fraction",
        r.slo_attainment,
        p.slo_attainment,
    ));
    for (key, name, rv, pv) in [
        (
            "completed",
            "completed requests",
            r.requests.completed,
            p.requests.completed,
        ),
        (
            "aborted",
            "aborted requests",
            r.requests.aborted,
            p.requests.aborted,
        ),
        (
            "rejected",
            "rejected requests",
            r.requests.rejected,
            p.requests.rejected,
        ),
    ] {
        rows.push(row(key, name, "requests", rv as f64, pv as f64));
    }

    let mut warnings = Vec::new();
    if r.scenario != p.scenario {
        warnings.push(format!(
            "the runs are of different scenarios (reference `{}`, predicted `{}`): the errors \
             compare different workloads",
            r.scenario, p.scenario
        ));
    }
    if r.slo != p.slo {
        warnings.push(
            "the runs were judged against different SLOs: SLO attainment is not comparable"
                .to_string(),
        );
    }
    for (role, run) in [("reference", reference), ("predicted", predicted)] {
        let rows = run.requests.len() as u64;
        if rows != run.metrics.requests.submitted {
            warnings.push(format!(
                "{role} run {}: requests.csv has {} rows but metrics.json counts {} submitted \
                 requests; the two files may come from different runs",
                run.dir.display(),
                group(rows),
                group(run.metrics.requests.submitted)
            ));
        }
    }

    let executed = |m: &Metrics| m.provenance == Some(Provenance::Executed);
    let reference_rule = match (executed(r), executed(p)) {
        (true, false) => "the run executed on a GPU is the reference",
        (true, true) => "both runs were executed: the first given is the reference",
        _ => "neither run was executed on a GPU: the first given is the reference",
    }
    .to_string();

    let mut definitions = r.definitions.clone();
    for (k, v) in [
        (
            "signed_error",
            "(predicted - reference) / reference: positive when the prediction is higher than the reference",
        ),
        ("abs_error", "the absolute value of the signed error"),
        (
            "n/a",
            "a relative error is undefined where the reference is zero; it is reported as n/a (null in compare.json)",
        ),
        (
            "per_adapter_ttft_p99",
            "each adapter's TTFT p99 over its completed requests, compared for adapters with at least the minimum number of completed requests in both runs; the target is a largest absolute error of 15%",
        ),
        (
            "reference_interval",
            "how precisely a run of this length measures the reference's latency statistic: the 5th to 95th percentile of the statistic over 400 resamples of the reference's completed requests (circular blocks of ceil(sqrt(n)) consecutive requests in arrival order for the run's statistics, fixed seed, and for its percentiles widened to the order-statistic interval, which a bootstrap's extremes would understate) or, for an adapter's p99, the distribution-free interval of order statistics (no upper end below 298 requests: the p99 can lie above every value seen). A prediction inside it is within the measurement's own resolution. Both runs share the arrivals, so this does not test the model's error; and it cannot see run-to-run causes such as a slower host, so it is a lower bound on how far a second live run could land",
        ),
    ] {
        definitions.insert(k.to_string(), v.to_string());
    }

    add_reference_intervals(&mut rows, reference);

    Comparison {
        reference: run_label(reference, ref_label),
        predicted: run_label(predicted, pred_label),
        reference_rule,
        warnings,
        rows,
        per_adapter_ttft_p99: compare_adapters(reference, predicted, MIN_ADAPTER_REQUESTS),
        definitions,
    }
}

/// Each adapter's `(completed requests, TTFT p99 s)`, and where the figures came from.
fn adapter_ttft_p99(run: &RunData) -> (BTreeMap<u32, (u64, f64)>, &'static str) {
    if !run.metrics.per_adapter.is_empty() {
        let figures = run
            .metrics
            .per_adapter
            .iter()
            .map(|a| (a.adapter, (a.completed, a.ttft_p99_s)))
            .collect();
        return (figures, "metrics.json");
    }
    let figures = adapter_ttfts(run)
        .into_iter()
        .map(|(a, v)| {
            let s = summarize(v);
            (a, (s.count, s.p99))
        })
        .collect();
    (figures, "requests.csv")
}

/// Each adapter's completed requests' TTFTs (seconds) in `requests.csv` order.
fn adapter_ttfts(run: &RunData) -> BTreeMap<u32, Vec<f64>> {
    let mut ttfts: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for r in &run.requests {
        if let (RequestStatus::Completed, Some(a), Some(t)) = (r.status, r.adapter, r.ttft()) {
            ttfts.entry(a).or_default().push(t.as_secs_f64());
        }
    }
    ttfts
}

fn compare_adapters(
    reference: &RunData,
    predicted: &RunData,
    min_completed: u64,
) -> AdapterComparison {
    let (ref_figures, reference_source) = adapter_ttft_p99(reference);
    let (pred_figures, predicted_source) = adapter_ttft_p99(predicted);
    let ref_ttfts = adapter_ttfts(reference);
    let adapters: Vec<AdapterRow> = ref_figures
        .iter()
        .filter_map(|(&adapter, &(ref_n, ref_p99))| {
            let &(pred_n, pred_p99) = pred_figures.get(&adapter)?;
            (ref_n >= min_completed && pred_n >= min_completed).then(|| {
                let signed_error = relative_error(ref_p99, pred_p99);
                let reference_interval = ref_ttfts
                    .get(&adapter)
                    .and_then(|v| spread::quantile_interval(v, 0.99));
                AdapterRow {
                    adapter,
                    reference_completed: ref_n,
                    predicted_completed: pred_n,
                    reference_ttft_p99_s: ref_p99,
                    predicted_ttft_p99_s: pred_p99,
                    signed_error,
                    abs_error: signed_error.map(f64::abs),
                    reference_interval,
                    within_reference_interval: reference_interval.map(|i| i.contains(pred_p99)),
                }
            })
        })
        .collect();
    let mut errors: Vec<(f64, u32)> = adapters
        .iter()
        .filter_map(|a| a.abs_error.map(|e| (e, a.adapter)))
        .collect();
    // Largest error first; ties go to the lower adapter id, so the worst adapter is stable.
    errors.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let n = errors.len();
    let median = match n {
        0 => None,
        _ if n % 2 == 1 => Some(errors[n / 2].0),
        _ => Some((errors[n / 2 - 1].0 + errors[n / 2].0) / 2.0),
    };
    let max = errors.first().map(|e| e.0);
    AdapterComparison {
        min_completed,
        target: ADAPTER_TTFT_TARGET,
        reference_source: reference_source.to_string(),
        predicted_source: predicted_source.to_string(),
        compared: n,
        max_abs_error: max,
        median_abs_error: median,
        worst_adapter: errors.first().map(|e| e.1),
        within_target: max.map(|m| m <= ADAPTER_TTFT_TARGET),
        within_reference_interval: adapters
            .iter()
            .filter(|a| a.abs_error.is_some() && a.within_reference_interval == Some(true))
            .count(),
        adapters,
    }
}

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

/// `+12.34%`, `-3.10%`, or `n/a`.
fn signed_percent(e: Option<f64>) -> String {
    match e {
        Some(e) if e > 0.0 => format!("+{}", percent(e)),
        Some(e) => percent(e),
        None => "n/a".to_string(),
    }
}

fn abs_percent(e: Option<f64>) -> String {
    e.map(percent).unwrap_or_else(|| "n/a".to_string())
}

fn value_text(unit: &str, v: f64) -> String {
    match unit {
        "fraction" => percent(v),
        "requests" if v.fract() == 0.0 && v >= 0.0 => group(v as u64),
        _ => short(v),
    }
}

/// `0.81–1.23 (inside)`, or empty where no interval was computed.
fn interval_text(interval: Option<Interval>, inside: Option<bool>) -> String {
    match (interval, inside) {
        (Some(i), Some(inside)) => format!(
            "{} ({})",
            match i.hi {
                Some(hi) => format!("{}–{}", short(i.lo), short(hi)),
                None => format!("≥ {}", short(i.lo)),
            },
            if inside { "inside" } else { "outside" }
        ),
        _ => String::new(),
    }
}

fn metrics_table(cmp: &Comparison) -> Table {
    let header = vec![
        "metric".to_string(),
        format!("reference: {}", cmp.reference.label),
        format!("predicted: {}", cmp.predicted.label),
        "signed error".to_string(),
        "abs error".to_string(),
        "reference's 90% sampling interval (prediction)".to_string(),
    ];
    let rows = cmp
        .rows
        .iter()
        .map(|r| {
            let undefined = if r.reference == 0.0 {
                "n/a (reference 0)".to_string()
            } else {
                "n/a".to_string()
            };
            vec![
                r.name.clone(),
                value_text(&r.unit, r.reference),
                value_text(&r.unit, r.predicted),
                r.signed_error
                    .map(|e| signed_percent(Some(e)))
                    .unwrap_or_else(|| undefined.clone()),
                r.abs_error.map(percent).unwrap_or(undefined),
                interval_text(r.reference_interval, r.within_reference_interval),
            ]
        })
        .collect();
    Table {
        title: "Predicted against reference".to_string(),
        header,
        rows,
        note: Some(
            "Signed error = (predicted − reference) / reference: positive when the prediction \
             is higher. Latencies are over completed requests. The sampling interval is how \
             precisely this run measures the reference's value (90%, block bootstrap over its \
             own requests): a prediction inside it is within the measurement's resolution; \
             one outside it differs by more than resampling the reference explains."
                .to_string(),
        ),
    }
}

/// One sentence: how many adapters were compared, the largest and median error, the verdict.
fn adapter_sentence(a: &AdapterComparison) -> String {
    let scope = format!(
        "adapters with at least {} completed requests in both runs",
        a.min_completed
    );
    match (a.max_abs_error, a.median_abs_error, a.worst_adapter) {
        (Some(max), Some(median), Some(worst)) => format!(
            "{} {scope} compared: largest error {} (adapter {worst}), median {}; target ≤ {}: {}; \
             {} of {} predictions inside the reference p99's 90% sampling interval.",
            a.compared,
            percent(max),
            percent(median),
            percent_short(a.target),
            if max <= a.target { "met" } else { "missed" },
            a.within_reference_interval,
            a.compared
        ),
        _ => format!("no {scope}: nothing to compare."),
    }
}

fn adapter_tables(cmp: &Comparison) -> (Table, Table) {
    let a = &cmp.per_adapter_ttft_p99;
    let opt = |v: Option<f64>| v.map(percent).unwrap_or_else(|| "n/a".to_string());
    let summary = Table {
        title: "Per-adapter TTFT p99".to_string(),
        header: vec!["quantity".to_string(), "value".to_string()],
        rows: vec![
            vec![
                "minimum completed requests per run".to_string(),
                group(a.min_completed),
            ],
            vec!["adapters compared".to_string(), group(a.compared as u64)],
            vec!["largest abs error".to_string(), opt(a.max_abs_error)],
            vec!["median abs error".to_string(), opt(a.median_abs_error)],
            vec![
                "worst adapter".to_string(),
                a.worst_adapter
                    .map(|w| w.to_string())
                    .unwrap_or_else(|| "n/a".to_string()),
            ],
            vec![
                "target (largest abs error)".to_string(),
                format!("≤ {}", percent_short(a.target)),
            ],
            vec![
                "predictions inside the reference p99's 90% sampling interval".to_string(),
                format!("{} of {}", a.within_reference_interval, a.compared),
            ],
            vec![
                "target met".to_string(),
                match a.within_target {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "n/a",
                }
                .to_string(),
            ],
        ],
        note: Some(format!(
            "Per-adapter figures from the reference's {} and the prediction's {}.",
            a.reference_source, a.predicted_source
        )),
    };
    let mut rows: Vec<&AdapterRow> = a.adapters.iter().collect();
    // Worst first; undefined errors last.
    rows.sort_by(|x, y| {
        let e = |r: &AdapterRow| r.abs_error.unwrap_or(-1.0);
        e(y).total_cmp(&e(x)).then(x.adapter.cmp(&y.adapter))
    });
    let detail = Table {
        title: "Per-adapter TTFT p99, worst first".to_string(),
        header: [
            "adapter",
            "reference completed",
            "predicted completed",
            "reference p99 (s)",
            "predicted p99 (s)",
            "signed error",
            "abs error",
            "reference p99's 90% sampling interval (prediction)",
        ]
        .iter()
        .map(|h| h.to_string())
        .collect(),
        rows: rows
            .iter()
            .map(|r| {
                vec![
                    r.adapter.to_string(),
                    group(r.reference_completed),
                    group(r.predicted_completed),
                    short(r.reference_ttft_p99_s),
                    short(r.predicted_ttft_p99_s),
                    signed_percent(r.signed_error),
                    abs_percent(r.abs_error),
                    interval_text(r.reference_interval, r.within_reference_interval),
                ]
            })
            .collect(),
        note: (rows.is_empty()).then(|| {
            format!(
                "No adapter has {} completed requests in both runs.",
                a.min_completed
            )
        }),
    };
    (summary, detail)
}

/// TTFT, TPOT and E2E (seconds) of a run's completed requests, TPOT without one-token outputs.
fn latencies(run: &RunData) -> [Vec<f64>; 3] {
    let mut out: [Vec<f64>; 3] = Default::default();
    for r in run
        .requests
        .iter()
        .filter(|r| r.status == RequestStatus::Completed)
    {
        if let Some(t) = r.ttft() {
            out[0].push(t.as_secs_f64());
        }
        if let Some(t) = r.tpot() {
            out[1].push(t);
        }
        if let Some(t) = r.e2e() {
            out[2].push(t.as_secs_f64());
        }
    }
    out
}

/// The overlaid CDFs: one panel per latency, both runs on each.
fn cdf_figure(cmp: &Comparison, reference: &RunData, predicted: &RunData) -> Figure {
    let [ref_ttft, ref_tpot, ref_e2e] = latencies(reference);
    let [pred_ttft, pred_tpot, pred_e2e] = latencies(predicted);
    let slo = &reference.metrics.slo;
    let panels = [
        ("TTFT", "ttft_p99_s", ref_ttft, pred_ttft, slo.ttft_s),
        ("TPOT", "tpot_p99_s", ref_tpot, pred_tpot, slo.tpot_s),
        ("E2E", "e2e_p99_s", ref_e2e, pred_e2e, slo.e2e_s),
    ];
    let charts = panels
        .into_iter()
        .map(|(name, key, mut r, mut p, target)| {
            let runs = [
                (
                    format!("reference: {}", cmp.reference.label),
                    &mut r,
                    color(0),
                ),
                (
                    format!("predicted: {}", cmp.predicted.label),
                    &mut p,
                    color(1),
                ),
            ];
            cdf_panel(cmp, name, key, runs, target)
        })
        .collect();
    Figure {
        name: "compare-cdf",
        heading: "Latency distributions, both runs".to_string(),
        caption: format!(
            "Empirical CDFs of TTFT, TPOT and end-to-end latency over each run's completed \
             requests (TPOT leaves out one-token outputs), the reference ({}) in blue and the \
             prediction ({}) in orange: a curve's height at x is the share of requests at or \
             under x, so the horizontal gap between the curves is the prediction's error at \
             that quantile. Grey dashed lines are the reference's SLO targets. Each curve is \
             reduced to at most {} evenly spaced quantiles.",
            cmp.reference.label,
            cmp.predicted.label,
            group(MAX_POINTS as u64)
        ),
        size: (1000, 1200),
        body: Body::Panels(charts),
    }
}

fn cdf_panel(
    cmp: &Comparison,
    name: &str,
    key: &str,
    runs: [(String, &mut Vec<f64>, plotters::style::RGBColor); 2],
    target: Option<f64>,
) -> LineChart {
    let mut curves = Vec::new();
    for (label, values, c) in runs {
        let count = values.len();
        let points = cdf_points(values, MAX_POINTS);
        curves.push((label, count, points, c));
    }
    let target = target.filter(|t| t.is_finite() && *t > 0.0);
    let (min_pos, max) = curves
        .iter()
        .flat_map(|c| c.2.iter().map(|p| p.0))
        .chain(target)
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
            (if x > 0.0 { lo.min(x) } else { lo }, hi.max(x))
        });
    let log = min_pos.is_finite() && min_pos > 0.0 && max / min_pos > 20.0;
    let mut series = Vec::new();
    for (label, count, points, c) in curves {
        let points: Vec<(f64, f64)> = points.into_iter().filter(|p| !log || p.0 > 0.0).collect();
        // A small sample reads best as the step function it is (see `charts::run`).
        let points = if count <= MAX_POINTS {
            cdf_steps(&points)
        } else {
            points
        };
        series.push(Series::new(Some(label), c, SeriesKind::Line, points));
    }
    if let Some(t) = target.filter(|t| !log || *t > 0.0) {
        series.push(Series::new(
            Some(format!("SLO {} s", short(t))),
            charts::GREY,
            SeriesKind::Dashed,
            vec![(t, 0.0), (t, 1.0)],
        ));
    }
    let empty = series.iter().all(|s| s.points.is_empty());
    let title = match cmp.row(key) {
        Some(r) => format!(
            "{name}: p99 {} s reference, {} s predicted ({})",
            short(r.reference),
            short(r.predicted),
            signed_percent(r.signed_error)
        ),
        None => name.to_string(),
    };
    let x_label = if log {
        format!("{name} (s, log scale)")
    } else {
        format!("{name} (s)")
    };
    let x = if log {
        Axis::log(x_label, min_pos / 1.5, max * 1.5)
    } else {
        Axis::linear(x_label, 0.0, max * 1.05)
    };
    let legend = if lower_right_is_free(&x, &series) {
        LegendAt::LowerRight
    } else {
        LegendAt::Auto
    };
    LineChart {
        title,
        x,
        y: Axis::linear("share of requests ≤ x", 0.0, 1.02).percent(),
        series,
        annotations: Vec::new(),
        legend,
        note: empty.then(|| "No completed requests".to_string()),
    }
}

/// Whether no CDF curve enters the lower right of the plot, where the legend then goes: CDFs
/// rise to the upper right, so that corner is nearly always free, but the automatic placement
/// would push the legend outside (squeezing the plot) because the vertical SLO line crosses
/// every right-hand corner. Drawn over the legend's translucent box, the line stays readable.
fn lower_right_is_free(x: &Axis, series: &[Series]) -> bool {
    let fraction = |v: f64| match x.scale {
        charts::Scale::Linear => (v - x.min) / (x.max - x.min),
        charts::Scale::Log => (v / x.min).ln() / (x.max / x.min).ln(),
    };
    series
        .iter()
        .filter(|s| s.kind == SeriesKind::Line)
        .flat_map(|s| &s.points)
        .all(|&(v, share)| !(fraction(v) > 0.45 && share < 0.4))
}

/// Writes `compare.json`, the chart (`compare-cdf.png`, `compare-cdf.svg`), `compare.html`
/// and `compare.md` into `out` (created if missing) and returns the paths written, in that
/// order. `reference` and `predicted` must be the runs `cmp` was computed from.
pub fn write_comparison(
    cmp: &Comparison,
    reference: &RunData,
    predicted: &RunData,
    out: &Path,
) -> Result<Vec<PathBuf>, ReportError> {
    files::create_dir(out)?;
    let mut written = vec![files::write_json(&out.join("compare.json"), cmp)?];
    let chart = charts::render(out, &cdf_figure(cmp, reference, predicted))?;
    written.push(chart.png.clone());
    written.push(chart.svg.clone());

    let scenario = if cmp.reference.scenario == cmp.predicted.scenario {
        cmp.reference.scenario.clone()
    } else {
        format!("{} vs {}", cmp.reference.scenario, cmp.predicted.scenario)
    };
    let describe = |r: &RunLabel| {
        format!(
            "{} — {}, seed {}, {} requests; {}",
            r.label,
            r.path.display(),
            r.seed,
            group(r.requests),
            r.cost_model
        )
    };
    let mut facts: Vec<(String, String)> = cmp
        .warnings
        .iter()
        .map(|w| ("warning".to_string(), w.clone()))
        .collect();
    facts.extend([
        ("reference".to_string(), describe(&cmp.reference)),
        ("predicted".to_string(), describe(&cmp.predicted)),
        ("reference chosen".to_string(), cmp.reference_rule.clone()),
        (
            "per-adapter TTFT p99".to_string(),
            adapter_sentence(&cmp.per_adapter_ttft_p99),
        ),
    ]);
    let (adapter_summary, adapter_detail) = adapter_tables(cmp);
    let page = Page {
        kind: "Comparison",
        scenario,
        // One badge per distinct provenance: two simulations need not say "derived" twice.
        provenance: if cmp.reference.provenance == cmp.predicted.provenance {
            vec![cmp.reference.provenance]
        } else {
            vec![cmp.reference.provenance, cmp.predicted.provenance]
        },
        facts,
        summary: vec![metrics_table(cmp), adapter_summary],
        charts: vec![chart],
        details: vec![adapter_detail],
        definitions: cmp.definitions.clone(),
        data_files: vec!["compare.json".into()],
    };
    written.push(files::write_bytes(
        &out.join("compare.html"),
        html::render(&page).as_bytes(),
    )?);
    written.push(files::write_bytes(
        &out.join("compare.md"),
        markdown::render(&page).as_bytes(),
    )?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slora_sim::metrics::AdapterMetrics;

    /// A completed request of `adapter`, arriving at `10 * id` ms, with the given TTFT and E2E.
    fn request(id: u64, adapter: u32, ttft_ms: u64, e2e_ms: u64) -> RequestRecord {
        let arrival = Nanos::from_millis(id * 10);
        RequestRecord {
            id,
            adapter: Some(adapter),
            tenant: None,
            prompt_tokens: 100,
            output_tokens: 11,
            arrival,
            admitted: Some(arrival),
            first_token: Some(arrival + Nanos::from_millis(ttft_ms)),
            finish: Some(arrival + Nanos::from_millis(e2e_ms)),
            status: RequestStatus::Completed,
            preemptions: 0,
        }
    }

    fn run(provenance: Provenance, requests: Vec<RequestRecord>) -> RunData {
        let mut metrics = Metrics {
            scenario: "s".into(),
            provenance: Some(provenance),
            seed: 1,
            ..Metrics::default()
        };
        metrics.requests.submitted = requests.len() as u64;
        metrics.requests.completed = requests.len() as u64;
        RunData {
            dir: PathBuf::from(format!("{provenance:?}")),
            metrics,
            requests,
        }
    }

    #[test]
    fn latency_rows_carry_the_reference_sampling_interval() {
        // 400 requests on 4 adapters, TTFTs spread from 50 to 449 ms.
        let requests: Vec<RequestRecord> = (0..400u64)
            .map(|i| {
                request(
                    i,
                    (i % 4) as u32,
                    50 + (i * 37) % 400,
                    2000 + (i * 53) % 900,
                )
            })
            .collect();
        let mut reference = run(Provenance::Executed, requests.clone());
        let mut predicted = run(Provenance::Calibrated, requests);
        let ttfts: Vec<f64> = reference
            .requests
            .iter()
            .map(|r| r.ttft().unwrap().as_secs_f64())
            .collect();
        reference.metrics.ttft_s = summarize(ttfts.clone());
        // The same p50, and a p90 far beyond anything a resample gives.
        predicted.metrics.ttft_s = summarize(ttfts);
        predicted.metrics.ttft_s.p90 *= 3.0;
        let cmp = compare(&reference, &predicted);
        let p50 = cmp.row("ttft_p50_s").unwrap();
        let interval = p50.reference_interval.expect("an interval for TTFT p50");
        assert!(
            interval.lo < p50.reference && p50.reference < interval.hi.unwrap(),
            "{interval:?}"
        );
        assert_eq!(p50.within_reference_interval, Some(true));
        assert_eq!(
            cmp.row("ttft_p90_s").unwrap().within_reference_interval,
            Some(false)
        );
        // Throughput is not a per-request statistic: no interval.
        let thr = cmp.row("request_throughput_req_s").unwrap();
        assert_eq!(thr.reference_interval, None);
        // Per adapter (from requests.csv: metrics.json lists none): 100 requests each, the
        // same in both runs, so every predicted p99 lies inside the reference's interval.
        let a = &cmp.per_adapter_ttft_p99;
        assert_eq!(a.compared, 4);
        assert_eq!(a.within_reference_interval, 4);
        // 100 requests: the p99's interval has no upper end (fewer than 298).
        assert!(a.adapters.iter().all(|r| r
            .reference_interval
            .is_some_and(|i| i.lo <= r.reference_ttft_p99_s && i.hi.is_none())));
        let markdown = cmp.to_markdown();
        assert!(markdown.contains("sampling interval"), "{markdown}");
        assert!(
            markdown.contains("(outside)") && markdown.contains("(inside)"),
            "{markdown}"
        );
    }

    #[test]
    fn signed_error_is_positive_when_the_prediction_is_higher() {
        let mut reference = run(Provenance::Executed, vec![]);
        let mut predicted = run(Provenance::Derived, vec![]);
        reference.metrics.ttft_s.p99 = 2.0;
        predicted.metrics.ttft_s.p99 = 2.5;
        reference.metrics.throughput.requests_per_s = 10.0;
        predicted.metrics.throughput.requests_per_s = 8.0;
        let cmp = compare(&reference, &predicted);
        let ttft = cmp.row("ttft_p99_s").unwrap();
        assert_eq!((ttft.reference, ttft.predicted), (2.0, 2.5));
        assert_eq!(ttft.signed_error, Some(0.25));
        assert_eq!(ttft.abs_error, Some(0.25));
        let rate = cmp.row("request_throughput_req_s").unwrap();
        assert_eq!(rate.signed_error, Some(-0.2));
        assert_eq!(rate.abs_error, Some(0.2));
        assert_eq!(cmp.reference.label, "executed");
        assert_eq!(cmp.predicted.label, "simulated (derived)");
        // Every row the brief asks for is there.
        for key in [
            "output_throughput_tok_s",
            "ttft_mean_s",
            "ttft_p50_s",
            "ttft_p90_s",
            "tpot_mean_s",
            "tpot_p99_s",
            "e2e_p50_s",
            "e2e_p99_s",
            "slo_attainment",
            "aborted",
            "rejected",
        ] {
            assert!(cmp.row(key).is_some(), "{key}");
        }
    }

    #[test]
    fn a_zero_reference_has_no_relative_error() {
        let reference = run(Provenance::Executed, vec![]);
        let mut predicted = run(Provenance::Derived, vec![]);
        predicted.metrics.requests.aborted = 3;
        let cmp = compare(&reference, &predicted);
        let aborted = cmp.row("aborted").unwrap();
        assert_eq!((aborted.reference, aborted.predicted), (0.0, 3.0));
        assert_eq!(aborted.signed_error, None);
        assert_eq!(aborted.abs_error, None);
        assert_eq!(relative_error(0.0, 0.0), None);
        assert_eq!(relative_error(1.0, f64::NAN), None);
        let json = serde_json::to_value(&cmp).unwrap();
        let rows = json["rows"].as_array().unwrap();
        let aborted = rows.iter().find(|r| r["key"] == "aborted").unwrap();
        assert!(aborted["signed_error"].is_null());
        let table = metrics_table(&cmp);
        let text = table
            .rows
            .iter()
            .find(|r| r[0] == "aborted requests")
            .unwrap();
        assert_eq!(text[3], "n/a (reference 0)");
    }

    #[test]
    fn adapters_need_enough_requests_in_both_runs() {
        // Adapter 0: 30 requests in both runs, TTFT 100 ms vs 110 ms (+10%).
        // Adapter 1: 30 in the reference but only 10 in the prediction: left out.
        // Adapter 2: 25 in both, 200 ms vs 150 ms (−25%): the worst.
        let mut ref_requests = Vec::new();
        let mut pred_requests = Vec::new();
        let mut id = 0;
        let mut push = |into: &mut Vec<RequestRecord>, adapter, n, ttft| {
            for _ in 0..n {
                into.push(request(id, adapter, ttft, ttft + 500));
                id += 1;
            }
        };
        push(&mut ref_requests, 0, 30, 100);
        push(&mut pred_requests, 0, 30, 110);
        push(&mut ref_requests, 1, 30, 100);
        push(&mut pred_requests, 1, 10, 100);
        push(&mut ref_requests, 2, 25, 200);
        push(&mut pred_requests, 2, 25, 150);
        let reference = run(Provenance::Executed, ref_requests);
        let predicted = run(Provenance::Derived, pred_requests);
        let a = compare(&reference, &predicted).per_adapter_ttft_p99;
        assert_eq!(a.reference_source, "requests.csv");
        let ids: Vec<u32> = a.adapters.iter().map(|r| r.adapter).collect();
        assert_eq!(ids, [0, 2]);
        assert_eq!(a.compared, 2);
        let close = |x: Option<f64>, want: f64| (x.unwrap() - want).abs() < 1e-9;
        assert!(close(a.adapters[0].signed_error, 0.10));
        assert!(close(a.adapters[1].signed_error, -0.25));
        assert!(close(a.max_abs_error, 0.25));
        assert!(close(a.median_abs_error, 0.175));
        assert_eq!(a.worst_adapter, Some(2));
        assert_eq!(a.within_target, Some(false));
    }

    #[test]
    fn per_adapter_figures_come_from_metrics_json_when_it_has_them() {
        let mut reference = run(Provenance::Executed, vec![]);
        let mut predicted = run(Provenance::Derived, vec![]);
        let adapter = |adapter, completed, ttft_p99_s| AdapterMetrics {
            adapter,
            completed,
            ttft_p99_s,
            ..AdapterMetrics::default()
        };
        reference.metrics.per_adapter = vec![adapter(4, 50, 1.0), adapter(5, 19, 1.0)];
        predicted.metrics.per_adapter = vec![adapter(4, 40, 1.1), adapter(5, 60, 9.0)];
        let a = compare(&reference, &predicted).per_adapter_ttft_p99;
        assert_eq!(a.reference_source, "metrics.json");
        assert_eq!(a.compared, 1);
        assert_eq!(a.worst_adapter, Some(4));
        assert_eq!(a.within_target, Some(true));
        // No adapter with enough requests: nothing compared, no verdict.
        predicted.metrics.per_adapter = vec![adapter(4, 10, 1.1)];
        let a = compare(&reference, &predicted).per_adapter_ttft_p99;
        assert_eq!(
            (a.compared, a.max_abs_error, a.within_target),
            (0, None, None)
        );
    }

    #[test]
    fn the_executed_run_is_the_reference() {
        let sim = run(Provenance::Derived, vec![]);
        let exe = run(Provenance::Executed, vec![]);
        let (r, p) = pick_reference(&sim, &exe);
        assert_eq!(r.metrics.provenance, Some(Provenance::Executed));
        assert_eq!(p.metrics.provenance, Some(Provenance::Derived));
        let (r, _) = pick_reference(&exe, &sim);
        assert_eq!(r.metrics.provenance, Some(Provenance::Executed));
        // Neither (or both) executed: the first argument.
        let mut other = run(Provenance::Calibrated, vec![]);
        let (r, _) = pick_reference(&other, &sim);
        assert_eq!(r.metrics.provenance, Some(Provenance::Calibrated));
        other.metrics.provenance = Some(Provenance::Executed);
        let (r, _) = pick_reference(&other, &exe);
        assert_eq!(r.dir, other.dir);
    }

    #[test]
    fn runs_of_one_kind_are_told_apart_and_mismatches_warned() {
        let a = run(Provenance::Derived, vec![]);
        let mut b = run(Provenance::Derived, vec![]);
        b.metrics.seed = 2;
        let cmp = compare(&a, &b);
        assert_eq!(cmp.reference.label, "simulated (derived), seed 1");
        assert_eq!(cmp.predicted.label, "simulated (derived), seed 2");
        assert!(cmp.warnings.is_empty(), "{:?}", cmp.warnings);
        b.metrics.seed = 1;
        b.metrics.scenario = "other".into();
        b.metrics.requests.submitted = 7;
        let cmp = compare(&a, &b);
        assert_eq!(
            cmp.predicted.label,
            "simulated (derived), seed 1, predicted"
        );
        assert!(cmp
            .warnings
            .iter()
            .any(|w| w.contains("different scenarios")));
        assert!(cmp.warnings.iter().any(|w| w.contains("0 rows")));
    }

    #[test]
    fn seconds_read_back_exactly() {
        assert_eq!(parse_seconds("12.000000345"), Ok(Nanos(12_000_000_345)));
        assert_eq!(parse_seconds("0.5"), Ok(Nanos(500_000_000)));
        assert_eq!(parse_seconds("3"), Ok(Nanos(3_000_000_000)));
        assert_eq!(parse_seconds(".25"), Ok(Nanos(250_000_000)));
        assert_eq!(parse_seconds("1.0000000019"), Ok(Nanos(1_000_000_001)));
        assert_eq!(parse_seconds("1e-3"), Ok(Nanos(1_000_000)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds(".").is_err());
    }

    #[test]
    fn request_rows_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.csv");
        let mut aborted = request(1, 3, 40, 90);
        aborted.status = RequestStatus::Aborted;
        aborted.first_token = None;
        aborted.finish = Some(Nanos(123_456_789));
        aborted.adapter = None;
        aborted.tenant = Some(2);
        let records = vec![request(0, 7, 40, 90), aborted];
        files::write_requests_csv(&path, &records).unwrap();
        assert_eq!(read_requests(&path).unwrap(), records);
    }

    #[test]
    fn bad_request_files_name_the_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.csv");
        let cases = [
            ("", "empty"),
            ("id,adapter\n", "`output_tokens`"),
            (
                "adapter,output_tokens,arrival_s,first_token_s,finish_s,status\n1,5,0.1,0.2,0.3,done\n",
                "line 2: `status` is `done`",
            ),
            (
                "adapter,output_tokens,arrival_s,first_token_s,finish_s,status\n1,5,x,0.2,0.3,completed\n",
                "line 2: `arrival_s`",
            ),
            (
                "adapter,output_tokens,arrival_s,first_token_s,finish_s,status\n1,5,0.1\n",
                "line 2: 3 cells",
            ),
            (
                "adapter,output_tokens,arrival_s,first_token_s,finish_s,status\n\n1,5,0.3,0.2,0.4,completed\n",
                "line 3: `first_token_s` is before `arrival_s`",
            ),
        ];
        for (text, needle) in cases {
            std::fs::write(&path, text).unwrap();
            let err = read_requests(&path).unwrap_err().to_string();
            assert!(err.contains("requests.csv"), "{err}");
            assert!(err.contains(needle), "expected `{needle}` in: {err}");
        }
    }

    #[test]
    fn runs_load_from_a_folder_or_its_metrics_json_and_fail_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let data = run(Provenance::Derived, vec![request(0, 1, 40, 90)]);
        std::fs::create_dir_all(&run_dir).unwrap();
        files::write_json(&run_dir.join("metrics.json"), &data.metrics).unwrap();
        files::write_requests_csv(&run_dir.join("requests.csv"), &data.requests).unwrap();
        for path in [run_dir.clone(), run_dir.join("metrics.json")] {
            let loaded = load_run(&path).unwrap();
            assert_eq!(loaded.metrics, data.metrics);
            assert_eq!(loaded.requests, data.requests);
            assert_eq!(loaded.dir, run_dir);
        }
        let missing = dir.path().join("nowhere");
        let err = load_run(&missing).unwrap_err().to_string();
        assert!(err.contains("nowhere"), "{err}");
        let err = load_run(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no metrics.json"), "{err}");
        std::fs::write(run_dir.join("metrics.json"), "{\"scenario\": 3}").unwrap();
        let err = load_run(&run_dir).unwrap_err().to_string();
        assert!(
            err.contains("metrics.json") && err.contains("line 1"),
            "{err}"
        );
        files::write_json(&run_dir.join("metrics.json"), &data.metrics).unwrap();
        std::fs::remove_file(run_dir.join("requests.csv")).unwrap();
        let err = load_run(&run_dir).unwrap_err().to_string();
        assert!(err.contains("requests.csv"), "{err}");
    }

    #[test]
    fn reports_are_written_and_state_the_errors() {
        let dir = tempfile::tempdir().unwrap();
        let reference = run(
            Provenance::Executed,
            (0..40).map(|i| request(i, 0, 100 + i, 900)).collect(),
        );
        let predicted = run(
            Provenance::Derived,
            (0..40).map(|i| request(i, 0, 120 + i, 1000)).collect(),
        );
        let mut reference = reference;
        reference.metrics.ttft_s.p99 = 0.139;
        let mut predicted = predicted;
        predicted.metrics.ttft_s.p99 = 0.159;
        let cmp = compare(&reference, &predicted);
        let written = write_comparison(&cmp, &reference, &predicted, dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "compare.json",
                "compare-cdf.png",
                "compare-cdf.svg",
                "compare.html",
                "compare.md"
            ]
        );
        let md = std::fs::read_to_string(dir.path().join("compare.md")).unwrap();
        assert!(
            md.contains("| TTFT p99 (s) | 0.139 | 0.159 | +14.39% | 14.39% |"),
            "{md}"
        );
        assert!(md.contains("compare-cdf.png"));
        let html = std::fs::read_to_string(dir.path().join("compare.html")).unwrap();
        assert!(html.contains("<svg") && html.contains("TTFT p99 (s)"));
        assert!(!html.contains("<script") && !html.contains("href=\"http"));
        let svg = std::fs::read_to_string(dir.path().join("compare-cdf.svg")).unwrap();
        assert!(svg.contains("reference: executed") && svg.contains("predicted: simulated"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("compare.json")).unwrap())
                .unwrap();
        assert_eq!(json["per_adapter_ttft_p99"]["compared"], 1);
        assert!(cmp.to_markdown().contains("+14.39%"));
    }
}
