//! How far a run's latency statistics could move from sampling alone: a 90% interval from a
//! circular block bootstrap over its completed requests in arrival order.
//!
//! A live run sees one sample of a scenario's arrivals, so a percentile it measures (and a
//! p99 over an adapter's 20-odd requests most of all) carries sampling error: another 60 s of
//! the same traffic would measure another value. `compare` reports, for each latency
//! statistic of the reference run, the interval a resampled run would put it in: how
//! precisely a run of this length measures it. A prediction inside it is within the
//! measurement's resolution. The simulation replays the same arrivals, so this is not a
//! test of the model's error: it says when a target is finer than the measurement.
//!
//! Requests of a queue are not independent: a burst delays its neighbours together. So the
//! run-level intervals resample blocks of `ceil(sqrt(n))` consecutive requests (wrapping at
//! the end), which keeps correlations shorter than a block; `compare` widens a percentile's
//! interval to the order-statistic one below where the bootstrap's extremes fall short. An adapter's p99 over a few dozen
//! requests is another matter: a bootstrap never goes past the sample's largest value, which
//! is where a p99 of 20 values sits, so it would call every prediction above it "outside".
//! Its interval is the distribution-free one of order statistics instead ([`quantile_interval`]:
//! exact for independent requests, which an adapter's, far apart in the run, nearly are); for
//! fewer than 298 values its upper end is unbounded, since the 99th percentile can lie above
//! every value seen with more than 5% probability. Either way the interval is a lower bound
//! on how much a second live run could differ (it cannot see a slower host, for one), not a
//! tolerance.
//!
//! Deterministic: the resampling generator has a fixed seed, so the same runs give the same
//! intervals. Cost: `RESAMPLES` resamples of `n` values and three partial sorts each.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use statrs::distribution::{Binomial, DiscreteCDF};
use statrs::statistics::{Data, OrderStatistics};

/// Resamples per interval: enough for the 5th and 95th percentiles to settle within a few
/// percent of the interval's width.
pub const RESAMPLES: usize = 400;
/// The generator's seed (any fixed value: it makes the intervals reproducible).
const SEED: u64 = 0x5107_a5ee_d000_0001;

/// A 90% interval. `hi` is `None` where nothing bounds it from above (a p99 of few values).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Interval {
    pub lo: f64,
    pub hi: Option<f64>,
}

impl Interval {
    pub fn contains(&self, v: f64) -> bool {
        self.lo <= v && self.hi.is_none_or(|hi| v <= hi)
    }
}

/// The distribution-free 90% interval of the `q`-quantile of independent `values`: order
/// statistics `X(l) ≤ X(u)` (1-based, sorted) with `P(B ≥ l) ≥ 95%` and `P(B < u) ≥ 95%` for
/// `B ~ Binomial(n, q)`, the number of values below the true quantile; `hi` is `None` when
/// no `u ≤ n` qualifies. `None` for fewer than two values, a non-finite one, or a `q` outside
/// (0, 1).
pub fn quantile_interval(values: &[f64], q: f64) -> Option<Interval> {
    let n = values.len();
    if n < 2 || !(q > 0.0 && q < 1.0) || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let below = Binomial::new(q, n as u64).ok()?;
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    // P(B >= l) = 1 - cdf(l - 1) falls as l grows: the largest l still at 95%, at least 1.
    let l = (1..=n)
        .take_while(|&l| 1.0 - below.cdf(l as u64 - 1) >= 0.95)
        .last()
        .unwrap_or(1);
    // P(B < u) = cdf(u - 1) rises with u: the smallest u at 95%.
    let u = (1..=n).find(|&u| below.cdf(u as u64 - 1) >= 0.95);
    Some(Interval {
        lo: sorted[l - 1],
        hi: u.map(|u| sorted[u - 1]),
    })
}

/// The statistics `compare` reports of one latency: mean and three percentiles, computed as
/// `slora_sim::metrics::summarize` does (statrs' quantile estimator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Mean,
    P50,
    P90,
    P99,
}

impl Stat {
    fn of(self, data: &mut Data<Vec<f64>>, values: &[f64]) -> f64 {
        match self {
            Stat::Mean => values.iter().sum::<f64>() / values.len() as f64,
            Stat::P50 => data.quantile(0.50),
            Stat::P90 => data.quantile(0.90),
            Stat::P99 => data.quantile(0.99),
        }
    }
}

/// 90% intervals of `stats` over `values` (in arrival order) under a circular block
/// bootstrap with blocks of `block` values (1: independent resampling). `None` for fewer
/// than two values, where there is nothing to resample.
pub fn bootstrap(values: &[f64], block: usize, stats: &[Stat]) -> Option<Vec<Interval>> {
    let n = values.len();
    if n < 2 || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let block = block.clamp(1, n);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut draws: Vec<Vec<f64>> = vec![Vec::with_capacity(RESAMPLES); stats.len()];
    let mut sample = Vec::with_capacity(n + block);
    for _ in 0..RESAMPLES {
        sample.clear();
        while sample.len() < n {
            let start = rng.random_range(0..n);
            sample.extend((0..block).map(|k| values[(start + k) % n]));
        }
        sample.truncate(n);
        let mut data = Data::new(sample.clone());
        for (stat, out) in stats.iter().zip(draws.iter_mut()) {
            out.push(stat.of(&mut data, &sample));
        }
    }
    Some(
        draws
            .into_iter()
            .map(|d| {
                let mut d = Data::new(d);
                Interval {
                    lo: d.quantile(0.05),
                    hi: Some(d.quantile(0.95)),
                }
            })
            .collect(),
    )
}

/// The block length the run-level intervals use for `n` requests.
pub fn run_block(n: usize) -> usize {
    (n as f64).sqrt().ceil().max(1.0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_holds_the_statistic_and_narrows_with_more_samples() {
        // Deterministic "exponential" latencies from a fixed sequence.
        let latencies = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| -((((i * 7919) % 1000) as f64 + 0.5) / 1000.0).ln())
                .collect()
        };
        let stats = [Stat::Mean, Stat::P50, Stat::P90, Stat::P99];
        let small = bootstrap(&latencies(200), 1, &stats).unwrap();
        let large = bootstrap(&latencies(5000), 1, &stats).unwrap();
        for (k, stat) in stats.iter().enumerate() {
            let values = latencies(5000);
            let mut data = Data::new(values.clone());
            let point = stat.of(&mut data, &values);
            assert!(
                large[k].contains(point),
                "{stat:?}: {point} not in {:?}",
                large[k]
            );
            assert!(small[k].lo <= small[k].hi.unwrap());
            // Twenty-five times the requests: about a fifth of the width, allow a third.
            let width = |i: &Interval| i.hi.unwrap() - i.lo;
            let (ws, wl) = (width(&small[k]), width(&large[k]));
            assert!(wl < ws / 3.0, "{stat:?}: {wl} vs {ws}");
        }
    }

    #[test]
    fn blocks_widen_the_interval_of_correlated_values() {
        // Slow bursts of 50 requests: neighbours share their latency.
        let values: Vec<f64> = (0..2000)
            .map(|i| {
                if (i / 50) % 7 == 0 {
                    5.0
                } else {
                    1.0 + (i % 13) as f64 * 0.01
                }
            })
            .collect();
        let iid = bootstrap(&values, 1, &[Stat::Mean]).unwrap()[0];
        let blocked = bootstrap(&values, run_block(values.len()), &[Stat::Mean]).unwrap()[0];
        let width = |i: &Interval| i.hi.unwrap() - i.lo;
        assert!(
            width(&blocked) > 1.5 * width(&iid),
            "{blocked:?} vs {iid:?}"
        );
    }

    #[test]
    fn same_input_same_interval_and_degenerate_inputs_have_none() {
        let values: Vec<f64> = (0..300).map(|i| (i % 17) as f64).collect();
        assert_eq!(
            bootstrap(&values, 5, &[Stat::P99]),
            bootstrap(&values, 5, &[Stat::P99])
        );
        assert_eq!(bootstrap(&[1.0], 1, &[Stat::P50]), None);
        assert_eq!(bootstrap(&[1.0, f64::NAN], 1, &[Stat::P50]), None);
        // A constant sample has a zero-width interval at its value.
        let flat = bootstrap(&[2.0; 50], 7, &[Stat::P90]).unwrap()[0];
        assert_eq!((flat.lo, flat.hi), (2.0, Some(2.0)));
        assert_eq!(run_block(1500), 39);
    }

    #[test]
    fn a_p99_of_few_values_is_bounded_below_only() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        let i = quantile_interval(&values, 0.99).unwrap();
        // 20 values: even the largest lies below the true p99 with probability
        // 1 - 0.99^20 > 5%, so nothing bounds it from above.
        assert_eq!(i.hi, None);
        // P(B >= 19) = 0.99^20 + 20 * 0.99^19 * 0.01 = 98.3% >= 95%; P(B >= 20) = 81.8% < 95%.
        assert_eq!(i.lo, 19.0);
        assert!(i.contains(1e9) && !i.contains(18.9));
        // Enough values and the upper end exists: P(B < 300) = 1 - 0.99^300 = 95.1%.
        let many: Vec<f64> = (1..=300).map(f64::from).collect();
        assert_eq!(quantile_interval(&many, 0.99).unwrap().hi, Some(300.0));
        let median = quantile_interval(&many, 0.5).unwrap();
        assert!(median.lo < 150.5 && 150.5 < median.hi.unwrap());
        assert_eq!(quantile_interval(&[1.0], 0.99), None);
        assert_eq!(quantile_interval(&values, 1.0), None);
    }
}
