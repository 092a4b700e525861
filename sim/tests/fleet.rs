//! Fleets of replicas behind a router (`slora_sim::fleet`): one replica is the single-server
//! simulation; more replicas carry more; each router does what its policy says.

use slora_sim::metrics::RequestStatus;
use slora_sim::{simulate, simulate_fleet, FleetResult, FleetSpec, RouterPolicy, Scenario};
use std::path::Path;

const ROUTERS: [RouterPolicy; 3] = [
    RouterPolicy::RoundRobin,
    RouterPolicy::LeastOutstanding,
    RouterPolicy::AdapterAffinity,
];

fn setup(text: &str) -> slora_sim::RunSetup {
    let loaded = Scenario::parse(text, Path::new("fleet.yaml")).unwrap();
    loaded.points[0]
        .scenario
        .build(Path::new("fleet.yaml"))
        .unwrap()
}

fn fleet(setup: &slora_sim::RunSetup, replicas: u32, router: RouterPolicy) -> FleetResult {
    simulate_fleet(setup, &FleetSpec::new(replicas, router), None).unwrap()
}

/// Llama-7B on an H200, batches of at most 32, short requests: a replica's capacity is a few
/// dozen requests per second, so runs are small. On the derived cost model with its default
/// factors, so that new calibration profiles do not move the figures these tests rely on.
fn small_server(rate: f64, requests: u32, adapters: u32, popularity: &str) -> String {
    format!(
        "name: fleet\nseed: 11\nmodel: llama-7b\ngpu: h200\nefficiency: {{}}\n\
         adapters: {{ count: {adapters}, ranks: [8, 32, 64], popularity: {popularity} }}\n\
         workload:\n  arrivals: {{ process: poisson, rate: {rate} }}\n  requests: {requests}\n  \
         input: {{ dist: uniform, min: 32, max: 256 }}\n  \
         output: {{ dist: uniform, min: 16, max: 96 }}\n\
         policy: {{ max_batch_size: 32 }}\n\
         slo: {{ ttft_s: 1.0, attainment_target: 0.9 }}\n"
    )
}

#[test]
fn one_replica_is_the_single_server_simulation_for_every_router() {
    // Adapters with skewed popularity, bursts, clustering and early abort: every path of the
    // event loop (rejections, abort-only plans, loads) is exercised.
    let text = "name: one\nseed: 5\nmodel: llama-7b\ngpu: h200\nefficiency: {}\n\
        adapters: { count: 60, ranks: [8, 64], popularity: { law: zipf, s: 1.0 } }\n\
        workload:\n  arrivals: { process: gamma, rate: 120, cv: 3 }\n  duration_s: 20\n  \
        input: { dist: uniform, min: 8, max: 600 }\n  output: { dist: uniform, min: 1, max: 200 }\n\
        policy: { clustering: true, max_prefill_tokens: 512, early_abort: true, \
                  min_time_to_first_token_s: 0.2 }\n\
        slo: { ttft_s: 1.5 }\n";
    let setup = setup(text);
    let single = simulate(&setup, None).unwrap();
    assert!(single.metrics.requests.aborted > 0 && single.metrics.requests.rejected > 0);
    for router in ROUTERS {
        let one = fleet(&setup, 1, router);
        assert_eq!(one.combined.requests, single.requests, "{router:?}");
        assert_eq!(one.combined.steps, single.steps, "{router:?}");
        assert_eq!(one.combined.metrics, single.metrics, "{router:?}");
        let r = &one.per_replica[0];
        assert_eq!(r.requests, single.metrics.requests.submitted);
        assert_eq!(r.completed, single.metrics.requests.completed);
        assert_eq!(r.adapter_loads, single.metrics.adapter_traffic.loads);
        assert_eq!(r.steps, single.metrics.batch.steps);
        assert!(one.replica_of.iter().all(|&x| x == 0));
    }
}

#[test]
fn two_replicas_carry_what_one_cannot() {
    // One replica's capacity: its throughput when every request arrives at once, or nearly.
    let saturating = setup(&small_server(2000.0, 1500, 20, "{ law: uniform }"));
    let one = fleet(&saturating, 1, RouterPolicy::LeastOutstanding);
    let capacity = one.combined.metrics.throughput.requests_per_s;
    assert!(capacity > 10.0, "{capacity}");
    for router in ROUTERS {
        let two = fleet(&saturating, 2, router);
        let throughput = two.combined.metrics.throughput.requests_per_s;
        assert!(
            throughput >= capacity,
            "{router:?}: two replicas {throughput:.1} req/s, one {capacity:.1}"
        );
    }

    // At 1.6 times that, one replica's queue grows without bound; two run at 80%.
    let over = setup(&small_server(1.6 * capacity, 2500, 20, "{ law: uniform }"));
    let alone = fleet(&over, 1, RouterPolicy::LeastOutstanding);
    assert!(
        !alone.combined.metrics.meets_slo,
        "one replica meets the SLO at 1.6x its capacity ({:.3})",
        alone.combined.metrics.slo_attainment
    );
    for router in ROUTERS {
        let pair = fleet(&over, 2, router);
        let m = &pair.combined.metrics;
        assert!(
            m.meets_slo,
            "{router:?}: two replicas at 1.6x one's capacity attain {:.3}",
            m.slo_attainment
        );
        assert_eq!(m.requests.completed, 2500);
        // Replica figures add up to the fleet's.
        let sum: f64 = pair.per_replica.iter().map(|r| r.requests_per_s).sum();
        assert!((sum / m.throughput.requests_per_s - 1.0).abs() < 1e-9);
        let routed: u64 = pair.per_replica.iter().map(|r| r.requests).sum();
        assert_eq!(routed, 2500);
    }
}

#[test]
fn round_robin_balances_request_counts() {
    for replicas in [2, 3, 5] {
        let s = setup(&small_server(80.0, 1001, 30, "{ law: zipf, s: 1.0 }"));
        let run = fleet(&s, replicas, RouterPolicy::RoundRobin);
        let counts: Vec<u64> = run.per_replica.iter().map(|r| r.requests).collect();
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{replicas} replicas: {counts:?}");
        assert_eq!(counts.iter().sum::<u64>(), 1001);
        for (k, &r) in run.replica_of.iter().enumerate() {
            assert_eq!(r as usize, k % replicas as usize);
        }
    }
}

#[test]
fn adapter_affinity_keeps_adapters_home_and_loads_fewer_copies() {
    // Four replicas at moderate load (about 40% of their capacity: one replica serves about
    // 70 req/s of these short requests within the SLO), 50 adapters of 60 requests each, the
    // default slack.
    let s = setup(&small_server(120.0, 3000, 50, "{ law: uniform }"));
    let affinity = fleet(&s, 4, RouterPolicy::AdapterAffinity);
    let round_robin = fleet(&s, 4, RouterPolicy::RoundRobin);
    let least = fleet(&s, 4, RouterPolicy::LeastOutstanding);

    let mut by_adapter = vec![[0u32; 4]; 50];
    for (k, a) in s.arrivals.iter().enumerate() {
        by_adapter[a.adapter.unwrap() as usize][affinity.replica_of[k] as usize] += 1;
    }
    let (mut home, mut all) = (0u32, 0u32);
    for (a, counts) in by_adapter.iter().enumerate() {
        let total: u32 = counts.iter().sum();
        let top = *counts.iter().max().unwrap();
        // The most-used replica is the adapter's home, `a mod 4`.
        assert_eq!(top, counts[a % 4], "adapter {a}: {counts:?}");
        if total >= 30 {
            assert!(
                top as f64 >= 0.9 * total as f64,
                "adapter {a}: {counts:?} across replicas"
            );
        }
        home += top;
        all += total;
    }
    assert!(home as f64 >= 0.95 * all as f64, "{home} of {all} at home");

    let (a, rr, lo) = (
        affinity.adapter_loads(),
        round_robin.adapter_loads(),
        least.adapter_loads(),
    );
    // Blind routers make every replica load every adapter (the pools are large enough to keep
    // them: loads are first copies); affinity one copy each, plus the copies spills make.
    assert!(
        rr >= 180 && lo >= 180 && (a as f64) <= 0.7 * rr.min(lo) as f64,
        "adapter loads: affinity {a}, round-robin {rr}, least-outstanding {lo}"
    );
    let pairs =
        |run: &FleetResult| -> u32 { run.per_replica.iter().map(|r| r.distinct_adapters).sum() };
    assert!(
        pairs(&affinity) as f64 <= 0.7 * pairs(&round_robin) as f64,
        "adapter-replica pairs: affinity {}, round-robin {}",
        pairs(&affinity),
        pairs(&round_robin)
    );
    assert!(affinity.combined.metrics.meets_slo);
}

/// Least-outstanding routing cannot keep every replica busy (requests are never moved after
/// routing, and one replica may draw the long ones), so "no replica idles while another has
/// two waiting" does not hold. What it guarantees, and what this checks from the run's records
/// alone: every request goes to a replica with the fewest outstanding requests at its arrival,
/// so in particular it never queues behind another request while some replica is empty.
#[test]
fn least_outstanding_routes_every_request_to_a_least_loaded_replica() {
    let replicas = 3usize;
    let s = setup(&small_server(70.0, 2000, 40, "{ law: zipf, s: 1.0 }"));
    let run = fleet(&s, replicas as u32, RouterPolicy::LeastOutstanding);
    let records = &run.combined.requests;
    let (mut checked, mut sent_to_empty) = (0, 0);
    'requests: for (m, r) in records.iter().enumerate() {
        let t = r.arrival;
        let mut outstanding = vec![0u32; replicas];
        for (i, earlier) in records[..m].iter().enumerate() {
            if earlier.status == RequestStatus::Rejected {
                continue;
            }
            let end = earlier.finish.expect("every request ends");
            if end == t {
                // An end at the arrival's instant may be handled before or after it.
                continue 'requests;
            }
            if end > t {
                outstanding[run.replica_of[i] as usize] += 1;
            }
        }
        let least = *outstanding.iter().min().unwrap();
        let chosen = run.replica_of[m] as usize;
        assert_eq!(
            outstanding[chosen], least,
            "request {m} at {t}: sent to replica {chosen} with outstanding {outstanding:?}"
        );
        // Ties go to the lowest index.
        assert_eq!(
            chosen,
            outstanding.iter().position(|&o| o == least).unwrap()
        );
        checked += 1;
        if least == 0 {
            sent_to_empty += 1;
        }
    }
    assert!(checked >= 1900, "only {checked} requests checked");
    assert!(sent_to_empty > 0);
    // And it balances: no replica serves more than 40% of three replicas' traffic.
    for r in &run.per_replica {
        assert!(r.requests <= 800, "{:?}", run.per_replica);
    }
}
