//! The charts of a sweep: achieved throughput and SLO attainment against offered rate (one
//! line per adapter count), and the capacity curve.

use super::{
    color, Annotation, Axis, Body, Figure, LegendAt, LineChart, Marker, Series, SeriesKind, GREY,
    SIZE,
};
use crate::capacity::{capacity, rate_lines, CapacityPoint, RateLine};
use crate::format;
use slora_sim::metrics::SweepResult;

pub(crate) fn figures(sweep: &SweepResult) -> Vec<Figure> {
    let lines = rate_lines(sweep);
    vec![
        throughput_vs_rate(&lines),
        attainment_vs_rate(&lines),
        capacity_chart(sweep, &capacity(sweep)),
    ]
}

fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.filter(|v| v.is_finite()).fold(0.0f64, f64::max)
}

fn no_points(lines: &[RateLine<'_>]) -> Option<String> {
    lines.is_empty().then(|| "No sweep points".to_string())
}

fn throughput_vs_rate(lines: &[RateLine<'_>]) -> Figure {
    let max_rate = max_of(
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.offered_rate)),
    );
    let max_thr = max_of(
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.metrics.throughput.requests_per_s)),
    );
    let mut series = vec![Series::new(
        Some("achieved = offered".into()),
        GREY,
        SeriesKind::Dashed,
        vec![(0.0, 0.0), (max_rate * 1.08, max_rate * 1.08)],
    )];
    for (i, line) in lines.iter().enumerate() {
        series.push(Series::new(
            Some(line.label()),
            color(i),
            SeriesKind::LineMarkers(Marker::Circle),
            line.points
                .iter()
                .map(|p| (p.offered_rate, p.metrics.throughput.requests_per_s))
                .collect(),
        ));
    }
    Figure {
        name: "throughput_vs_rate",
        heading: "Throughput against offered load".to_string(),
        caption: "Completed requests per second against the offered arrival rate, one line \
                  per adapter count. Points on the dashed diagonal keep up with the load; \
                  where a line bends below it the system saturates."
            .to_string(),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: "Achieved throughput vs offered rate".to_string(),
            x: Axis::linear("offered rate (req/s)", 0.0, max_rate * 1.08),
            y: Axis::linear(
                "achieved throughput (req/s)",
                0.0,
                max_thr.max(max_rate) * 1.12,
            ),
            series,
            annotations: Vec::new(),
            legend: LegendAt::Auto,
            note: no_points(lines),
        }),
    }
}

fn attainment_vs_rate(lines: &[RateLine<'_>]) -> Figure {
    let max_rate = max_of(
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.offered_rate)),
    );
    let mut targets: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.metrics.slo.attainment_target))
        .filter(|t| t.is_finite() && *t > 0.0)
        .collect();
    targets.sort_by(f64::total_cmp);
    targets.dedup();
    let mut series: Vec<Series> = targets
        .iter()
        .map(|t| {
            Series::new(
                Some(format!("target {}", format::percent_short(*t))),
                GREY,
                SeriesKind::Dashed,
                vec![(0.0, *t), (max_rate * 1.08, *t)],
            )
        })
        .collect();
    for (i, line) in lines.iter().enumerate() {
        series.push(Series::new(
            Some(line.label()),
            color(i),
            SeriesKind::LineMarkers(Marker::Circle),
            line.points
                .iter()
                .map(|p| (p.offered_rate, p.metrics.slo_attainment))
                .collect(),
        ));
    }
    Figure {
        name: "attainment_vs_rate",
        heading: "SLO attainment against offered load".to_string(),
        caption: "Share of submitted requests that completed within every SLO, against the \
                  offered rate, one line per adapter count. The dashed line is the attainment \
                  target; a point meets the SLO when its line is on or above it."
            .to_string(),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: "SLO attainment vs offered rate".to_string(),
            x: Axis::linear("offered rate (req/s)", 0.0, max_rate * 1.08),
            y: Axis::linear("SLO attainment (% of requests)", 0.0, 1.05).percent(),
            series,
            annotations: Vec::new(),
            legend: LegendAt::Auto,
            note: no_points(lines),
        }),
    }
}

fn capacity_chart(sweep: &SweepResult, cap: &[CapacityPoint]) -> Figure {
    let counts = cap.iter().map(|c| c.adapters as f64);
    let min_count = counts.clone().fold(f64::INFINITY, f64::min);
    let max_count = max_of(counts);
    let log = min_count > 0.0 && max_count / min_count > 10.0;
    let mut x = if log {
        Axis::log("adapters (log scale)", min_count / 1.6, max_count * 1.6)
    } else if min_count == max_count {
        // One count: centre it rather than pin it to the right edge.
        Axis::linear("adapters", 0.0, max_count * 2.0)
    } else {
        Axis::linear("adapters", 0.0, max_count * 1.12)
    };
    // Label the counts actually swept when there are few: they are what the reader looks up.
    let mut swept: Vec<f64> = cap.iter().map(|c| c.adapters as f64).collect();
    swept.sort_by(f64::total_cmp);
    swept.dedup();
    if (1..=12).contains(&swept.len()) {
        x = x.with_ticks(swept);
    }
    let max_rate = max_of(sweep.points.iter().map(|p| p.offered_rate));

    let mut groups: Vec<&str> = cap.iter().map(|c| c.group.as_str()).collect();
    groups.dedup();
    let mut series = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let met: Vec<(f64, f64)> = cap
            .iter()
            .filter(|c| c.group == *group)
            .filter_map(|c| c.max_rate_meeting_slo.map(|r| (c.adapters as f64, r)))
            .collect();
        let label = if group.is_empty() {
            "highest rate meeting the SLO".to_string()
        } else {
            group.to_string()
        };
        series.push(Series::new(
            Some(label),
            color(i),
            SeriesKind::LineMarkers(Marker::Circle),
            met,
        ));
    }
    let bounded: Vec<(f64, f64)> = cap
        .iter()
        .filter(|c| c.is_lower_bound())
        .filter_map(|c| c.max_rate_meeting_slo.map(|r| (c.adapters as f64, r)))
        .collect();
    if !bounded.is_empty() {
        let mut s = Series::new(
            Some("highest tested rate met it: capacity ≥ value".into()),
            GREY,
            SeriesKind::Markers(Marker::Triangle),
            bounded,
        );
        // Lift the triangle above the circle it qualifies so both stay visible.
        s.lift_px = 13;
        series.push(s);
    }
    let unmet: Vec<(f64, f64)> = cap
        .iter()
        .filter(|c| c.max_rate_meeting_slo.is_none())
        .map(|c| (c.adapters as f64, 0.0))
        .collect();
    if !unmet.is_empty() {
        let mut s = Series::new(
            Some("no tested rate met the SLO".into()),
            color(2),
            SeriesKind::Markers(Marker::Cross),
            unmet,
        );
        // Lift the cross off the x axis so it is not half hidden by it.
        s.lift_px = 10;
        series.push(s);
    }
    // Value labels help read exact capacities; past a dozen points they would collide.
    let annotations = if cap.len() <= 12 {
        cap.iter()
            .filter_map(|c| {
                c.max_rate_meeting_slo.map(|r| {
                    let (text, lift_px) = if c.is_lower_bound() {
                        // Above the triangle that marks it.
                        (format!("≥ {}", format::short(r)), 30)
                    } else {
                        (format::short(r), 10)
                    };
                    Annotation {
                        at: (c.adapters as f64, r),
                        text,
                        lift_px,
                    }
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let slo = sweep.points.first().map(|p| &p.metrics.slo);
    let slo_text = slo.map(crate::tables::slo_sentence).unwrap_or_default();
    Figure {
        name: "capacity",
        heading: "Capacity".to_string(),
        caption: format!(
            "For each adapter count, the highest offered rate whose run met the SLO{}. A \
             triangle marks counts where even the highest rate tested met it (the capacity is \
             at least that); a cross marks counts where no tested rate met it.",
            if slo_text.is_empty() {
                String::new()
            } else {
                format!(" ({slo_text})")
            }
        ),
        size: SIZE,
        body: Body::Lines(LineChart {
            title: "Capacity: highest rate meeting the SLO vs adapters".to_string(),
            x,
            y: Axis::linear(
                "max offered rate meeting SLO (req/s)",
                0.0,
                if max_rate > 0.0 { max_rate * 1.3 } else { 1.0 },
            ),
            series,
            annotations,
            legend: LegendAt::Auto,
            note: cap.is_empty().then(|| "No sweep points".to_string()),
        }),
    }
}
