//! The outputs of a capacity plan (`slora-plan plan`): `plan.json` with every evaluated
//! point, three charts (capacity against adapters per GPU kind and TP degree, cost against
//! target rate, the cost / latency Pareto front; PNG + SVG), and `plan.html` / `plan.md`,
//! which read without the tool.

use crate::charts::{
    self, color, Annotation, Axis, Body, Figure, LegendAt, LineChart, Marker, Series, SeriesKind,
    GREY, SIZE,
};
use crate::error::ReportError;
use crate::files;
use crate::format::{group, percent, short};
use crate::page::Page;
use crate::tables::{slo_sentence, Table};
use crate::{html, markdown};
use slora_planner::plan::{Candidate, CapacityCurve, CostCurve, PlanResult, Role, Verdict};
use slora_sim::cost::Provenance;
use std::path::{Path, PathBuf};

/// Writes every output of a plan into `dir` (created if missing) and returns the paths
/// written: `plan.json`, the charts (PNG, SVG each), `plan.html`, `plan.md`.
pub fn write_plan(dir: &Path, plan: &PlanResult) -> Result<Vec<PathBuf>, ReportError> {
    files::create_dir(dir)?;
    let mut written = vec![files::write_json(&dir.join("plan.json"), plan)?];
    let mut rendered = Vec::new();
    for figure in [capacity_chart(plan), cost_chart(plan), pareto_chart(plan)] {
        let chart = charts::render(dir, &figure)?;
        written.push(chart.png.clone());
        written.push(chart.svg.clone());
        rendered.push(chart);
    }
    let mut provenance: Vec<Option<Provenance>> = plan
        .candidates
        .iter()
        .filter(|c| c.provenance.is_some())
        .map(|c| c.provenance)
        .collect();
    provenance.sort_by_key(|p| p.map(|p| p as u8));
    provenance.dedup();
    let t = &plan.targets;
    let s = &plan.search;
    let mut facts = vec![
        ("answer".to_string(), verdict_sentence(plan)),
        ("target rate".into(), format!("{} req/s", short(t.rate))),
        ("adapters".into(), group(t.adapters as u64)),
        ("SLO".into(), slo_sentence(&plan.slo)),
    ];
    if let Some(b) = t.budget_usd_per_hour {
        facts.push(("budget".into(), format!("${b:.2}/hour")));
    }
    if let Some(g) = t.max_gpus {
        facts.push(("most GPUs".into(), g.to_string()));
    }
    facts.extend([
        ("GPU kinds".into(), s.gpus.join(", ")),
        (
            "tensor parallel".into(),
            s.tensor_parallel
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("replicas".into(), format!("1 to {}", s.max_replicas)),
        (
            "routers".into(),
            s.routers
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("knob combinations".into(), s.knob_combinations.to_string()),
        ("simulations".into(), group(plan.simulations)),
        (
            "per evaluation".into(),
            format!(
                "{} s of arrivals (at least {} requests), seed {}",
                short(s.duration_s),
                s.min_requests,
                s.seed
            ),
        ),
        (
            "rate granularity".into(),
            format!("{}%", short(s.granularity * 100.0)),
        ),
    ]);
    for note in &plan.notes {
        facts.push(("note".into(), note.clone()));
    }
    let mut definitions = plan.definitions.clone();
    for (k, v) in slora_sim::metrics::definitions() {
        definitions.entry(k).or_insert(v);
    }
    let page = Page {
        kind: "Capacity plan",
        scenario: plan.scenario.clone(),
        provenance,
        facts,
        summary: vec![recommendation_table(plan), growth_table(plan)],
        charts: rendered,
        details: vec![
            deployments_table(plan),
            screening_table(plan),
            capacity_table(&plan.capacity_curves),
        ],
        definitions,
        data_files: vec!["plan.json".into()],
    };
    written.push(files::write_bytes(
        &dir.join("plan.html"),
        html::render(&page).as_bytes(),
    )?);
    written.push(files::write_bytes(
        &dir.join("plan.md"),
        markdown::render(&page).as_bytes(),
    )?);
    Ok(written)
}

fn usd(x: f64) -> String {
    format!("${x:.2}")
}

fn provenance_text(p: Option<Provenance>) -> String {
    match p {
        Some(Provenance::Calibrated) => "calibrated",
        Some(Provenance::Derived) => "derived",
        Some(Provenance::Executed) => "executed",
        None => "—",
    }
    .to_string()
}

fn rate_text(c: &Candidate) -> String {
    match c.max_rate {
        Some(r) if c.max_rate_is_lower_bound => format!("≥ {}", short(r)),
        Some(r) => short(r),
        None => "—".into(),
    }
}

fn adapters_text(c: &Candidate) -> String {
    match c.max_adapters_at_target {
        Some(n) if c.max_adapters_is_lower_bound => format!("≥ {}", group(n as u64)),
        Some(n) => group(n as u64),
        None => "—".into(),
    }
}

/// The answer in one sentence.
fn verdict_sentence(plan: &PlanResult) -> String {
    let t = &plan.targets;
    match &plan.verdict {
        Verdict::Recommended => {
            let r = &plan.recommendations[0];
            let sentence = format!(
                "{} at {}/hour sustains {} req/s ({:.2}× the target)",
                r.label,
                usd(r.usd_per_hour),
                short(r.max_rate),
                r.headroom
            );
            match slora_planner::summary::knee_note(
                &plan.candidates[r.candidate],
                t.rate,
                plan.search.granularity,
            ) {
                Some(note) => format!("{sentence}. {note}"),
                None => sentence,
            }
        }
        Verdict::OverBudget {
            budget_usd_per_hour,
            cheapest_usd_per_hour,
            cheapest_candidate,
        } => format!(
            "nothing within {}/hour meets {} req/s; the cheapest that does is {} at {}/hour",
            usd(*budget_usd_per_hour),
            short(t.rate),
            plan.candidates[*cheapest_candidate].label(),
            usd(*cheapest_usd_per_hour)
        ),
        Verdict::NoneMeetsTarget { best_max_rate, .. } => format!(
            "no configuration tried meets {} req/s with {} adapters{}",
            short(t.rate),
            group(t.adapters as u64),
            best_max_rate
                .map(|r| format!("; the most any sustains is {} req/s", short(r)))
                .unwrap_or_else(|| "; none meets the SLO at any rate tried".into())
        ),
    }
}

fn recommendation_table(plan: &PlanResult) -> Table {
    let header = [
        "rank",
        "configuration",
        "GPUs",
        "knobs",
        "max rate (req/s)",
        "headroom",
        "$/hour",
        "$/M output tokens",
        "TTFT p99 at target (s)",
        "adapters at target",
        "costs",
    ];
    let rows = plan
        .recommendations
        .iter()
        .map(|r| {
            let c = &plan.candidates[r.candidate];
            vec![
                r.rank.to_string(),
                r.label.clone(),
                r.gpus.to_string(),
                r.knobs.clone(),
                rate_text(c),
                format!("{:.2}×", r.headroom),
                usd(r.usd_per_hour),
                r.usd_per_million_output_tokens
                    .map(usd)
                    .unwrap_or_else(|| "—".into()),
                short(r.ttft_p99_at_target_s),
                adapters_text(c),
                provenance_text(r.provenance),
            ]
        })
        .collect::<Vec<_>>();
    Table {
        title: "Recommendation".into(),
        header: header.iter().map(|h| h.to_string()).collect(),
        note: Some(if rows.is_empty() {
            format!("No recommendation: {}.", verdict_sentence(plan))
        } else {
            "Deployments whose evaluation at the target rate meets the SLO, within the budget, \
             cheapest per hour first. Prices are per GPU-hour × GPUs; costs: `calibrated` = step \
             times measured on that GPU, `derived` = roofline from datasheet numbers."
                .into()
        }),
        rows,
    }
}

fn growth_table(plan: &PlanResult) -> Table {
    let mut rows = Vec::new();
    if let Some(g) = &plan.growth {
        let c = &plan.candidates[g.candidate];
        rows.push(vec![
            "request rate".to_string(),
            format!("{} req/s", rate_text(c)),
            g.rate_limit
                .as_ref()
                .and_then(|b| b.bottleneck)
                .map_or("—".into(), |b| b.label().to_string()),
            g.rate_limit
                .as_ref()
                .map_or("nothing up to the search's ceiling".into(), |b| {
                    format!("at {} req/s: {}", short(b.at), b.detail)
                }),
        ]);
        rows.push(vec![
            format!("adapters at {} req/s", short(plan.targets.rate)),
            adapters_text(c),
            g.adapter_limit
                .as_ref()
                .and_then(|b| b.bottleneck)
                .map_or("—".into(), |b| b.label().to_string()),
            g.adapter_limit
                .as_ref()
                .map_or("nothing up to the search's ceiling".into(), |b| {
                    format!("at {} adapters: {}", group(b.at as u64), b.detail)
                }),
        ]);
        rows.push(vec![
            format!(
                "twice the target ({} req/s)",
                short(2.0 * plan.targets.rate)
            ),
            g.for_twice_the_target
                .and_then(|i| plan.candidate(i))
                .map_or("no configuration tried".into(), |n| {
                    format!("{} at {}/hour", n.label(), usd(n.usd_per_hour))
                }),
            String::new(),
            String::new(),
        ]);
    }
    Table {
        title: "What breaks first as it grows (top recommendation)".into(),
        header: ["limit", "up to", "what breaks", "evidence"]
            .iter()
            .map(|h| h.to_string())
            .collect(),
        rows,
        note: Some(
            "Read at the lowest failing evaluation above each limit (definitions: breaks_first)."
                .into(),
        ),
    }
}

fn deployments_table(plan: &PlanResult) -> Table {
    let header = [
        "id",
        "configuration",
        "GPUs",
        "$/hour",
        "max rate (req/s)",
        "meets target",
        "headroom",
        "adapters at target",
        "breaks first",
        "costs",
        "note",
    ];
    let rows = plan
        .candidates
        .iter()
        .filter(|c| c.role == Role::Deployment)
        .map(|c| {
            vec![
                c.id.to_string(),
                c.label(),
                c.gpus.to_string(),
                usd(c.usd_per_hour),
                rate_text(c),
                if c.meets_target { "yes" } else { "no" }.to_string(),
                c.headroom.map_or("—".into(), |h| format!("{h:.2}×")),
                adapters_text(c),
                c.breaks_first
                    .as_ref()
                    .and_then(|b| b.bottleneck)
                    .map_or("—".into(), |b| b.label().to_string()),
                provenance_text(c.provenance),
                match (&c.infeasible, c.within_budget) {
                    (Some(why), _) => why.clone(),
                    (None, false) => "over budget".into(),
                    _ => String::new(),
                },
            ]
        })
        .collect();
    Table {
        title: "Every deployment".into(),
        header: header.iter().map(|h| h.to_string()).collect(),
        rows,
        note: Some("Each with its GPU kind's best knobs (see the knob screening).".into()),
    }
}

fn screening_table(plan: &PlanResult) -> Table {
    let rows = plan
        .candidates
        .iter()
        .filter(|c| {
            c.config.replicas == 1 && (c.role == Role::KnobScreening || c.rate_search.is_some())
        })
        .filter(|c| plan.search.knob_combinations > 1 || c.role == Role::Deployment)
        .map(|c| {
            vec![
                format!("{} TP {}", c.config.gpu, c.config.tensor_parallel),
                c.knobs_text.clone(),
                rate_text(c),
                if c.role == Role::Deployment {
                    "best"
                } else {
                    ""
                }
                .to_string(),
                c.infeasible.clone().unwrap_or_default(),
            ]
        })
        .collect();
    Table {
        title: "Knob screening (one replica, target adapter count)".into(),
        header: ["GPU", "knobs", "max rate (req/s)", "chosen", "note"]
            .iter()
            .map(|h| h.to_string())
            .collect(),
        rows,
        note: None,
    }
}

fn capacity_table(curves: &[CapacityCurve]) -> Table {
    let mut rows = Vec::new();
    for curve in curves {
        for p in &curve.points {
            rows.push(vec![
                format!("{} TP {}", curve.gpu, curve.tensor_parallel),
                group(p.adapters as u64),
                match p.max_rate {
                    Some(r) if p.is_lower_bound => format!("≥ {}", short(r)),
                    Some(r) => short(r),
                    None => "none met".into(),
                },
                p.infeasible.clone().unwrap_or_default(),
            ]);
        }
    }
    Table {
        title: "Capacity of one replica by adapter count".into(),
        header: ["GPU", "adapters", "max rate (req/s)", "note"]
            .iter()
            .map(|h| h.to_string())
            .collect(),
        rows,
        note: None,
    }
}

fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.filter(|v| v.is_finite()).fold(0.0f64, f64::max)
}

fn capacity_chart(plan: &PlanResult) -> Figure {
    let curves = &plan.capacity_curves;
    let counts = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.adapters as f64));
    let min_count = counts.clone().fold(f64::INFINITY, f64::min);
    let max_count = max_of(counts);
    let mut x = if min_count > 0.0 && max_count / min_count > 10.0 {
        Axis::log("adapters (log scale)", min_count / 1.6, max_count * 1.6)
    } else {
        Axis::linear("adapters", 0.0, max_count.max(1.0) * 1.12)
    };
    let mut ticks: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.adapters as f64))
        .collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    if (1..=12).contains(&ticks.len()) {
        x = x.with_ticks(ticks);
    }
    let max_rate = max_of(
        curves
            .iter()
            .flat_map(|c| c.points.iter().filter_map(|p| p.max_rate)),
    )
    .max(plan.targets.rate);
    let mut series = vec![Series::new(
        Some("target rate (whole deployment)".into()),
        GREY,
        SeriesKind::Dashed,
        vec![(x.min, plan.targets.rate), (x.max, plan.targets.rate)],
    )];
    let mut unmet = Vec::new();
    let mut bounded = Vec::new();
    for (i, curve) in curves.iter().enumerate() {
        let met: Vec<(f64, f64)> = curve
            .points
            .iter()
            .filter_map(|p| p.max_rate.map(|r| (p.adapters as f64, r)))
            .collect();
        unmet.extend(
            curve
                .points
                .iter()
                .filter(|p| p.max_rate.is_none())
                .map(|p| (p.adapters as f64, 0.0)),
        );
        bounded.extend(
            curve
                .points
                .iter()
                .filter(|p| p.is_lower_bound)
                .filter_map(|p| p.max_rate.map(|r| (p.adapters as f64, r))),
        );
        series.push(Series::new(
            Some(format!("{} TP {}", curve.gpu, curve.tensor_parallel)),
            color(i),
            SeriesKind::LineMarkers(Marker::Circle),
            met,
        ));
    }
    if !bounded.is_empty() {
        let mut s = Series::new(
            Some("search ceiling met: capacity ≥ value".into()),
            GREY,
            SeriesKind::Markers(Marker::Triangle),
            bounded,
        );
        s.lift_px = 13;
        series.push(s);
    }
    if !unmet.is_empty() {
        let mut s = Series::new(
            Some("no rate met the SLO (or not runnable)".into()),
            color(2),
            SeriesKind::Markers(Marker::Cross),
            unmet,
        );
        s.lift_px = 10;
        series.push(s);
    }
    Figure {
        name: "plan_capacity",
        heading: "Capacity of one replica against the number of adapters".into(),
        caption: format!(
            "For each GPU kind and TP degree (one replica, its best knobs), the highest request \
             rate meeting the SLO ({}) against the number of adapters served. The dashed line \
             is the whole deployment's target rate: fleets of several replicas reach above it.",
            slo_sentence(&plan.slo)
        ),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: "Highest rate meeting the SLO vs adapters (one replica)".into(),
            x,
            y: Axis::linear("highest rate meeting the SLO (req/s)", 0.0, max_rate * 1.12),
            series,
            annotations: Vec::new(),
            legend: LegendAt::Auto,
            note: curves
                .iter()
                .all(|c| c.points.iter().all(|p| p.max_rate.is_none()))
                .then(|| "No configuration met the SLO".to_string()),
        }),
    }
}

/// A staircase through `steps`: the cost of each step from the previous step's rate to its
/// own.
fn staircase(curve: &CostCurve) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut from = 0.0;
    for s in &curve.steps {
        points.push((from, s.usd_per_hour));
        points.push((s.up_to_rate, s.usd_per_hour));
        from = s.up_to_rate;
    }
    points
}

fn cost_chart(plan: &PlanResult) -> Figure {
    let max_rate = max_of(
        plan.cost_curves
            .iter()
            .flat_map(|c| c.steps.iter().map(|s| s.up_to_rate)),
    )
    .max(plan.targets.rate);
    let max_cost = max_of(
        plan.cost_curves
            .iter()
            .flat_map(|c| c.steps.iter().map(|s| s.usd_per_hour)),
    )
    .max(1.0);
    let mut series = vec![Series::new(
        Some("target rate".into()),
        GREY,
        SeriesKind::Dashed,
        vec![
            (plan.targets.rate, 0.0),
            (plan.targets.rate, max_cost * 1.12),
        ],
    )];
    for (i, curve) in plan.cost_curves.iter().enumerate() {
        if curve.steps.is_empty() {
            continue;
        }
        let mut s = Series::new(
            Some(curve.label.clone()),
            if curve.gpu.is_none() {
                plotters::style::BLACK
            } else {
                color(i - 1)
            },
            SeriesKind::Line,
            staircase(curve),
        );
        if curve.gpu.is_none() {
            s.width = 4;
        }
        series.push(s);
    }
    if let Some(r) = plan.recommendations.first() {
        let mut s = Series::new(
            Some("recommended".into()),
            plotters::style::BLACK,
            SeriesKind::Markers(Marker::Circle),
            vec![(plan.targets.rate, r.usd_per_hour)],
        );
        s.marker_px = 6;
        series.push(s);
    }
    let annotations = plan
        .recommendations
        .first()
        .map(|r| {
            vec![Annotation {
                at: (plan.targets.rate, r.usd_per_hour),
                text: format!("{} × {}, {}", r.replicas, r.gpu, usd(r.usd_per_hour)),
                lift_px: 8,
            }]
        })
        .unwrap_or_default();
    Figure {
        name: "plan_cost_vs_rate",
        heading: "Cost against target rate".into(),
        caption: "For each request rate, the cost per hour of the cheapest deployment whose \
                  highest rate at the SLO reaches it: one staircase per GPU kind and TP degree, \
                  and the cheapest of all (black). Read from the rate searches; the \
                  recommendation itself rests on an evaluation at exactly the target rate."
            .into(),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: "Cheapest deployment per target rate".into(),
            x: Axis::linear("target rate (req/s)", 0.0, max_rate * 1.08),
            y: Axis::linear("USD per hour", 0.0, max_cost * 1.12),
            series,
            annotations,
            legend: LegendAt::Auto,
            note: plan
                .cost_curves
                .iter()
                .all(|c| c.steps.is_empty())
                .then(|| "No deployment met the SLO at any rate".to_string()),
        }),
    }
}

fn pareto_chart(plan: &PlanResult) -> Figure {
    let meeting: Vec<&Candidate> = plan
        .candidates
        .iter()
        .filter(|c| c.role == Role::Deployment && c.meets_target)
        .collect();
    let ttft = |c: &Candidate| c.at_target.as_ref().map_or(0.0, |s| s.ttft_p99_s);
    // The axis fits the data (log when it spans more than 20×); the TTFT limit is drawn only
    // when it falls inside, since latencies far below it would crowd into the left edge.
    let max_x = max_of(meeting.iter().map(|c| ttft(c))).max(1e-3) * 1.3;
    let min_x = meeting
        .iter()
        .map(|c| ttft(c))
        .filter(|t| *t > 0.0)
        .fold(f64::INFINITY, f64::min);
    let x = if min_x.is_finite() && max_x / min_x > 20.0 {
        Axis::log(
            "TTFT p99 at the target rate (s, log scale)",
            min_x / 1.3,
            max_x,
        )
    } else {
        Axis::linear("TTFT p99 at the target rate (s)", 0.0, max_x)
    };
    let max_y = max_of(meeting.iter().map(|c| c.usd_per_hour)).max(1.0);
    // Kinds in the plan's order, so each keeps the colour it has on the other charts.
    let kinds: Vec<(String, u32)> = plan
        .capacity_curves
        .iter()
        .map(|c| (c.gpu.clone(), c.tensor_parallel))
        .collect();
    let mut series = Vec::new();
    if let Some(limit) = plan.slo.ttft_s.filter(|l| *l <= max_x) {
        series.push(Series::new(
            Some("TTFT SLO".into()),
            GREY,
            SeriesKind::Dashed,
            vec![(limit, 0.0), (limit, max_y * 1.12)],
        ));
    }
    let front: Vec<(f64, f64)> = plan
        .pareto
        .iter()
        .filter_map(|&i| plan.candidate(i))
        .map(|c| (ttft(c), c.usd_per_hour))
        .collect();
    if !front.is_empty() {
        series.push(Series::new(
            Some("Pareto front".into()),
            plotters::style::BLACK,
            SeriesKind::Line,
            front.clone(),
        ));
    }
    for (i, (gpu, tp)) in kinds.iter().enumerate() {
        let points: Vec<(f64, f64)> = meeting
            .iter()
            .filter(|c| c.config.gpu == *gpu && c.config.tensor_parallel == *tp)
            .map(|c| (ttft(c), c.usd_per_hour))
            .collect();
        if !points.is_empty() {
            series.push(Series::new(
                Some(format!("{gpu} TP {tp}")),
                color(i),
                SeriesKind::Markers(Marker::Circle),
                points,
            ));
        }
    }
    let annotations = if plan.pareto.len() <= 8 {
        plan.pareto
            .iter()
            .filter_map(|&i| plan.candidate(i))
            .map(|c| Annotation {
                at: (ttft(c), c.usd_per_hour),
                text: format!("{} × {}", c.config.replicas, c.config.gpu),
                lift_px: 10,
            })
            .collect()
    } else {
        Vec::new()
    };
    Figure {
        name: "plan_pareto",
        heading: "Cost and latency: the Pareto front".into(),
        caption: format!(
            "Every deployment that meets the target rate ({} req/s): its cost per hour against \
             its p99 time to first token at the target. The line joins the Pareto front: no \
             other deployment is both cheaper and faster. SLO attainment at the target: {}.",
            short(plan.targets.rate),
            percent(plan.slo.attainment_target)
        ),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: "USD per hour vs p99 TTFT at the target rate".into(),
            x,
            y: Axis::linear("USD per hour", 0.0, max_y * 1.12),
            series,
            annotations,
            legend: LegendAt::Auto,
            note: meeting
                .is_empty()
                .then(|| "No deployment meets the target rate".to_string()),
        }),
    }
}
