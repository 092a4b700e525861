//! Reducing millions of records to the few thousand points a chart can show.
//!
//! A 1000-pixel-wide chart cannot show more than about a thousand distinct x positions, and
//! plotting a million points makes SVGs of tens of megabytes. Both reductions here are
//! O(n) after at most one sort, and keep what a reader looks for: a CDF keeps its exact
//! endpoints and evenly spaced quantiles; a time series keeps, per time bin, the
//! duration-weighted mean (what `Metrics` reports) and the maximum (so spikes stay visible).

use slora_sim::metrics::StepRecord;

/// Most points drawn per series.
pub(crate) const MAX_POINTS: usize = 2_000;

/// The empirical CDF of `values` as `(value, fraction ≤ value)` pairs, at most `max_points`.
/// Sorts `values` in place. NaNs are dropped (they have no place on a latency axis).
pub(crate) fn cdf_points(values: &mut Vec<f64>, max_points: usize) -> Vec<(f64, f64)> {
    values.retain(|v| !v.is_nan());
    values.sort_unstable_by(f64::total_cmp);
    let n = values.len();
    if n == 0 || max_points == 0 {
        return Vec::new();
    }
    let take = n.min(max_points.max(2));
    let mut points = Vec::with_capacity(take);
    let mut last = usize::MAX;
    for k in 0..take {
        // Evenly spaced ranks from the first to the last value (both always kept).
        let idx = if take == 1 {
            n - 1
        } else {
            ((k as u128 * (n - 1) as u128) / (take - 1) as u128) as usize
        };
        if idx != last {
            points.push((values[idx], (idx + 1) as f64 / n as f64));
            last = idx;
        }
    }
    points
}

/// The staircase through ECDF points: each value rises from the previous fraction (from zero
/// at the first), so a small sample is drawn as the step function it is rather than as
/// slopes between samples.
pub(crate) fn cdf_steps(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    let mut below = 0.0;
    for &(x, y) in points {
        out.push((x, below));
        out.push((x, y));
        below = y;
    }
    out
}

/// A time bin's summary of one quantity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BinValue {
    pub mean: f64,
    pub max: f64,
}

/// One time bin: its centre in seconds and `N` summarised quantities.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Bin<const N: usize> {
    pub t_s: f64,
    pub values: [BinValue; N],
}

/// Splits the span of `steps` into at most `max_bins` equal time bins and summarises
/// `quantities(step)` in each: mean weighted by step duration (steps of zero duration weigh
/// one nanosecond, so an all-instant bin is a plain mean) and maximum. Bins without a step are
/// left out: the line joins across them. Steps need not be sorted. O(steps + bins).
pub(crate) fn time_bins<const N: usize>(
    steps: &[StepRecord],
    max_bins: usize,
    quantities: impl Fn(&StepRecord) -> [f64; N],
) -> Vec<Bin<N>> {
    let Some(first) = steps.iter().map(|s| s.start.0).min() else {
        return Vec::new();
    };
    let last = steps
        .iter()
        .map(|s| s.start.0.saturating_add(s.duration.0))
        .max()
        .unwrap_or(first);
    let span = last.saturating_sub(first).max(1);
    let bins = max_bins.max(1) as u64;
    // Ceiling division keeps the bin count at or under `bins`; a step starting exactly at
    // `last` (zero duration) joins the final bin.
    let width = span.div_ceil(bins).max(1);
    let used = (span / width + 1).min(bins) as usize;

    let mut weight = vec![0.0f64; used];
    let mut sums = vec![[0.0f64; N]; used];
    let mut maxes = vec![[f64::NEG_INFINITY; N]; used];
    for s in steps {
        let b = ((s.start.0 - first) / width) as usize;
        let b = b.min(used - 1);
        let w = s.duration.0.max(1) as f64;
        let q = quantities(s);
        weight[b] += w;
        for i in 0..N {
            sums[b][i] += q[i] * w;
            maxes[b][i] = maxes[b][i].max(q[i]);
        }
    }
    let mut out = Vec::new();
    for b in 0..used {
        if weight[b] == 0.0 {
            continue;
        }
        let t = first as f64 + (b as f64 + 0.5) * width as f64;
        let values = std::array::from_fn(|i| BinValue {
            mean: sums[b][i] / weight[b],
            max: maxes[b][i],
        });
        out.push(Bin {
            t_s: t / 1e9,
            values,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use slora_engine::Nanos;

    #[test]
    fn cdf_of_a_million_points_is_capped_and_keeps_the_ends() {
        let mut values: Vec<f64> = (0..1_000_000).rev().map(|i| i as f64).collect();
        let points = cdf_points(&mut values, MAX_POINTS);
        assert!(points.len() <= MAX_POINTS);
        assert_eq!(points[0], (0.0, 1e-6));
        assert_eq!(points[points.len() - 1], (999_999.0, 1.0));
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn steps_rise_at_each_value() {
        assert_eq!(
            cdf_steps(&[(1.0, 0.5), (2.0, 1.0)]),
            vec![(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (2.0, 1.0)]
        );
    }

    #[test]
    fn small_cdfs_keep_every_point() {
        let mut values = vec![3.0, 1.0, f64::NAN, 2.0];
        assert_eq!(
            cdf_points(&mut values, MAX_POINTS),
            vec![(1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]
        );
        assert!(cdf_points(&mut Vec::new(), MAX_POINTS).is_empty());
    }

    fn step(start_ms: u64, dur_ms: u64, batch: u32) -> StepRecord {
        StepRecord {
            start: Nanos::from_millis(start_ms),
            duration: Nanos::from_millis(dur_ms),
            decode_requests: batch,
            ..StepRecord::default()
        }
    }

    #[test]
    fn a_million_steps_become_at_most_max_bins() {
        let steps: Vec<StepRecord> = (0..1_000_000u64).map(|i| step(i * 20, 20, 8)).collect();
        let bins = time_bins(&steps, MAX_POINTS, |s| [s.decode_requests as f64]);
        assert!(bins.len() <= MAX_POINTS && bins.len() > MAX_POINTS / 2);
        assert!(bins.iter().all(|b| b.values[0].mean == 8.0));
    }

    #[test]
    fn bins_weigh_by_duration_and_keep_the_max() {
        let steps = [step(0, 30, 1), step(30, 10, 5)];
        let bins = time_bins(&steps, 1, |s| [s.decode_requests as f64]);
        assert_eq!(bins.len(), 1);
        assert_eq!(bins[0].values[0].mean, 2.0);
        assert_eq!(bins[0].values[0].max, 5.0);
        assert!(time_bins(&[], 10, |s: &StepRecord| [s.waiting as f64]).is_empty());
    }
}
