//! The tables of the reports, built once as plain strings and rendered by both `html` and
//! `markdown`, so the two reports cannot disagree.

use crate::capacity::CapacityPoint;
use crate::files::{parameter_keys, parameter_text};
use crate::format::{gb, group, percent, short};
use slora_sim::cost::Provenance;
use slora_sim::metrics::{AdapterMetrics, Metrics, SloTargets, Summary, SweepResult};

/// A table: the first column is a label (left-aligned), the others are values (right-aligned).
pub(crate) struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// A sentence under the table.
    pub note: Option<String>,
}

impl Table {
    fn new(title: &str, header: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            note: None,
        }
    }

    fn row(&mut self, cells: impl IntoIterator<Item = impl Into<String>>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    fn pair(&mut self, label: &str, value: String) {
        self.rows.push(vec![label.to_string(), value]);
    }
}

/// The label shown on the provenance badge, and what it means.
pub(crate) fn provenance_label(p: Option<Provenance>) -> (&'static str, &'static str) {
    match p {
        Some(Provenance::Derived) => (
            "derived",
            "step costs estimated by a roofline from datasheet numbers; not measured",
        ),
        Some(Provenance::Calibrated) => (
            "calibrated",
            "step costs from lookup tables measured on a real GPU",
        ),
        Some(Provenance::Executed) => ("executed", "measured live on a GPU"),
        None => (
            "unlabelled",
            "the cost model did not state where its numbers come from",
        ),
    }
}

fn target(t: Option<f64>) -> String {
    match t {
        Some(t) => format!("≤ {} s", short(t)),
        None => "not constrained".to_string(),
    }
}

/// "TTFT ≤ 0.5 s, TPOT ≤ 0.05 s, attainment ≥ 99.00%" (only the constrained parts).
pub(crate) fn slo_sentence(slo: &SloTargets) -> String {
    let mut parts: Vec<String> = [
        ("TTFT", slo.ttft_s),
        ("TPOT", slo.tpot_s),
        ("E2E", slo.e2e_s),
    ]
    .iter()
    .filter_map(|(name, t)| t.map(|t| format!("{name} ≤ {} s", short(t))))
    .collect();
    parts.push(format!("attainment ≥ {}", percent(slo.attainment_target)));
    parts.join(", ")
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn latency_row(name: &str, s: &Summary) -> Vec<String> {
    vec![
        name.to_string(),
        group(s.count),
        short(s.mean),
        short(s.p50),
        short(s.p90),
        short(s.p95),
        short(s.p99),
        short(s.max),
    ]
}

/// The summary tables shown before the charts.
pub(crate) fn run_summary(m: &Metrics) -> Vec<Table> {
    let t = &m.throughput;
    let mut throughput = Table::new("Throughput", &["quantity", "value"]);
    throughput.pair("offered load (req/s)", short(t.offered_requests_per_s));
    throughput.pair("request throughput (req/s)", short(t.requests_per_s));
    throughput.pair(
        "output token throughput (tok/s)",
        short(t.output_tokens_per_s),
    );
    throughput.pair(
        "total token throughput (tok/s)",
        short(t.total_tokens_per_s),
    );
    throughput.pair(
        "goodput (req/s within every SLO)",
        short(t.goodput_requests_per_s),
    );
    throughput.pair("measurement window (s)", short(t.window_s));

    let mut latency = Table::new(
        "Latency (seconds)",
        &["metric", "count", "mean", "p50", "p90", "p95", "p99", "max"],
    );
    latency.rows = vec![
        latency_row("TTFT", &m.ttft_s),
        latency_row("TPOT", &m.tpot_s),
        latency_row("ITL", &m.itl_s),
        latency_row("E2E", &m.e2e_s),
        latency_row("queueing", &m.queueing_s),
    ];

    let mut slo = Table::new("SLO", &["quantity", "value"]);
    slo.pair("TTFT target", target(m.slo.ttft_s));
    slo.pair("TPOT target", target(m.slo.tpot_s));
    slo.pair("E2E target", target(m.slo.e2e_s));
    slo.pair("attainment target", percent(m.slo.attainment_target));
    slo.pair("attainment achieved", percent(m.slo_attainment));
    slo.pair("meets SLO", yes_no(m.meets_slo));
    slo.pair("goodput (req/s)", short(t.goodput_requests_per_s));

    let r = &m.requests;
    let mut requests = Table::new("Requests", &["outcome", "count"]);
    requests.pair("submitted", group(r.submitted));
    requests.pair("completed", group(r.completed));
    requests.pair("aborted", group(r.aborted));
    requests.pair("rejected", group(r.rejected));
    requests.pair("preemptions", group(r.preemptions));

    let p = &m.pool;
    let a = &m.adapter_traffic;
    // Whole page counts print as integers, means with four significant digits.
    let page_gb = |pages: f64| {
        let count = if pages.fract() == 0.0 && pages >= 0.0 {
            group(pages as u64)
        } else {
            short(pages)
        };
        if p.page_bytes > 0 {
            format!("{count} ({} GB)", short(gb(pages * p.page_bytes as f64)))
        } else {
            count
        }
    };
    let mut memory = Table::new("Adapters and memory", &["quantity", "value"]);
    memory.pair("adapter loads", group(a.loads));
    memory.pair("adapter evictions", group(a.evictions));
    memory.pair(
        "host-to-device transfer (GB)",
        short(gb(a.h2d_bytes as f64)),
    );
    memory.pair("pool capacity (pages)", page_gb(p.capacity_pages as f64));
    memory.pair("page size (bytes)", group(p.page_bytes));
    memory.pair("mean KV pages", page_gb(p.mean_kv_pages));
    memory.pair("peak KV pages", page_gb(p.peak_kv_pages as f64));
    memory.pair("mean adapter pages", page_gb(p.mean_adapter_pages));
    memory.pair("peak adapter pages", page_gb(p.peak_adapter_pages as f64));
    memory.pair("mean free pages", page_gb(p.mean_free_pages));

    let b = &m.batch;
    let mut batching = Table::new("Batching", &["quantity", "value"]);
    batching.pair("steps", group(b.steps));
    batching.pair("mean batch size (requests)", short(b.mean_batch_size));
    batching.pair("max batch size", group(b.max_batch_size as u64));
    batching.pair("mean distinct adapters", short(b.mean_distinct_adapters));
    batching.pair(
        "max distinct adapters",
        group(b.max_distinct_adapters as u64),
    );

    vec![throughput, latency, slo, requests, memory, batching]
}

/// Rows of the busiest adapters shown in the per-adapter table.
const TOP_ADAPTERS: usize = 20;

/// The detail tables shown after the charts.
pub(crate) fn run_details(m: &Metrics) -> Vec<Table> {
    let total: f64 = m
        .step_time_breakdown_s
        .values()
        .filter(|v| v.is_finite())
        .sum();
    let mut parts: Vec<(&String, f64)> = m
        .step_time_breakdown_s
        .iter()
        .map(|(k, v)| (k, *v))
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut breakdown = Table::new("Step time breakdown", &["part", "seconds", "share"]);
    for (name, secs) in parts {
        breakdown.row([
            name.clone(),
            short(secs),
            if total > 0.0 {
                percent(secs / total)
            } else {
                "n/a".to_string()
            },
        ]);
    }
    breakdown.row(["total".to_string(), short(total), percent(1.0)]);

    let mut adapters: Vec<&AdapterMetrics> = m.per_adapter.iter().collect();
    adapters.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.adapter.cmp(&b.adapter)));
    let mut busiest = Table::new(
        "Busiest adapters",
        &[
            "adapter",
            "LoRA rank",
            "requests",
            "completed",
            "TTFT p50 (s)",
            "TTFT p99 (s)",
            "loads",
            "evictions",
        ],
    );
    for a in adapters.iter().take(TOP_ADAPTERS) {
        busiest.row([
            a.adapter.to_string(),
            a.rank.to_string(),
            group(a.requests),
            group(a.completed),
            short(a.ttft_p50_s),
            short(a.ttft_p99_s),
            group(a.loads as u64),
            group(a.evictions as u64),
        ]);
    }
    if adapters.len() > TOP_ADAPTERS {
        busiest.note = Some(format!(
            "The {TOP_ADAPTERS} adapters with the most requests, of {}; metrics.json lists all.",
            group(adapters.len() as u64)
        ));
    }
    vec![breakdown, busiest]
}

pub(crate) fn capacity_table(cap: &[CapacityPoint]) -> Table {
    let grouped = cap.iter().any(|c| !c.group.is_empty());
    let mut header = vec!["adapters"];
    if grouped {
        header.insert(0, "other parameters");
    }
    header.extend([
        "highest rate meeting SLO (req/s)",
        "highest rate tested (req/s)",
        "rates tested",
    ]);
    let mut table = Table::new("Capacity", &header);
    for c in cap {
        let mut row = Vec::new();
        if grouped {
            row.push(c.group.clone());
        }
        row.push(group(c.adapters as u64));
        row.push(match c.max_rate_meeting_slo {
            Some(r) if c.is_lower_bound() => format!("≥ {}", short(r)),
            Some(r) => short(r),
            None => "none met".to_string(),
        });
        row.push(short(c.highest_rate_tested));
        row.push(c.rates_tested.to_string());
        table.rows.push(row);
    }
    table.note = Some(
        "“≥” marks counts where the highest rate tested met the SLO: the capacity may be higher."
            .to_string(),
    );
    table
}

/// A parameter that only restates a point's adapter count or offered rate (e.g.
/// `adapters.count`), so the points table can leave its column out.
fn restates_adapters_or_rate(sweep: &SweepResult, key: &str) -> bool {
    let same = |f: &dyn Fn(&slora_sim::metrics::SweepPoint) -> f64| {
        sweep.points.iter().all(|p| {
            p.parameters
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .is_some_and(|v| v == f(p))
        })
    };
    !sweep.points.is_empty() && (same(&|p| p.adapters as f64) || same(&|p| p.offered_rate))
}

/// Every point of the sweep, in sweep order (the rows of sweep.csv, rounded; parameters that
/// only restate the adapter count or rate are left out).
pub(crate) fn points_table(sweep: &SweepResult) -> Table {
    let keys: Vec<String> = parameter_keys(sweep)
        .into_iter()
        .filter(|k| !restates_adapters_or_rate(sweep, k))
        .collect();
    let mut header: Vec<&str> = keys.iter().map(String::as_str).collect();
    header.extend([
        "adapters",
        "offered (req/s)",
        "throughput (req/s)",
        "output (tok/s)",
        "TTFT p50 (s)",
        "TTFT p99 (s)",
        "TPOT p50 (s)",
        "TPOT p99 (s)",
        "attainment",
        "meets SLO",
        "aborted",
    ]);
    let mut table = Table::new("Sweep points", &header);
    for p in &sweep.points {
        let m = &p.metrics;
        let mut row: Vec<String> = keys
            .iter()
            .map(|k| p.parameters.get(k).map(parameter_text).unwrap_or_default())
            .collect();
        row.extend([
            group(p.adapters as u64),
            short(p.offered_rate),
            short(m.throughput.requests_per_s),
            short(m.throughput.output_tokens_per_s),
            short(m.ttft_s.p50),
            short(m.ttft_s.p99),
            short(m.tpot_s.p50),
            short(m.tpot_s.p99),
            percent(m.slo_attainment),
            yes_no(m.meets_slo),
            group(m.requests.aborted),
        ]);
        table.rows.push(row);
    }
    table
}
