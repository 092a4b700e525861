//! Fleet simulation: `replicas` identical replicas of one scenario's server (each its own
//! engine [`Scheduler`] with the scenario's `EngineConfig`, each priced by the same cost model)
//! behind a router that sends every arriving request to one of them.
//!
//! The driver is [`des::simulate_with`](crate::des::simulate_with)'s loop with one scheduler
//! per replica: integer time, events ordered by `(time, insertion sequence)`, events in the
//! past refused, every event at one instant handled before any replica plans. Each replica has
//! at most one step in flight. Requests keep their global index as their `RequestId` on
//! whichever replica serves them, so one [`Recorder`] records the whole fleet as one run.
//!
//! # Routing
//!
//! The router sees only what a real load balancer in front of replicas sees: the request's
//! adapter, and each replica's *outstanding* requests (routed to it and not yet ended:
//! completed, aborted or rejected). Requests are never moved after routing. See
//! [`RouterPolicy`] for the three policies. A replica that does not hold a request's adapter
//! loads it into its own pool on demand, as any engine does; the cost model charges the copy.
//! Where adapters live ("adapters per replica") is therefore a consequence of the policy.
//!
//! # Cost
//!
//! Per event: routing is O(log replicas) (a sorted index of outstanding counts), the rest is
//! one replica's engine work, as in a single run. The event heap holds at most one arrival and
//! one step end per busy replica. A fleet run of N replicas costs about N single runs of
//! 1/N of the traffic each, plus one combined result; per-replica summaries are gathered as
//! the run goes.

use crate::cost::{BatchShape, CostModel, StepCost};
use crate::des::{Progress, SimError};
use crate::metrics::RunResult;
use crate::recorder::Recorder;
use crate::scenario::RunSetup;
use serde::{Deserialize, Serialize};
use slora_engine::{ConfigError, Nanos, Scheduler, StepPlan, StepReport};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

/// How the router picks a replica for an arriving request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterPolicy {
    /// Request `k` of the stream (counting every request, with or without an adapter) goes to
    /// replica `k mod replicas`. Blind to load and adapters: every replica ends up loading
    /// nearly every adapter.
    RoundRobin,
    /// The replica with the fewest outstanding requests; ties go to the lowest index. Balances
    /// load, blind to adapters.
    LeastOutstanding,
    /// Adapter `a`'s home is replica `a mod replicas` (adapter ids are popularity ranks under
    /// the Zipf and power laws, so the most popular adapters get distinct homes). A request
    /// goes home unless home is overloaded: when, counting the new request, home's
    /// outstanding requests would exceed `affinity_slack` times the least-loaded replica's
    /// (`home + 1 > affinity_slack * (least + 1)`), it goes to the least-loaded replica
    /// instead. Requests without an adapter go to the least-loaded replica. Keeps each
    /// adapter resident on few replicas, so the fleet loads fewer copies.
    AdapterAffinity,
}

/// A fleet of identical replicas and how requests are routed to them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    /// Replicas, each a whole server (its own GPUs: `tensor_parallel` of them). At least 1.
    pub replicas: u32,
    pub router: RouterPolicy,
    /// [`RouterPolicy::AdapterAffinity`] only: how much busier than the least-loaded replica
    /// an adapter's home may be before a request spills over (see the policy). At least 1:
    /// 1 spills whenever home is not a least-loaded replica (least-outstanding with a
    /// preference for home on ties); large values keep adapters home whatever the load.
    #[serde(default = "default_affinity_slack")]
    pub affinity_slack: f64,
}

fn default_affinity_slack() -> f64 {
    3.0
}

impl Default for FleetSpec {
    /// One replica, least-outstanding routing, slack 3.
    fn default() -> Self {
        FleetSpec {
            replicas: 1,
            router: RouterPolicy::LeastOutstanding,
            affinity_slack: default_affinity_slack(),
        }
    }
}

impl FleetSpec {
    /// A fleet of `replicas` with `router` and the default slack.
    pub fn new(replicas: u32, router: RouterPolicy) -> FleetSpec {
        FleetSpec {
            replicas,
            router,
            affinity_slack: default_affinity_slack(),
        }
    }

    /// Checks the values; errors name the field (`fleet.replicas`, `fleet.affinity_slack`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.replicas == 0 {
            return Err(ConfigError::Invalid {
                field: "fleet.replicas".into(),
                reason: "must be at least 1".into(),
            });
        }
        if !(self.affinity_slack.is_finite() && self.affinity_slack >= 1.0) {
            return Err(ConfigError::Invalid {
                field: "fleet.affinity_slack".into(),
                reason: format!("must be a number >= 1, got {}", self.affinity_slack),
            });
        }
        Ok(())
    }
}

/// One replica's share of a fleet run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSummary {
    pub replica: u32,
    /// Requests routed here, and how they ended.
    pub requests: u64,
    pub completed: u64,
    pub aborted: u64,
    pub rejected: u64,
    pub preemptions: u64,
    /// Completed requests and their output tokens per second, over the fleet's throughput
    /// window (first arrival to last completion of the whole run), so the replicas' figures
    /// add up to the combined run's.
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Steps run, seconds spent in them, and that time over the window. With continuous
    /// batching a replica with any running request always has a step in flight, so
    /// `utilization` is the share of time it had work, not how close it is to its capacity
    /// (see `mean_batch_size` and the latencies for that).
    pub steps: u64,
    pub busy_s: f64,
    pub utilization: f64,
    /// Running requests per step, weighted by step time (as the combined run's).
    pub mean_batch_size: f64,
    /// Most requests outstanding here at once.
    pub peak_outstanding: u32,
    /// Distinct adapters of the requests routed here.
    pub distinct_adapters: u32,
    /// Adapter copies into this replica's pool, evictions from it, and bytes copied.
    pub adapter_loads: u64,
    pub adapter_evictions: u64,
    pub h2d_bytes: u64,
}

/// A fleet run.
#[derive(Clone, Debug, Default)]
pub struct FleetResult {
    /// Every request of the stream, as one run: per-request records, latency percentiles,
    /// throughput and SLO attainment over the whole fleet; engine counters and per-adapter
    /// loads summed over replicas. `steps` holds every replica's steps in start order, so the
    /// batch and pool figures (time-weighted over steps; `pool.capacity_pages` is one
    /// replica's) describe the average replica.
    pub combined: RunResult,
    pub per_replica: Vec<ReplicaSummary>,
    /// The replica each request was routed to, by its index in the stream.
    pub replica_of: Vec<u32>,
}

impl FleetResult {
    /// Adapter copies into any replica's pool, over the run.
    pub fn adapter_loads(&self) -> u64 {
        self.per_replica.iter().map(|r| r.adapter_loads).sum()
    }
}

/// Events of a fleet run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FleetEvent {
    /// Request `index` of the arrival list reaches the router.
    Arrival(usize),
    /// Replica `r`'s step in flight finishes.
    StepDone(u32),
}

/// Min-queue of events by time, ties broken by insertion order; the past is refused (as
/// [`crate::des::EventQueue`], with replica-tagged events).
#[derive(Debug, Default)]
struct FleetQueue {
    heap: BinaryHeap<Reverse<(Nanos, u64, FleetEvent)>>,
    next_seq: u64,
    now: Nanos,
}

impl FleetQueue {
    fn push(&mut self, at: Nanos, event: FleetEvent) -> Result<(), SimError> {
        if at < self.now {
            return Err(SimError::PastEvent { now: self.now, at });
        }
        self.heap.push(Reverse((at, self.next_seq, event)));
        self.next_seq += 1;
        Ok(())
    }

    fn pop(&mut self) -> Option<(Nanos, FleetEvent)> {
        let Reverse((at, _, event)) = self.heap.pop()?;
        self.now = at;
        Some((at, event))
    }

    fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn peek_time(&self) -> Option<Nanos> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }
}

/// Outstanding requests per replica, with the replicas sorted by `(outstanding, index)` so the
/// least-loaded one (lowest index on ties) is found in O(log replicas).
#[derive(Debug)]
struct LoadIndex {
    outstanding: Vec<u32>,
    by_load: BTreeSet<(u32, u32)>,
}

impl LoadIndex {
    fn new(replicas: u32) -> LoadIndex {
        LoadIndex {
            outstanding: vec![0; replicas as usize],
            by_load: (0..replicas).map(|r| (0, r)).collect(),
        }
    }

    fn of(&self, replica: u32) -> u32 {
        self.outstanding[replica as usize]
    }

    fn least(&self) -> u32 {
        self.by_load
            .first()
            .map(|&(_, r)| r)
            .expect("a fleet has at least one replica")
    }

    fn set(&mut self, replica: u32, value: u32) {
        let slot = &mut self.outstanding[replica as usize];
        self.by_load.remove(&(*slot, replica));
        *slot = value;
        self.by_load.insert((value, replica));
    }

    fn add(&mut self, replica: u32) {
        self.set(replica, self.of(replica) + 1);
    }

    fn remove(&mut self, replica: u32, ended: usize) {
        if ended > 0 {
            let left = self.of(replica) as usize - ended;
            self.set(replica, left as u32);
        }
    }
}

/// The routing policy and its state.
#[derive(Debug)]
struct Router {
    spec: FleetSpec,
    routed: u64,
}

impl Router {
    fn route(&mut self, adapter: Option<u32>, loads: &LoadIndex) -> u32 {
        let n = self.spec.replicas;
        let k = self.routed;
        self.routed += 1;
        match (self.spec.router, adapter) {
            (RouterPolicy::RoundRobin, _) => (k % n as u64) as u32,
            (RouterPolicy::LeastOutstanding, _) | (RouterPolicy::AdapterAffinity, None) => {
                loads.least()
            }
            (RouterPolicy::AdapterAffinity, Some(a)) => {
                let home = a % n;
                let least = loads.least();
                let home_after = f64::from(loads.of(home)) + 1.0;
                let least_after = f64::from(loads.of(least)) + 1.0;
                if home_after > self.spec.affinity_slack * least_after {
                    least
                } else {
                    home
                }
            }
        }
    }
}

/// One replica: its engine, its step in flight, and what its summary needs.
struct Replica {
    scheduler: Scheduler,
    in_flight: Option<(StepPlan, StepCost)>,
    /// Marked when an event touched it at the current instant (it may have work to plan).
    touched: bool,
    summary: ReplicaSummary,
    output_tokens: u64,
    busy: Nanos,
    batch_time: f64,
    /// Adapters routed here (a bitset over adapter ids).
    adapters_seen: Vec<u64>,
}

/// Runs `setup`'s request stream through a fleet of `fleet.replicas` replicas of its server
/// until every request has completed, been aborted or been rejected. With one replica it is
/// [`crate::des::simulate`], event for event (the same `RunResult`), whatever the router.
pub fn simulate_fleet(
    setup: &RunSetup,
    fleet: &FleetSpec,
    progress: Option<Progress<'_>>,
) -> Result<FleetResult, SimError> {
    fleet.validate()?;
    let cost: &dyn CostModel = setup.cost.as_ref();
    let mut recorder = Recorder::new(setup, cost);
    let arrivals = &setup.arrivals;
    let adapter_words = setup.ranks.len().div_ceil(64);
    let mut replicas = (0..fleet.replicas)
        .map(|r| {
            Ok(Replica {
                scheduler: Scheduler::new(setup.engine.clone())?,
                in_flight: None,
                touched: false,
                summary: ReplicaSummary {
                    replica: r,
                    ..ReplicaSummary::default()
                },
                output_tokens: 0,
                busy: Nanos::ZERO,
                batch_time: 0.0,
                adapters_seen: vec![0; adapter_words],
            })
        })
        .collect::<Result<Vec<_>, SimError>>()?;
    let mut loads = LoadIndex::new(fleet.replicas);
    let mut router = Router {
        spec: fleet.clone(),
        routed: 0,
    };
    let mut replica_of = Vec::with_capacity(arrivals.len());
    let mut touched: Vec<u32> = Vec::new();
    let mut queue = FleetQueue::default();
    if let Some(first) = arrivals.first() {
        queue.push(first.time, FleetEvent::Arrival(0))?;
    }
    let total = arrivals.len() as u64;
    while let Some((now, event)) = queue.pop() {
        let r = match event {
            FleetEvent::Arrival(i) => {
                let a = &arrivals[i];
                let r = router.route(a.adapter, &loads);
                replica_of.push(r);
                let replica = &mut replicas[r as usize];
                replica.summary.requests += 1;
                if let Some(id) = a.adapter {
                    if let Some(word) = replica.adapters_seen.get_mut(id as usize / 64) {
                        *word |= 1 << (id % 64);
                    }
                }
                match replica.scheduler.submit(a.meta(i), now) {
                    Ok(()) => {
                        loads.add(r);
                        let o = loads.of(r);
                        replica.summary.peak_outstanding = replica.summary.peak_outstanding.max(o);
                    }
                    Err(reject) => recorder.rejected(i, &reject, now),
                }
                if let Some(next) = arrivals.get(i + 1) {
                    queue.push(next.time, FleetEvent::Arrival(i + 1))?;
                }
                if let Some(report) = progress {
                    if i % 4096 == 0 {
                        report(i as u64, total);
                    }
                }
                r
            }
            FleetEvent::StepDone(r) => {
                let replica = &mut replicas[r as usize];
                let (plan, step_cost) = replica
                    .in_flight
                    .take()
                    .expect("a StepDone event is only scheduled with a step in flight");
                let report = StepReport {
                    step: plan.step,
                    elapsed: step_cost.total(),
                };
                let outcome = replica.scheduler.complete_step(&report, now)?;
                replica.output_tokens += outcome
                    .finished
                    .iter()
                    .map(|f| u64::from(f.output_tokens))
                    .sum::<u64>();
                loads.remove(r, outcome.finished.len());
                recorder.completed(&outcome, now);
                r
            }
        };
        if !replicas[r as usize].touched {
            replicas[r as usize].touched = true;
            touched.push(r);
        }
        if queue.peek_time() == Some(now) {
            continue;
        }
        // Every event at `now` is in: the replicas it touched plan, in index order.
        touched.sort_unstable();
        for &r in &touched {
            let replica = &mut replicas[r as usize];
            replica.touched = false;
            if replica.in_flight.is_some() {
                continue;
            }
            let Some(plan) = replica.scheduler.plan_step(now)? else {
                continue;
            };
            let shape = BatchShape::from_plan(&plan, &setup.ranks);
            // A plan that only aborts requests does no GPU work and takes no time.
            let step_cost = if plan.has_compute() || !plan.loads.is_empty() {
                cost.step_cost(&shape)
            } else {
                StepCost::default()
            };
            loads.remove(r, plan.aborted.len());
            let duration = step_cost.total();
            replica.busy = replica.busy + duration;
            replica.batch_time += f64::from(plan.batch_size()) * duration.0 as f64;
            replica.summary.steps += 1;
            recorder.planned(&plan, &step_cost, duration, now);
            queue.push(now + duration, FleetEvent::StepDone(r))?;
            replica.in_flight = Some((plan, step_cost));
        }
        debug_assert!(touched.iter().all(|&r| {
            let s = &replicas[r as usize].scheduler;
            loads.of(r) as usize == s.waiting_len() + s.running_len()
        }));
        touched.clear();
        if queue.is_empty() {
            // Nothing in flight and nothing left to arrive: every replica must be empty.
            if let Some(stuck) = replicas.iter().find(|p| p.scheduler.has_work()) {
                return Err(SimError::Stuck {
                    now,
                    waiting: stuck.scheduler.waiting_len(),
                });
            }
        }
    }
    if let Some(report) = progress {
        report(total, total);
    }
    let schedulers: Vec<&Scheduler> = replicas.iter().map(|p| &p.scheduler).collect();
    let combined = recorder.finish_replicas(&schedulers);
    let window = combined.metrics.throughput.window_s;
    let per_s = |x: f64| if window > 0.0 { x / window } else { 0.0 };
    let per_replica = replicas
        .into_iter()
        .map(|p| {
            let c = p.scheduler.counters();
            let busy_s = p.busy.as_secs_f64();
            ReplicaSummary {
                completed: c.finished,
                aborted: c.aborted,
                rejected: c.rejected,
                preemptions: c.preemptions,
                requests_per_s: per_s(c.finished as f64),
                output_tokens_per_s: per_s(p.output_tokens as f64),
                busy_s,
                utilization: per_s(busy_s),
                mean_batch_size: if p.busy.0 > 0 {
                    p.batch_time / p.busy.0 as f64
                } else {
                    0.0
                },
                distinct_adapters: p.adapters_seen.iter().map(|w| w.count_ones()).sum(),
                adapter_loads: c.adapter_loads,
                adapter_evictions: c.adapter_evictions,
                h2d_bytes: c.adapter_load_bytes,
                ..p.summary
            }
        })
        .collect();
    Ok(FleetResult {
        combined,
        per_replica,
        replica_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(router: RouterPolicy, replicas: u32, slack: f64) -> FleetSpec {
        FleetSpec {
            replicas,
            router,
            affinity_slack: slack,
        }
    }

    #[test]
    fn least_outstanding_picks_the_lowest_index_on_ties() {
        let mut loads = LoadIndex::new(3);
        assert_eq!(loads.least(), 0);
        loads.add(0);
        assert_eq!(loads.least(), 1);
        loads.add(1);
        loads.add(2);
        loads.add(2);
        assert_eq!(loads.least(), 0);
        loads.remove(2, 2);
        assert_eq!(loads.least(), 2);
        assert_eq!(loads.of(2), 0);
    }

    #[test]
    fn routers_follow_their_rules() {
        let mut loads = LoadIndex::new(4);
        let mut rr = Router {
            spec: spec(RouterPolicy::RoundRobin, 4, 2.0),
            routed: 0,
        };
        let picks: Vec<u32> = (0..6).map(|_| rr.route(Some(1), &loads)).collect();
        assert_eq!(picks, [0, 1, 2, 3, 0, 1]);

        let mut affinity = Router {
            spec: spec(RouterPolicy::AdapterAffinity, 4, 2.0),
            routed: 0,
        };
        // Adapter 6's home is 2. With everyone empty it goes home.
        assert_eq!(affinity.route(Some(6), &loads), 2);
        // Home at 1, least at 0: 2 > 2 * 1 is false, still home.
        loads.add(2);
        assert_eq!(affinity.route(Some(6), &loads), 2);
        // Home at 2: 3 > 2 spills to the least-loaded (lowest index).
        loads.add(2);
        assert_eq!(affinity.route(Some(6), &loads), 0);
        // Without an adapter: least-loaded.
        assert_eq!(affinity.route(None, &loads), 0);
        // Slack 1 spills as soon as home is not a least-loaded replica.
        let mut tight = Router {
            spec: spec(RouterPolicy::AdapterAffinity, 4, 1.0),
            routed: 0,
        };
        assert_eq!(tight.route(Some(4), &loads), 0);
        assert_eq!(tight.route(Some(5), &loads), 1);
        assert_eq!(tight.route(Some(6), &loads), 0);
    }

    #[test]
    fn fleet_spec_checks_its_fields() {
        let err = spec(RouterPolicy::RoundRobin, 0, 2.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("fleet.replicas"), "{err}");
        for slack in [0.5, f64::NAN, f64::INFINITY] {
            let err = spec(RouterPolicy::AdapterAffinity, 2, slack)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("fleet.affinity_slack"), "{err}");
        }
        let parsed: FleetSpec =
            serde_json::from_str(r#"{"replicas": 3, "router": "adapter_affinity"}"#).unwrap();
        assert_eq!(parsed, FleetSpec::new(3, RouterPolicy::AdapterAffinity));
    }
}
