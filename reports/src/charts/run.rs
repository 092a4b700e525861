//! The charts of one run. Each builder reads the run, reduces it to at most
//! `MAX_POINTS` points per series, and returns a `Figure`; nothing here draws.

use super::{
    color, Annotation, Axis, Bar, BarChart, Body, Figure, LegendAt, LineChart, Marker, Series,
    SeriesKind, LIGHT_GREY, SIZE,
};
use crate::downsample::{cdf_points, cdf_steps, time_bins, Bin, MAX_POINTS};
use crate::format;
use plotters::style::RGBColor;
use slora_sim::metrics::{AdapterMetrics, RequestStatus, RunResult};

/// Every chart of a run, in report order.
pub(crate) fn figures(run: &RunResult) -> Vec<Figure> {
    vec![
        latency_cdf(run),
        pool_occupancy(run),
        batch(run),
        step_breakdown(run),
        adapter_ttft(run),
    ]
}

/// Pads a log range by a factor, a linear one from zero.
fn x_axis_for(label: &str, min_positive: f64, max: f64, log: bool) -> Axis {
    if log {
        Axis::log(label, min_positive / 1.5, max * 1.5)
    } else {
        Axis::linear(label, 0.0, max * 1.05)
    }
}

/// Log scale when the values span more than `ratio`; only positive values can be drawn then.
fn wants_log(min_positive: f64, max: f64, ratio: f64) -> bool {
    min_positive.is_finite() && min_positive > 0.0 && max / min_positive > ratio
}

pub(crate) fn latency_cdf(run: &RunResult) -> Figure {
    let (mut ttft, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    // Completed requests only: E2E exists for no other, and a CDF mixing populations would
    // make the three curves incomparable.
    for r in run
        .requests
        .iter()
        .filter(|r| r.status == RequestStatus::Completed)
    {
        if let Some(t) = r.ttft() {
            ttft.push(t.as_secs_f64());
        }
        if let Some(t) = r.tpot() {
            tpot.push(t);
        }
        if let Some(t) = r.e2e() {
            e2e.push(t.as_secs_f64());
        }
    }
    let completed = e2e.len();
    let slo = &run.metrics.slo;
    let curves = [
        (
            "TTFT",
            ttft.len(),
            cdf_points(&mut ttft, MAX_POINTS),
            slo.ttft_s,
        ),
        (
            "TPOT",
            tpot.len(),
            cdf_points(&mut tpot, MAX_POINTS),
            slo.tpot_s,
        ),
        (
            "E2E",
            e2e.len(),
            cdf_points(&mut e2e, MAX_POINTS),
            slo.e2e_s,
        ),
    ];
    let xs = curves
        .iter()
        .flat_map(|(_, _, pts, target)| pts.iter().map(|p| p.0).chain(*target))
        .filter(|x| x.is_finite());
    let (min_pos, max) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (if x > 0.0 { lo.min(x) } else { lo }, hi.max(x))
    });
    let log = wants_log(min_pos, max, 20.0);
    let mut series = Vec::new();
    for (i, (name, count, points, target)) in curves.iter().enumerate() {
        let points: Vec<(f64, f64)> = points
            .iter()
            .copied()
            .filter(|p| !log || p.0 > 0.0)
            .collect();
        // Below MAX_POINTS every sample is kept, and a small sample reads best as the step
        // function it is; a quantile-sampled curve is drawn through its samples instead, so
        // it stays within MAX_POINTS vertices.
        let points = if *count <= MAX_POINTS {
            cdf_steps(&points)
        } else {
            points
        };
        series.push(Series::new(
            Some(name.to_string()),
            color(i),
            SeriesKind::Line,
            points,
        ));
        if let Some(t) = target.filter(|t| t.is_finite() && (!log || *t > 0.0)) {
            series.push(Series::new(
                Some(format!("{name} SLO {} s", format::short(t))),
                color(i),
                SeriesKind::Dashed,
                vec![(t, 0.0), (t, 1.0)],
            ));
        }
    }
    let note = (completed == 0).then(|| "No completed requests".to_string());
    let x_label = if log {
        "latency (s, log scale)"
    } else {
        "latency (s)"
    };
    Figure {
        name: "latency_cdf",
        heading: "Latency distributions".to_string(),
        caption: format!(
            "Empirical CDFs of TTFT, TPOT and end-to-end latency over the {} completed \
             requests (TPOT leaves out one-token outputs): a curve's height at x is the share \
             of requests at or under x. Dashed lines are the SLO targets. Each curve is reduced to at most {MAX_POINTS} evenly \
             spaced quantiles.",
            format::group(completed as u64)
        ),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: format!(
                "Latency CDF of {} completed requests",
                format::group(completed as u64)
            ),
            x: x_axis_for(x_label, min_pos, max, log),
            y: Axis::linear("share of requests ≤ x", 0.0, 1.02).percent(),
            series,
            annotations: Vec::new(),
            legend: LegendAt::Auto,
            note,
        }),
    }
}

pub(crate) fn pool_occupancy(run: &RunResult) -> Figure {
    let pool = &run.metrics.pool;
    let (scale, unit) = if pool.page_bytes > 0 {
        (format::gb(pool.page_bytes as f64), "GB")
    } else {
        (1.0, "pages")
    };
    let bins = time_bins(&run.steps, MAX_POINTS, |s| {
        [
            s.kv_pages as f64 * scale,
            s.adapter_pages as f64 * scale,
            s.free_pages as f64 * scale,
        ]
    });
    let stacked = |f: &dyn Fn(&Bin<3>) -> f64| -> Vec<(f64, f64)> {
        bins.iter().map(|b| (b.t_s, f(b))).collect()
    };
    let kv = stacked(&|b| b.values[0].mean);
    let kv_adapters = stacked(&|b| b.values[0].mean + b.values[1].mean);
    let total = stacked(&|b| b.values[0].mean + b.values[1].mean + b.values[2].mean);
    let capacity = pool.capacity_pages as f64 * scale;
    let top = total.iter().map(|p| p.1).fold(capacity, f64::max);
    let (t_min, t_max) = time_span(&bins);
    let series = vec![
        Series::new(Some("free".into()), LIGHT_GREY, SeriesKind::Area, total),
        Series::new(
            Some("adapter weights".into()),
            color(1),
            SeriesKind::Area,
            kv_adapters,
        ),
        Series::new(Some("KV cache".into()), color(0), SeriesKind::Area, kv),
    ];
    let capacity_text = if pool.page_bytes > 0 {
        format!(
            "{} GB = {} pages",
            format::short(capacity),
            format::group(pool.capacity_pages as u64)
        )
    } else {
        format!("{} pages", format::group(pool.capacity_pages as u64))
    };
    Figure {
        name: "pool_occupancy",
        heading: "GPU memory pool".to_string(),
        caption: format!(
            "The unified page pool over time, stacked: KV cache pages (bottom), adapter weight \
             pages, and free pages (top), in {unit}. Capacity {capacity_text}. Each point is \
             the duration-weighted mean over one of at most {MAX_POINTS} time bins."
        ),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: format!("GPU pool occupancy (capacity {capacity_text})"),
            x: Axis::linear("time (s)", t_min, t_max),
            // Headroom above the stack holds the legend, which would otherwise hide data.
            y: Axis::linear(format!("pool ({unit})"), 0.0, top * 1.32),
            series,
            annotations: Vec::new(),
            legend: LegendAt::Auto,
            note: bins.is_empty().then(|| "No steps recorded".to_string()),
        }),
    }
}

fn time_span<const N: usize>(bins: &[Bin<N>]) -> (f64, f64) {
    match (bins.first(), bins.last()) {
        (Some(a), Some(b)) => (a.t_s.min(b.t_s), a.t_s.max(b.t_s)),
        _ => (0.0, 1.0),
    }
}

/// Light tint of a palette colour, for the "max per bin" line drawn behind the mean.
fn tint(c: RGBColor) -> RGBColor {
    let mix = |v: u8| (v as u16 + (255 - v as u16) * 3 / 5) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

pub(crate) fn batch(run: &RunResult) -> Figure {
    let bins = time_bins(&run.steps, MAX_POINTS, |s| {
        [
            (s.prefill_requests + s.decode_requests) as f64,
            s.distinct_adapters as f64,
        ]
    });
    // When every bin holds one step, mean and max coincide: draw one line, called per step.
    let binned = bins
        .iter()
        .any(|b| b.values.iter().any(|v| v.mean != v.max));
    let (t_min, t_max) = time_span(&bins);
    let panel = |i: usize, title: &str, y_label: &str| -> LineChart {
        let mean: Vec<(f64, f64)> = bins.iter().map(|b| (b.t_s, b.values[i].mean)).collect();
        let max_line: Vec<(f64, f64)> = bins.iter().map(|b| (b.t_s, b.values[i].max)).collect();
        let top = max_line.iter().map(|p| p.1).fold(0.0f64, f64::max);
        let thin = |label: &str, c: RGBColor, points: Vec<(f64, f64)>| {
            let mut s = Series::new(Some(label.into()), c, SeriesKind::Line, points);
            s.width = 1;
            s
        };
        let series = if binned {
            vec![
                thin("max per time bin", tint(color(i)), max_line),
                thin("mean per time bin", color(i), mean),
            ]
        } else {
            vec![thin("per step", color(i), mean)]
        };
        LineChart {
            title: title.to_string(),
            x: Axis::linear("time (s)", t_min, t_max),
            y: Axis::linear(y_label, 0.0, if top > 0.0 { top * 1.45 } else { 1.0 }),
            series,
            annotations: Vec::new(),
            legend: LegendAt::Auto,
            note: bins.is_empty().then(|| "No steps recorded".to_string()),
        }
    };
    let b = &run.metrics.batch;
    Figure {
        name: "batch",
        heading: "Batch size and adapter mix".to_string(),
        caption: format!(
            "Top: requests per step (prefill + decode), mean {} and max {} over the run. \
             Bottom: distinct adapters per step, mean {} and max {}. With more steps than \
             {MAX_POINTS}, each point summarises one time bin: the dark line is the \
             duration-weighted mean, the light line the largest step in the bin.",
            format::short(b.mean_batch_size),
            b.max_batch_size,
            format::short(b.mean_distinct_adapters),
            b.max_distinct_adapters
        ),
        size: (SIZE.0, 680),
        body: Body::Panels(vec![
            panel(
                0,
                "Batch size (prefill + decode requests per step)",
                "requests",
            ),
            panel(1, "Distinct adapters per step", "adapters"),
        ]),
    }
}

pub(crate) fn step_breakdown(run: &RunResult) -> Figure {
    let parts = &run.metrics.step_time_breakdown_s;
    let total: f64 = parts.values().filter(|v| v.is_finite()).sum();
    let mut shown: Vec<(&String, f64)> = parts
        .iter()
        .filter(|(_, v)| v.is_finite() && **v > 0.0)
        .map(|(k, v)| (k, *v))
        .collect();
    // Largest first; equal times keep name order (the map is sorted), so output is stable.
    shown.sort_by(|a, b| b.1.total_cmp(&a.1));
    let omitted: Vec<&str> = parts
        .iter()
        .filter(|(_, v)| !(v.is_finite() && **v > 0.0))
        .map(|(k, _)| k.as_str())
        .collect();
    let bars: Vec<Bar> = shown
        .iter()
        .map(|(name, secs)| Bar {
            label: name.to_string(),
            value: *secs,
            text: format!(
                "{:.1}%  ({} s)",
                if total > 0.0 {
                    secs / total * 100.0
                } else {
                    0.0
                },
                format::short(*secs)
            ),
        })
        .collect();
    let height = SIZE.1.max(130 + 32 * bars.len() as u32);
    let mut caption = format!(
        "Simulated step time by cost-model part, summed over all {} steps ({} s in all); \
         labels give each part's share.",
        format::group(run.metrics.batch.steps),
        format::short(total)
    );
    if !omitted.is_empty() {
        caption.push_str(&format!(" Parts with no time: {}.", omitted.join(", ")));
    }
    Figure {
        name: "step_breakdown",
        heading: "Where step time goes".to_string(),
        caption,
        size: (SIZE.0, height),
        body: Body::Bars(BarChart {
            title: format!("Step time breakdown (total {} s)", format::short(total)),
            x_label: "step time (s)".to_string(),
            note: bars
                .is_empty()
                .then(|| "No step time breakdown recorded".to_string()),
            bars,
            color: color(0),
        }),
    }
}

pub(crate) fn adapter_ttft(run: &RunResult) -> Figure {
    let mut adapters: Vec<&AdapterMetrics> = run
        .metrics
        .per_adapter
        .iter()
        .filter(|a| a.completed > 0)
        .collect();
    adapters.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.adapter.cmp(&b.adapter)));
    let n = adapters.len();
    // Beyond MAX_POINTS adapters, keep the popular head whole and sample the tail evenly.
    let head = MAX_POINTS / 2;
    let stride = n.saturating_sub(head).div_ceil(MAX_POINTS - head).max(1);
    let kept: Vec<(f64, &AdapterMetrics)> = adapters
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < head || (i - head) % stride == 0 || *i == n - 1)
        .map(|(i, a)| ((i + 1) as f64, *a))
        .collect();
    let p99: Vec<(f64, f64)> = kept
        .iter()
        .filter(|(_, a)| a.ttft_p99_s.is_finite())
        .map(|(r, a)| (*r, a.ttft_p99_s))
        .collect();
    let p50: Vec<(f64, f64)> = kept
        .iter()
        .filter(|(_, a)| a.ttft_p50_s.is_finite())
        .map(|(r, a)| (*r, a.ttft_p50_s))
        .collect();
    let slo = run.metrics.slo.ttft_s.filter(|t| t.is_finite());
    let top = p99
        .iter()
        .chain(&p50)
        .map(|p| p.1)
        .chain(slo)
        .fold(0.0f64, f64::max);
    let log = n > 30;
    let x = if log {
        Axis::log(
            "adapter popularity rank (1 = most requests, log scale)",
            0.8,
            n as f64 * 1.25,
        )
    } else {
        Axis::linear(
            "adapter popularity rank (1 = most requests)",
            0.0,
            n as f64 + 1.0,
        )
    };
    // Fewer, smaller markers read better once hundreds of adapters crowd the axis.
    let (big, small) = if n > 200 { (3, 2) } else { (5, 3) };
    let mut p99_series = Series::new(
        Some("TTFT p99".into()),
        color(2),
        SeriesKind::Markers(Marker::Circle),
        p99,
    );
    p99_series.marker_px = big;
    // p50 is drawn after p99 so its smaller markers stay visible on top.
    let mut p50_series = Series::new(
        Some("TTFT p50".into()),
        color(0),
        SeriesKind::Markers(Marker::Circle),
        p50,
    );
    p50_series.marker_px = small;
    let mut series = vec![p99_series, p50_series];
    if let Some(t) = slo {
        series.push(Series::new(
            Some(format!("TTFT SLO {} s", format::short(t))),
            color(2),
            SeriesKind::Dashed,
            vec![(x.min, t), (x.max, t)],
        ));
    }
    let sampled = if n > kept.len() {
        format!(" The {head} most popular adapters are all shown; of the rest, every {stride}th.")
    } else {
        String::new()
    };
    Figure {
        name: "adapter_ttft",
        heading: "TTFT per adapter".to_string(),
        caption: format!(
            "Each adapter with completed requests ({} of {}) at its popularity rank (by \
             requests): its TTFT p99 and p50. Rare adapters paying for loads show up as a \
             rising tail on the right.{sampled}",
            format::group(n as u64),
            format::group(run.metrics.per_adapter.len() as u64)
        ),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: format!(
                "Per-adapter TTFT by popularity ({} adapters)",
                format::group(n as u64)
            ),
            x,
            y: Axis::linear("TTFT (s)", 0.0, if top > 0.0 { top * 1.3 } else { 1.0 }),
            series,
            annotations: Vec::<Annotation>::new(),
            legend: LegendAt::Auto,
            note: (n == 0).then(|| "No per-adapter metrics".to_string()),
        }),
    }
}
