//! Deterministic synthetic runs and sweeps for the report tests (and the `demo` example).
//! Plain arithmetic instead of an RNG: the shapes only need to be plausible, and the same
//! call must always give the same result.

#![allow(dead_code)]

use serde_json::json;
use slora_engine::Nanos;
use slora_sim::cost::Provenance;
use slora_sim::metrics::{
    AdapterMetrics, AdapterTraffic, BatchMetrics, Metrics, PoolMetrics, RequestCounts,
    RequestRecord, RequestStatus, RunResult, SloTargets, StepRecord, Summary, SweepPoint,
    SweepResult, Throughput,
};
use std::collections::BTreeMap;

/// A number in [0, 1) from an integer, well spread (golden-ratio sequence, squared hash).
fn spread(i: u64, salt: u64) -> f64 {
    let x = (i
        .wrapping_mul(2_654_435_761)
        .wrapping_add(salt.wrapping_mul(40_503)))
        % 1_000_003;
    x as f64 / 1_000_003.0
}

fn secs(s: f64) -> Nanos {
    Nanos::from_secs_f64(s)
}

fn summary(mut v: Vec<f64>) -> Summary {
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Summary {
        count: v.len() as u64,
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: q(0.5),
        p90: q(0.9),
        p95: q(0.95),
        p99: q(0.99),
        max: v[v.len() - 1],
    }
}

/// `requests` requests over `adapters` adapters (skewed popularity), `steps` steps.
pub fn run(requests: u64, steps: u64, adapters: u32) -> RunResult {
    let mut records = Vec::with_capacity(requests as usize);
    for i in 0..requests {
        let u = spread(i, 1);
        // Squaring skews towards low ids: adapter 0 is the most popular.
        let adapter = ((u * u) * adapters as f64) as u32;
        let arrival = i as f64 * 0.05 + spread(i, 2) * 0.04;
        let prompt = 64 + (spread(i, 3) * 900.0) as u32;
        let output = 1 + (spread(i, 4) * 300.0) as u32;
        let queue = spread(i, 5).powi(4) * 2.0;
        let admitted = arrival + queue;
        // Rare adapters pay for a load.
        let load = if adapter > adapters / 2 { 0.15 } else { 0.0 };
        let first = admitted + 0.02 + prompt as f64 * 0.00005 + load;
        let finish = first + (output.saturating_sub(1)) as f64 * (0.02 + spread(i, 6) * 0.015);
        let (status, admitted, first_token, finish) = if i % 41 == 7 {
            (RequestStatus::Rejected, None, None, None)
        } else if i % 23 == 5 {
            (
                RequestStatus::Aborted,
                None,
                None,
                Some(secs(arrival + 0.5)),
            )
        } else {
            (
                RequestStatus::Completed,
                Some(secs(admitted)),
                Some(secs(first)),
                Some(secs(finish)),
            )
        };
        records.push(RequestRecord {
            id: i,
            adapter: Some(adapter),
            tenant: (i % 3 != 0).then_some((i % 5) as u32),
            prompt_tokens: prompt,
            output_tokens: output,
            arrival: secs(arrival),
            admitted,
            first_token,
            finish,
            status,
            preemptions: (i % 97 == 0) as u32,
        });
    }

    let capacity = 6_000u32;
    let mut step_records = Vec::with_capacity(steps as usize);
    let mut t = 0u64;
    for k in 0..steps {
        let wave = ((k as f64 / steps.max(1) as f64) * std::f64::consts::PI * 3.0).sin();
        let kv = (2_000.0 + 1_500.0 * wave + spread(k, 7) * 600.0) as u32;
        let adapter_pages = 400 + (spread(k, 8) * 500.0) as u32;
        let decode = (24.0 + 15.0 * wave + spread(k, 9) * 8.0) as u32;
        let duration = 12_000_000 + (spread(k, 10) * 8_000_000.0) as u64;
        step_records.push(StepRecord {
            start: Nanos(t),
            duration: Nanos(duration),
            prefill_requests: (k % 3 == 0) as u32 * (1 + (k % 4) as u32),
            prefill_tokens: (k % 3 == 0) as u32 * 512,
            decode_requests: decode,
            distinct_adapters: 1
                + ((0.5 + 0.4 * wave + spread(k, 11) * 0.2) * (adapters.min(16) as f64)) as u32,
            kv_pages: kv,
            adapter_pages,
            free_pages: capacity - kv - adapter_pages,
            waiting: (spread(k, 12) * 30.0) as u32,
            loads: (k % 50 == 0) as u32,
            evictions: (k % 70 == 0) as u32,
            aborted: 0,
            preempted: 0,
            model: Nanos(duration),
        });
        // Idle gaps now and then, so the time axis is not just step count.
        t += duration + if k % 500 == 499 { 300_000_000 } else { 0 };
    }

    let completed: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.status == RequestStatus::Completed)
        .collect();
    let ttft: Vec<f64> = completed
        .iter()
        .filter_map(|r| r.ttft())
        .map(|t| t.as_secs_f64())
        .collect();
    let tpot: Vec<f64> = completed.iter().filter_map(|r| r.tpot()).collect();
    let e2e: Vec<f64> = completed
        .iter()
        .filter_map(|r| r.e2e())
        .map(|t| t.as_secs_f64())
        .collect();
    let queueing: Vec<f64> = completed
        .iter()
        .filter_map(|r| r.queueing())
        .map(|t| t.as_secs_f64())
        .collect();
    let window = requests as f64 * 0.05 + 5.0;

    // One pass over the requests, then one summary per adapter.
    let mut by_adapter: Vec<(u64, Vec<f64>)> = vec![(0, Vec::new()); adapters as usize];
    for r in &records {
        if let Some(slot) = r.adapter.and_then(|a| by_adapter.get_mut(a as usize)) {
            slot.0 += 1;
            if r.status == RequestStatus::Completed {
                if let Some(t) = r.ttft() {
                    slot.1.push(t.as_secs_f64());
                }
            }
        }
    }
    let mut per_adapter = Vec::new();
    for (a, (requests, ttfts)) in by_adapter.into_iter().enumerate() {
        let a = a as u32;
        let s = summary(ttfts);
        per_adapter.push(AdapterMetrics {
            adapter: a,
            rank: [8, 16, 32, 64][a as usize % 4],
            requests,
            completed: s.count,
            ttft_p50_s: s.p50,
            ttft_p99_s: s.p99,
            loads: (a > adapters / 2) as u32 * 3,
            evictions: (a > adapters / 2) as u32 * 2,
        });
    }

    let mut breakdown = BTreeMap::new();
    for (part, s) in [
        ("base_gemm", 41.5),
        ("lora_shrink", 6.2),
        ("lora_expand", 7.9),
        ("attention_prefill", 9.4),
        ("attention_decode", 18.3),
        ("adapter_load_stall", 2.1),
        ("sampling", 1.2),
        ("kernel_launch", 0.6),
        ("cpu_overhead", 0.0),
    ] {
        breakdown.insert(part.to_string(), s);
    }
    let mut definitions = BTreeMap::new();
    for (k, v) in [
        ("ttft", "first token time − arrival"),
        (
            "tpot",
            "(E2E − TTFT) / (output tokens − 1), vLLM's definition",
        ),
        (
            "itl",
            "gaps between consecutive tokens of a request, over all tokens",
        ),
        ("e2e", "finish − arrival"),
        ("queueing", "first admission − arrival"),
        (
            "throughput_window",
            "first arrival to last completion or abort",
        ),
    ] {
        definitions.insert(k.to_string(), v.to_string());
    }
    let count = |s: RequestStatus| records.iter().filter(|r| r.status == s).count() as u64;

    let metrics = Metrics {
        scenario: "synthetic <llama-7b> & friends".to_string(),
        provenance: Some(Provenance::Derived),
        cost_model: "roofline A100-80GB llama-7b TP1 (derived)".to_string(),
        seed: 42,
        throughput: Throughput {
            window_s: window,
            offered_requests_per_s: 20.0,
            requests_per_s: completed.len() as f64 / window,
            output_tokens_per_s: 1_234.5,
            total_tokens_per_s: 9_876.5,
            goodput_requests_per_s: 15.5,
        },
        requests: RequestCounts {
            submitted: requests,
            completed: completed.len() as u64,
            aborted: count(RequestStatus::Aborted),
            rejected: count(RequestStatus::Rejected),
            preemptions: records.iter().map(|r| r.preemptions as u64).sum(),
        },
        ttft_s: summary(ttft),
        tpot_s: summary(tpot.clone()),
        itl_s: summary(tpot),
        e2e_s: summary(e2e),
        queueing_s: summary(queueing),
        slo: SloTargets {
            ttft_s: Some(0.5),
            tpot_s: Some(0.04),
            e2e_s: None,
            attainment_target: 0.9,
        },
        slo_attainment: 0.87,
        meets_slo: false,
        batch: BatchMetrics {
            steps,
            mean_batch_size: 21.3,
            max_batch_size: 58,
            mean_distinct_adapters: 5.2,
            max_distinct_adapters: 16,
        },
        pool: PoolMetrics {
            capacity_pages: capacity,
            page_bytes: 2 * 32 * 4096 * 2,
            mean_kv_pages: 2_100.0,
            mean_adapter_pages: 650.0,
            mean_free_pages: 3_250.0,
            peak_kv_pages: 4_100,
            peak_adapter_pages: 900,
        },
        adapter_traffic: AdapterTraffic {
            loads: 120,
            evictions: 80,
            h2d_bytes: 3_500_000_000,
        },
        step_time_breakdown_s: breakdown,
        per_adapter,
        definitions,
    };
    RunResult {
        metrics,
        requests: records,
        steps: step_records,
    }
}

/// A sweep over `counts` adapter counts × `rates` offered rates. Capacity falls with the
/// adapter count; the largest count meets the SLO at no rate, the smallest at every one.
pub fn sweep(counts: &[u32], rates: &[f64]) -> SweepResult {
    let mut points = Vec::new();
    for (ci, &adapters) in counts.iter().enumerate() {
        let capacity = 20.0 / (1.0 + 3.0 * (ci as f64).powi(3));
        for &rate in rates {
            let throughput = rate.min(capacity * 1.1) * 0.98;
            let attainment = if rate <= capacity {
                0.995 - 0.03 * rate / capacity
            } else {
                (0.96 - 0.4 * (rate / capacity - 1.0)).max(0.02)
            };
            let mut parameters = BTreeMap::new();
            parameters.insert("adapters.count".to_string(), json!(adapters));
            parameters.insert("workload.rate".to_string(), json!(rate));
            let mut metrics = Metrics {
                scenario: "synthetic-sweep".to_string(),
                provenance: Some(Provenance::Calibrated),
                cost_model: "tables H100 llama-7b".to_string(),
                ..Metrics::default()
            };
            metrics.throughput.requests_per_s = throughput;
            metrics.throughput.output_tokens_per_s = throughput * 180.0;
            metrics.ttft_s.p50 = 0.08 * (1.0 + rate / capacity);
            metrics.ttft_s.p99 = 0.3 * (1.0 + (rate / capacity).powi(3));
            metrics.tpot_s.p50 = 0.02 + 0.002 * rate;
            metrics.tpot_s.p99 = 0.03 + 0.004 * rate;
            metrics.slo = SloTargets {
                ttft_s: Some(1.0),
                tpot_s: Some(0.08),
                e2e_s: None,
                attainment_target: 0.95,
            };
            metrics.slo_attainment = attainment;
            metrics.meets_slo = attainment >= 0.95;
            metrics.requests.submitted = (rate * 600.0) as u64;
            metrics.requests.completed = (throughput * 600.0) as u64;
            metrics.requests.aborted = ((rate - throughput).max(0.0) * 600.0) as u64;
            metrics
                .definitions
                .insert("ttft".into(), "first token time − arrival".into());
            points.push(SweepPoint {
                parameters,
                adapters,
                offered_rate: rate,
                metrics,
            });
        }
    }
    SweepResult {
        scenario: "synthetic-sweep".to_string(),
        points,
    }
}
