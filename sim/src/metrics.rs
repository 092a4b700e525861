//! Per-request and per-step records of a run, and the aggregates reported from them.
//!
//! INTERFACE (fixed): the record and result types below are what `slora-reports` reads.
//! Definitions (stated in every report):
//! - TTFT: first token time − arrival.
//! - TPOT = (E2E − TTFT) / (output tokens − 1), vLLM's definition (GenAI-Perf calls it ITL);
//!   requests with one output token have no TPOT.
//! - ITL: gaps between consecutive tokens of a request, over all tokens.
//! - E2E: finish − arrival. Queueing delay: first admission − arrival.
//! - Throughput window: from the first arrival to the last completion (or abort) of the run.

use crate::cost::Provenance;
use serde::{Deserialize, Serialize};
use slora_engine::Nanos;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Completed,
    Aborted,
    Rejected,
}

/// One request's life. Times are simulated (or wall) time since the start of the run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: u64,
    pub adapter: Option<u32>,
    pub tenant: Option<u32>,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub arrival: Nanos,
    /// When it was first admitted (its first prefill step started).
    pub admitted: Option<Nanos>,
    pub first_token: Option<Nanos>,
    pub finish: Option<Nanos>,
    pub status: RequestStatus,
    pub preemptions: u32,
}

impl RequestRecord {
    pub fn ttft(&self) -> Option<Nanos> {
        self.first_token.map(|t| t - self.arrival)
    }
    pub fn e2e(&self) -> Option<Nanos> {
        match self.status {
            RequestStatus::Completed => self.finish.map(|t| t - self.arrival),
            _ => None,
        }
    }
    /// vLLM's TPOT; `None` for one-token outputs and unfinished requests.
    pub fn tpot(&self) -> Option<f64> {
        let (e2e, ttft) = (self.e2e()?, self.ttft()?);
        (self.output_tokens > 1)
            .then(|| (e2e - ttft).as_secs_f64() / (self.output_tokens - 1) as f64)
    }
    pub fn queueing(&self) -> Option<Nanos> {
        self.admitted.map(|t| t - self.arrival)
    }
}

/// One step (compact: a long run has millions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub start: Nanos,
    pub duration: Nanos,
    pub prefill_requests: u32,
    pub prefill_tokens: u32,
    pub decode_requests: u32,
    pub distinct_adapters: u32,
    pub kv_pages: u32,
    pub adapter_pages: u32,
    pub free_pages: u32,
    pub waiting: u32,
    pub loads: u32,
    pub evictions: u32,
    pub aborted: u32,
    pub preempted: u32,
    /// The run's cost model's time for this exact step. In a simulation it is the step's
    /// duration; in an executed run it is the prediction the measured `duration` is checked
    /// against, step by step (`steps.csv`'s `model_s`).
    pub model: Nanos,
}

/// Mean and percentiles of a latency, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub window_s: f64,
    pub offered_requests_per_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    /// Completed requests per second that met every SLO.
    pub goodput_requests_per_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub submitted: u64,
    pub completed: u64,
    pub aborted: u64,
    pub rejected: u64,
    pub preemptions: u64,
}

/// The SLOs a run is judged against (seconds; `None` = not constrained).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SloTargets {
    pub ttft_s: Option<f64>,
    pub tpot_s: Option<f64>,
    pub e2e_s: Option<f64>,
    /// Fraction of submitted requests that must meet every SLO.
    pub attainment_target: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterMetrics {
    pub adapter: u32,
    pub rank: u32,
    pub requests: u64,
    pub completed: u64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub loads: u32,
    pub evictions: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolMetrics {
    pub capacity_pages: u32,
    pub page_bytes: u64,
    /// Time-weighted means over the run.
    pub mean_kv_pages: f64,
    pub mean_adapter_pages: f64,
    pub mean_free_pages: f64,
    pub peak_kv_pages: u32,
    pub peak_adapter_pages: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchMetrics {
    pub steps: u64,
    /// Time-weighted means over steps that compute.
    pub mean_batch_size: f64,
    pub max_batch_size: u32,
    pub mean_distinct_adapters: f64,
    pub max_distinct_adapters: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterTraffic {
    pub loads: u64,
    pub evictions: u64,
    pub h2d_bytes: u64,
}

/// Everything `metrics.json` holds. Field order is the file's key order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub scenario: String,
    pub provenance: Option<Provenance>,
    pub cost_model: String,
    pub seed: u64,
    pub throughput: Throughput,
    pub requests: RequestCounts,
    pub ttft_s: Summary,
    pub tpot_s: Summary,
    pub itl_s: Summary,
    pub e2e_s: Summary,
    pub queueing_s: Summary,
    pub slo: SloTargets,
    /// Fraction of submitted requests that completed within every SLO.
    pub slo_attainment: f64,
    pub meets_slo: bool,
    pub batch: BatchMetrics,
    pub pool: PoolMetrics,
    pub adapter_traffic: AdapterTraffic,
    /// Seconds of simulated step time by part (see `StepCost::PARTS`).
    pub step_time_breakdown_s: BTreeMap<String, f64>,
    pub per_adapter: Vec<AdapterMetrics>,
    /// The definitions above, stated in the file itself.
    pub definitions: BTreeMap<String, String>,
}

/// A whole run: what the reports draw.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub metrics: Metrics,
    pub requests: Vec<RequestRecord>,
    pub steps: Vec<StepRecord>,
}

/// One point of a sweep: the values it set, and the run's metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// `dotted.path -> value` for each swept field.
    pub parameters: BTreeMap<String, serde_json::Value>,
    pub adapters: u32,
    pub offered_rate: f64,
    pub metrics: Metrics,
}

/// A swept scenario.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    pub scenario: String,
    pub points: Vec<SweepPoint>,
}

/// Percentiles of `values` (seconds). statrs's quantile estimator (R type 8, median-unbiased);
/// all zeros when empty.
pub fn summarize(values: Vec<f64>) -> Summary {
    use statrs::statistics::{Data, OrderStatistics};
    if values.is_empty() {
        return Summary::default();
    }
    let count = values.len() as u64;
    let mean = values.iter().sum::<f64>() / count as f64;
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let mut data = Data::new(values);
    Summary {
        count,
        mean,
        p50: data.quantile(0.50),
        p90: data.quantile(0.90),
        p95: data.quantile(0.95),
        p99: data.quantile(0.99),
        max,
    }
}

/// A log-linear histogram of nanosecond values (HDR-style): 64 sub-buckets per power of two,
/// so a bucket spans at most 1/64 ≈ 1.6% of its value. ITLs number one per token (hundreds
/// of millions in a long run), so they are counted, not stored; a bucket index is two integer
/// instructions, no logarithm. The mean is exact.
#[derive(Clone, Debug)]
pub struct LogHistogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Default for LogHistogram {
    fn default() -> Self {
        LogHistogram {
            counts: vec![0; (64 * SUB) as usize],
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl LogHistogram {
    /// Values below `SUB` get a bucket each; above, bucket = (octave, top `SUB_BITS` bits
    /// after the leading one).
    fn bucket(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let octave = 63 - ns.leading_zeros(); // >= SUB_BITS
        let shift = octave - SUB_BITS;
        let sub = (ns >> shift) & (SUB - 1);
        ((octave - SUB_BITS + 1) as u64 * SUB + sub) as usize
    }

    /// Lowest value of a bucket, and its width.
    fn bounds(bucket: usize) -> (u64, u64) {
        let b = bucket as u64;
        if b < SUB {
            return (b, 1);
        }
        let octave = b / SUB - 1 + SUB_BITS as u64;
        let sub = b % SUB;
        let shift = octave - SUB_BITS as u64;
        ((SUB + sub) << shift, 1 << shift)
    }

    pub fn record(&mut self, value: Nanos) {
        self.counts[Self::bucket(value.0)] += 1;
        self.total += 1;
        self.sum_ns += value.0 as u128;
        self.max_ns = self.max_ns.max(value.0);
    }

    /// The value at quantile `q` (seconds): the middle of the bucket holding it.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = Self::bounds(i);
                let mid = (lo + width / 2).min(self.max_ns);
                return mid as f64 / 1e9;
            }
        }
        self.max_ns as f64 / 1e9
    }

    pub fn summary(&self) -> Summary {
        Summary {
            count: self.total,
            mean: if self.total == 0 {
                0.0
            } else {
                self.sum_ns as f64 / self.total as f64 / 1e9
            },
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p95: self.quantile(0.95),
            p99: self.quantile(0.99),
            max: self.max_ns as f64 / 1e9,
        }
    }
}

/// The metric definitions every report states.
pub fn definitions() -> BTreeMap<String, String> {
    [
        ("ttft", "time to first token: first token available - arrival"),
        ("tpot", "time per output token, vLLM's definition: (E2E - TTFT) / (output tokens - 1); requests with one output token have none"),
        ("itl", "inter-token latency: every gap between consecutive tokens of a request (log-linear histogram, buckets at most 1.6% wide)"),
        ("e2e", "end to end: last token available - arrival"),
        ("queueing", "first admission to the running batch - arrival"),
        ("throughput_window", "from the first arrival to the last completion or abort; rates are completed requests (or their tokens) over that window"),
        ("slo_attainment", "fraction of submitted requests that completed within every SLO set (aborted and rejected requests miss)"),
        ("goodput", "completed requests within every SLO, per second of the window"),
        ("percentiles", "statrs quantiles (R type 8) over completed requests"),
        ("step_time_means", "batch size, distinct adapters and pool occupancy are means weighted by step duration"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_narrow() {
        let mut prev_end = 0;
        for b in 0..(40 * SUB as usize) {
            let (lo, w) = LogHistogram::bounds(b);
            assert_eq!(lo, prev_end, "bucket {b}");
            assert_eq!(LogHistogram::bucket(lo), b);
            assert_eq!(LogHistogram::bucket(lo + w - 1), b);
            assert!(lo < SUB || (w as f64) / (lo as f64) <= 1.0 / SUB as f64 + 1e-12);
            prev_end = lo + w;
        }
    }

    #[test]
    fn histogram_quantiles_are_within_two_percent() {
        let mut h = LogHistogram::default();
        let values: Vec<u64> = (1..=100_000u64).map(|i| i * 997).collect();
        for &v in &values {
            h.record(Nanos(v));
        }
        let s = h.summary();
        for (q, got) in [(0.5, s.p50), (0.9, s.p90), (0.99, s.p99)] {
            let exact = values[(q * values.len() as f64) as usize - 1] as f64 / 1e9;
            assert!((got - exact).abs() / exact < 0.02, "q{q}: {got} vs {exact}");
        }
        let mean = values.iter().sum::<u64>() as f64 / values.len() as f64 / 1e9;
        assert!((s.mean - mean).abs() < 1e-12);
    }

    #[test]
    fn summaries_of_known_data() {
        let s = summarize((1..=101).map(|x| x as f64).collect());
        assert_eq!(s.count, 101);
        assert_eq!(s.p50, 51.0);
        assert_eq!(s.mean, 51.0);
        assert_eq!(s.max, 101.0);
        assert_eq!(summarize(vec![]), Summary::default());
    }
}
