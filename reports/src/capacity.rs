//! Reading a sweep as lines and a capacity curve.
//!
//! A sweep varies the adapter count and the offered rate, and possibly other parameters
//! (GPU, scheduler, …). Plotting "one line per adapter count" is only right when nothing else
//! varies, so the other parameters are detected: a parameter is *extra* when two points with
//! the same adapter count and rate disagree on it. Points are then grouped by the values of
//! the extra parameters, and each group gets its own lines and its own capacity curve.

use crate::files::parameter_text;
use slora_sim::metrics::{SweepPoint, SweepResult};
use std::collections::BTreeMap;

/// The capacity of one adapter count (within one group of the other swept parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct CapacityPoint {
    /// `key=value` of the swept parameters other than adapters and rate, `, `-joined; empty
    /// when only adapters and rate vary.
    pub group: String,
    pub adapters: u32,
    /// The highest offered rate (req/s) whose point met the SLO (`Metrics::meets_slo`);
    /// `None` when no tested rate did.
    pub max_rate_meeting_slo: Option<f64>,
    /// The highest offered rate tested for this adapter count.
    pub highest_rate_tested: f64,
    pub rates_tested: usize,
}

impl CapacityPoint {
    /// The highest rate tested met the SLO, so the true capacity may be higher.
    pub fn is_lower_bound(&self) -> bool {
        self.max_rate_meeting_slo == Some(self.highest_rate_tested)
    }
}

/// One line of a rate chart: the points of one adapter count within one group, by rate.
pub(crate) struct RateLine<'a> {
    pub group: String,
    pub adapters: u32,
    pub points: Vec<&'a SweepPoint>,
}

impl RateLine<'_> {
    pub fn label(&self) -> String {
        let count = if self.adapters == 1 {
            "1 adapter".to_string()
        } else {
            format!("{} adapters", crate::format::group(self.adapters as u64))
        };
        if self.group.is_empty() {
            count
        } else {
            format!("{count}, {}", self.group)
        }
    }
}

/// Swept parameters that vary independently of (adapters, rate), sorted.
pub(crate) fn extra_keys(sweep: &SweepResult) -> Vec<String> {
    let mut by_cell: BTreeMap<(u32, u64), Vec<&SweepPoint>> = BTreeMap::new();
    for p in &sweep.points {
        by_cell
            .entry((p.adapters, p.offered_rate.to_bits()))
            .or_default()
            .push(p);
    }
    let mut keys: Vec<String> = Vec::new();
    for points in by_cell.values() {
        let Some(first) = points.first() else {
            continue;
        };
        for other in &points[1..] {
            for key in first.parameters.keys().chain(other.parameters.keys()) {
                if first.parameters.get(key) != other.parameters.get(key) && !keys.contains(key) {
                    keys.push(key.clone());
                }
            }
        }
    }
    keys.sort();
    keys
}

fn group_of(point: &SweepPoint, extra: &[String]) -> String {
    extra
        .iter()
        .map(|k| {
            let v = point
                .parameters
                .get(k)
                .map(parameter_text)
                .unwrap_or_else(|| "-".to_string());
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per (group, adapter count), sorted by group then adapters; points by rate.
pub(crate) fn rate_lines(sweep: &SweepResult) -> Vec<RateLine<'_>> {
    let extra = extra_keys(sweep);
    let mut lines: BTreeMap<(String, u32), Vec<&SweepPoint>> = BTreeMap::new();
    for p in &sweep.points {
        lines
            .entry((group_of(p, &extra), p.adapters))
            .or_default()
            .push(p);
    }
    lines
        .into_iter()
        .map(|((group, adapters), mut points)| {
            // Stable sort: equal rates keep sweep order.
            points.sort_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
            RateLine {
                group,
                adapters,
                points,
            }
        })
        .collect()
}

/// For each adapter count (and group of other swept parameters), the highest offered rate
/// whose point meets the SLO. Sorted by group, then adapter count.
pub fn capacity(sweep: &SweepResult) -> Vec<CapacityPoint> {
    rate_lines(sweep)
        .into_iter()
        .map(|line| {
            let rates = line.points.iter().map(|p| p.offered_rate);
            CapacityPoint {
                max_rate_meeting_slo: line
                    .points
                    .iter()
                    .filter(|p| p.metrics.meets_slo)
                    .map(|p| p.offered_rate)
                    .max_by(f64::total_cmp),
                highest_rate_tested: rates.clone().max_by(f64::total_cmp).unwrap_or(0.0),
                rates_tested: line.points.len(),
                group: line.group,
                adapters: line.adapters,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn point(adapters: u32, rate: f64, meets: bool, gpu: &str) -> SweepPoint {
        let mut p = SweepPoint {
            adapters,
            offered_rate: rate,
            ..SweepPoint::default()
        };
        p.parameters
            .insert("adapters.count".into(), json!(adapters));
        p.parameters.insert("workload.rate".into(), json!(rate));
        p.parameters.insert("gpu".into(), json!(gpu));
        p.metrics.meets_slo = meets;
        p
    }

    #[test]
    fn capacity_is_the_highest_rate_meeting_the_slo() {
        let sweep = SweepResult {
            scenario: "s".into(),
            points: vec![
                point(8, 2.0, true, "a"),
                point(8, 1.0, true, "a"),
                point(8, 4.0, false, "a"),
                point(64, 1.0, false, "a"),
                point(64, 2.0, false, "a"),
            ],
        };
        assert!(extra_keys(&sweep).is_empty());
        let cap = capacity(&sweep);
        assert_eq!(cap.len(), 2);
        assert_eq!(cap[0].adapters, 8);
        assert_eq!(cap[0].max_rate_meeting_slo, Some(2.0));
        assert_eq!(cap[0].highest_rate_tested, 4.0);
        assert!(!cap[0].is_lower_bound());
        assert_eq!(cap[1].max_rate_meeting_slo, None);
    }

    #[test]
    fn other_varying_parameters_split_the_lines() {
        let sweep = SweepResult {
            scenario: "s".into(),
            points: vec![
                point(8, 1.0, true, "a100"),
                point(8, 1.0, true, "h100"),
                point(8, 2.0, false, "a100"),
                point(8, 2.0, true, "h100"),
            ],
        };
        assert_eq!(extra_keys(&sweep), vec!["gpu".to_string()]);
        let cap = capacity(&sweep);
        assert_eq!(cap.len(), 2);
        assert_eq!(cap[0].group, "gpu=a100");
        assert_eq!(cap[0].max_rate_meeting_slo, Some(1.0));
        assert_eq!(cap[1].group, "gpu=h100");
        assert!(cap[1].is_lower_bound());
        assert_eq!(rate_lines(&sweep)[1].label(), "8 adapters, gpu=h100");
    }
}
