//! The scheduler: iteration-level batching over the page pool and the adapter cache.
//!
//! Three calls drive it, from the simulator and from the live GPU loop alike:
//! `submit(req, now)`, `plan_step(now)` and `complete_step(report, now)`. Between a plan and
//! its completion exactly one step is in flight.
//!
//! One `plan_step` does, in order:
//! 1. **Early abort** (if configured): drop waiting requests whose first token can no longer
//!    arrive by `arrival + ttft_slo`.
//! 2. **Decode**: every running request whose prompt is done gets one new KV page. Under
//!    optimistic admission, if pages run out, the latest-arriving running requests are
//!    preempted (recompute) until the rest fit. Unpinned adapters are evicted (LRU) first.
//! 3. **Continuing prefills** (chunked prefill): requests admitted earlier with prompt left
//!    get the next chunk, within the step's prefill-token budget.
//! 4. **Admission**: waiting requests, in the order the policy gives (FCFS, newest first
//!    under overload, or VTC; adapter clustering and the distinct-adapter cap on top), join
//!    while the batch, the token budget and the pages allow. A request whose adapter is not
//!    on the device gets a blocking load.
//! 5. **Prefetch**: adapters of the next waiting requests start loading into pages nobody
//!    else may claim, overlapping this step's compute.
//!
//! Complexity per step: O(batch + lookahead · log(waiting) + evictions · log(adapters)),
//! plus O(backlogged clients) per admission under VTC. No step scans the whole queue.
//!
//! # Conservative reservation
//! Under conservative admission `reserved` is the number of pages that admitted requests may
//! still claim (`worst_case − held`, summed). A request is admitted only if
//! `free + evictable adapter pages − reserved` covers its own worst case and its adapter, so a
//! running request never lacks a page and nothing is ever preempted.

use crate::adapter_cache::{AdapterCache, Residency};
use crate::config::{
    Admission, ConfigError, EngineConfig, QueueOrder, SchedulerConfig, MAX_TENANT_ID,
};
use crate::fairness::VirtualTokenCounters;
use crate::plan::{
    AdapterLoad, DecodeStats, DecodeWork, Emitted, PageSpan, PrefillWork, StepOutcome, StepPlan,
    StepReport,
};
use crate::pool::{PageId, PageKind, PageOwner, PagePool, PoolUsage};
use crate::request::{AbortReason, Aborted, Finished, Reject, RequestId, RequestMeta};
use crate::spec::{AdapterId, ModelSpec};
use crate::time::Nanos;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Misuse of the scheduler's protocol by a driver (not bad user data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("step {in_flight} is still in flight; complete it before planning another")]
    StepInFlight { in_flight: u64 },
    #[error("completed step {reported}, but the step in flight is {in_flight:?}")]
    StepMismatch {
        reported: u64,
        in_flight: Option<u64>,
    },
}

/// Running totals since the scheduler was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineCounters {
    pub submitted: u64,
    pub rejected: u64,
    pub aborted: u64,
    pub finished: u64,
    pub preemptions: u64,
    pub adapter_loads: u64,
    pub adapter_evictions: u64,
    pub adapter_load_bytes: u64,
    pub steps: u64,
}

#[derive(Debug, Clone)]
struct Waiting {
    meta: RequestMeta,
    arrival: Nanos,
    seq: u64,
    client: u32,
    /// Tokens generated before a preemption (0 for a fresh request).
    generated: u32,
    preemptions: u32,
    /// Times clustering admitted another request while this one headed the queue.
    bypassed: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Idle,
    Prefill { tokens: u32, emits: bool },
    Decode,
}

#[derive(Debug)]
struct Running {
    meta: RequestMeta,
    arrival: Nanos,
    seq: u64,
    client: u32,
    /// KV rows to build before the next token can be sampled: the prompt, plus the tokens
    /// generated before a preemption.
    prefill_target: u32,
    /// KV rows written by completed steps.
    kv_len: u32,
    generated: u32,
    preemptions: u32,
    /// Rank of its adapter (0 without one), kept here so planning touches no other table.
    rank: u32,
    pages: Vec<PageId>,
    work: Work,
}

impl Running {
    fn in_prefill(&self) -> bool {
        self.kv_len < self.prefill_target
    }

    fn worst_case_pages(&self) -> u64 {
        self.meta.worst_case_pages()
    }
}

/// S-LoRA's overload estimate: smoothed queue growth between batches against the smoothed
/// number admitted per batch. Deterministic, driven by scheduler state only.
#[derive(Debug)]
struct OverloadEstimator {
    growth: f64,
    batch: f64,
    last_waiting: usize,
}

impl OverloadEstimator {
    fn observe(&mut self, waiting: usize) -> bool {
        let growth = waiting as f64 - self.last_waiting as f64;
        self.growth = 0.7 * growth + 0.3 * self.growth;
        self.growth >= self.batch
    }

    fn admitted(&mut self, admitted: usize, waiting_after: usize) {
        if admitted > 0 {
            self.batch = (0.7 * admitted as f64 + 0.3 * self.batch).max(1.0);
            self.last_waiting = waiting_after;
        }
    }
}

/// The scheduling and memory core. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    model: ModelSpec,
    pool: PagePool,
    adapters: AdapterCache,
    waiting: BTreeMap<u64, Waiting>,
    /// `(deadline, seq)` of waiting requests that have not produced a first token.
    deadlines: BTreeSet<(Nanos, u64)>,
    /// Running requests, in no particular order (finished ones are swap-removed); preemption
    /// picks the latest arrival by `seq`.
    running: Vec<Running>,
    live: HashSet<RequestId>,
    reserved: u64,
    next_seq: u64,
    step: u64,
    in_flight: Option<u64>,
    vtc: Option<VirtualTokenCounters>,
    overload: OverloadEstimator,
    candidates: Vec<u64>,
    vtc_scratch: Vec<(f64, u32)>,
    prefill_order: Vec<usize>,
    finished_scratch: Vec<usize>,
    counters: EngineCounters,
}

impl Scheduler {
    pub fn new(config: EngineConfig) -> Result<Scheduler, ConfigError> {
        config.validate()?;
        let pool = PagePool::new(config.pool_pages, config.pool_layout);
        let adapters = AdapterCache::new(&config.model, &config.adapters);
        let vtc = (config.scheduler.order == QueueOrder::Vtc)
            .then(|| VirtualTokenCounters::new(&config.scheduler.fairness));
        Ok(Scheduler {
            cfg: config.scheduler,
            model: config.model,
            pool,
            adapters,
            waiting: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            running: Vec::new(),
            live: HashSet::new(),
            reserved: 0,
            next_seq: 0,
            step: 0,
            in_flight: None,
            vtc,
            overload: OverloadEstimator {
                growth: 0.0,
                batch: 1.0,
                last_waiting: 0,
            },
            candidates: Vec::new(),
            vtc_scratch: Vec::new(),
            prefill_order: Vec::new(),
            finished_scratch: Vec::new(),
            counters: EngineCounters::default(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn model(&self) -> &ModelSpec {
        &self.model
    }

    pub fn adapters(&self) -> &AdapterCache {
        &self.adapters
    }

    pub fn pool_usage(&self) -> PoolUsage {
        self.pool.usage()
    }

    /// The fairness counter of a client (VTC only; see `fairness` for client numbering).
    pub fn fairness_counter(&self, client: u32) -> Option<f64> {
        self.vtc.as_ref().map(|v| v.counter(client))
    }

    pub fn counters(&self) -> EngineCounters {
        self.counters
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Whether the scheduler holds any request (waiting or running).
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// The pages a running request holds, in token order. O(running).
    pub fn pages_of(&self, id: RequestId) -> Option<&[PageId]> {
        self.running
            .iter()
            .find(|r| r.meta.id == id)
            .map(|r| r.pages.as_slice())
    }

    /// Pages the KV of one request may take at most: the KV region, less an adapter.
    fn kv_capacity_for(&self, adapter: Option<AdapterId>) -> u64 {
        let adapter_pages = adapter.map_or(0, |a| self.adapters.pages_needed(a) as u64);
        match self.pool.is_unified() {
            true => (self.pool.capacity() as u64).saturating_sub(adapter_pages),
            false => self.pool.region_capacity(PageKind::Kv) as u64,
        }
    }

    /// Queues a request that arrived at `now`. A rejected request has ended.
    pub fn submit(&mut self, meta: RequestMeta, now: Nanos) -> Result<(), Reject> {
        self.counters.submitted += 1;
        let result = self.check_request(&meta);
        if result.is_err() {
            self.counters.rejected += 1;
            return result;
        }
        self.live.insert(meta.id);
        let seq = self.next_seq;
        self.next_seq += 1;
        let client = self.vtc.as_ref().map_or(0, |v| v.client_of(&meta));
        self.enqueue(Waiting {
            meta,
            arrival: now,
            seq,
            client,
            generated: 0,
            preemptions: 0,
            bypassed: 0,
        });
        Ok(())
    }

    fn check_request(&self, meta: &RequestMeta) -> Result<(), Reject> {
        let id = meta.id;
        if meta.prompt_tokens == 0 {
            return Err(Reject::EmptyPrompt { id });
        }
        if meta.output_tokens == 0 {
            return Err(Reject::NoOutput { id });
        }
        if let Some(adapter) = meta.adapter {
            if !self.adapters.contains(adapter) {
                return Err(Reject::UnknownAdapter {
                    id,
                    adapter,
                    registered: self.adapters.len(),
                });
            }
        }
        if let Some(t) = meta.tenant {
            if t.0 > MAX_TENANT_ID {
                return Err(Reject::TenantOutOfRange {
                    id,
                    tenant: t.0,
                    max: MAX_TENANT_ID,
                });
            }
        }
        if self.live.contains(&id) {
            return Err(Reject::DuplicateId { id });
        }
        let capacity = self.kv_capacity_for(meta.adapter);
        if meta.worst_case_pages() > capacity {
            let adapter_pages = meta
                .adapter
                .map_or(0, |a| self.adapters.pages_needed(a) as u64);
            return Err(Reject::TooLarge {
                id,
                needed: meta.worst_case_pages() + adapter_pages,
                capacity: capacity + adapter_pages,
            });
        }
        if !self.cfg.chunked_prefill && meta.prompt_tokens > self.cfg.max_prefill_tokens {
            return Err(Reject::PromptExceedsBudget {
                id,
                prompt: meta.prompt_tokens,
                budget: self.cfg.max_prefill_tokens,
            });
        }
        Ok(())
    }

    fn enqueue(&mut self, w: Waiting) {
        if let Some(ea) = self.cfg.early_abort {
            if w.generated == 0 {
                self.deadlines.insert((w.arrival + ea.ttft_slo, w.seq));
            }
        }
        if let Some(vtc) = self.vtc.as_mut() {
            vtc.enqueue(w.client, w.seq);
        }
        self.waiting.insert(w.seq, w);
    }

    fn dequeue(&mut self, seq: u64) -> Option<Waiting> {
        let w = self.waiting.remove(&seq)?;
        if let Some(ea) = self.cfg.early_abort {
            self.deadlines.remove(&(w.arrival + ea.ttft_slo, seq));
        }
        if let Some(vtc) = self.vtc.as_mut() {
            vtc.dequeue(w.client, seq);
        }
        Some(w)
    }

    /// Decides the next iteration. `None` when there is nothing to do (no work, no aborts,
    /// no loads): the driver waits for the next arrival.
    pub fn plan_step(&mut self, now: Nanos) -> Result<Option<StepPlan>, EngineError> {
        if let Some(in_flight) = self.in_flight {
            return Err(EngineError::StepInFlight { in_flight });
        }
        let mut plan = StepPlan {
            step: self.step,
            ..StepPlan::default()
        };
        self.abort_unreachable(now, &mut plan);
        self.plan_decodes(&mut plan);
        let mut budget = self.cfg.max_prefill_tokens;
        // Without chunking a prompt is prefilled whole in its admission step, so no running
        // request is ever left mid-prompt.
        if self.cfg.chunked_prefill {
            self.plan_continuing_prefills(&mut budget, &mut plan);
        }
        if self.cfg.chunked_prefill && !plan.has_compute() && !self.running.is_empty() {
            // Optimistic chunked prefills can all be short of pages at once: give the oldest
            // room by preempting from the back until it can proceed.
            while self.running.len() > 1 && !plan.has_compute() {
                self.preempt_newest(&mut plan);
                self.plan_continuing_prefills(&mut budget, &mut plan);
            }
        }
        self.admit(&mut budget, &mut plan);
        self.prefetch(&mut plan);

        if !plan.has_compute()
            && plan.aborted.is_empty()
            && plan.preempted.is_empty()
            && plan.loads.is_empty()
            && plan.evictions.is_empty()
        {
            return Ok(None);
        }
        plan.pool = self.pool.usage();
        plan.waiting = self.waiting.len() as u32;
        plan.distinct_adapters = self.adapters.pinned_adapters();
        plan.distinct_rank_sum = self.adapters.pinned_rank_sum();
        self.in_flight = Some(plan.step);
        Ok(Some(plan))
    }

    fn abort_unreachable(&mut self, now: Nanos, plan: &mut StepPlan) {
        let Some(ea) = self.cfg.early_abort else {
            return;
        };
        let earliest_first_token = now + ea.min_time_to_first_token;
        while let Some(&(deadline, seq)) = self.deadlines.first() {
            if earliest_first_token <= deadline {
                break;
            }
            let Some(w) = self.dequeue(seq) else {
                self.deadlines.pop_first();
                continue;
            };
            self.live.remove(&w.meta.id);
            self.counters.aborted += 1;
            plan.aborted.push(Aborted {
                request: w.meta.id,
                adapter: w.meta.adapter,
                reason: AbortReason::TtftSloUnreachable,
                arrival: w.arrival,
            });
        }
    }

    /// Pages a KV allocation could get right now, counting unpinned adapters as reclaimable.
    fn kv_reclaimable(&self) -> u64 {
        let free = self.pool.free_for(PageKind::Kv) as u64;
        if self.pool.is_unified() {
            free + self.adapters.evictable_pages()
        } else {
            free
        }
    }

    /// Evicts LRU adapters until `n` pages of `kind` are free. False if it cannot.
    fn reclaim(&mut self, kind: PageKind, n: u32, plan: &mut StepPlan) -> bool {
        let shares_region = kind == PageKind::Adapter || self.pool.is_unified();
        while self.pool.free_for(kind) < n {
            if !shares_region {
                return false;
            }
            match self.adapters.evict_lru(&mut self.pool) {
                Some(id) => {
                    self.counters.adapter_evictions += 1;
                    plan.evictions.push(id);
                }
                None => return false,
            }
        }
        true
    }

    fn alloc_kv(&mut self, index: usize, n: u32, plan_pages: &mut Vec<PageId>) -> bool {
        let r = &mut self.running[index];
        let before = r.pages.len();
        if !self.pool.alloc(PageOwner::Kv(r.meta.id), n, &mut r.pages) {
            return false;
        }
        plan_pages.extend_from_slice(&r.pages[before..]);
        if self.cfg.admission == Admission::Conservative {
            self.reserved -= n as u64;
        }
        true
    }

    fn plan_decodes(&mut self, plan: &mut StepPlan) {
        let mut decoders = self.running.iter().filter(|r| !r.in_prefill()).count() as u64;
        if self.cfg.admission == Admission::Optimistic {
            while self.kv_reclaimable() < decoders && !self.running.is_empty() {
                if self
                    .newest_running()
                    .is_some_and(|i| !self.running[i].in_prefill())
                {
                    decoders -= 1;
                }
                self.preempt_newest(plan);
            }
        }
        // Conservative admission reserved these pages; optimistic just made room.
        let room = self.reclaim(PageKind::Kv, decoders as u32, plan);
        debug_assert!(
            room,
            "decode pages must be available after reservation/preemption"
        );
        let conservative = self.cfg.admission == Admission::Conservative;
        plan.decode.reserve(self.running.len());
        let mut stats = DecodeStats::default();
        for r in &mut self.running {
            if r.in_prefill() {
                r.work = Work::Idle;
                continue;
            }
            let Some(page) = self.pool.alloc_kv_page(r.meta.id) else {
                r.work = Work::Idle;
                continue;
            };
            r.pages.push(page);
            if conservative {
                self.reserved -= 1;
            }
            r.work = Work::Decode;
            stats.context_tokens += r.kv_len as u64 + 1;
            stats.max_context = stats.max_context.max(r.kv_len + 1);
            stats.context_histogram.add(r.kv_len + 1);
            if r.meta.adapter.is_some() {
                stats.lora_requests += 1;
                stats.lora_rank_sum += r.rank as u64;
                stats.rank_histogram.add(r.rank);
                stats.max_rank = stats.max_rank.max(r.rank);
            }
            plan.decode.push(DecodeWork {
                request: r.meta.id,
                adapter: r.meta.adapter,
                context_len: r.kv_len,
                page,
            });
        }
        plan.decode_stats = stats;
    }

    fn plan_continuing_prefills(&mut self, budget: &mut u32, plan: &mut StepPlan) {
        // Oldest first. Only chunked prefills are ever left mid-prompt, so this is usually empty.
        let mut order = std::mem::take(&mut self.prefill_order);
        order.clear();
        order.extend(
            (0..self.running.len())
                .filter(|&i| self.running[i].in_prefill() && self.running[i].work == Work::Idle),
        );
        order.sort_unstable_by_key(|&i| self.running[i].seq);
        for &i in &order {
            let r = &self.running[i];
            let remaining = r.prefill_target - r.kv_len;
            let chunk = remaining.min(*budget);
            if chunk == 0 {
                continue;
            }
            if !self.reclaim(PageKind::Kv, chunk, plan) {
                continue;
            }
            if self.plan_prefill_chunk(i, chunk, plan) {
                *budget -= chunk;
            }
        }
        self.prefill_order = order;
    }

    /// Index of the running request that arrived last: the first preemption victim.
    fn newest_running(&self) -> Option<usize> {
        (0..self.running.len()).max_by_key(|&i| self.running[i].seq)
    }

    fn preempt_newest(&mut self, plan: &mut StepPlan) {
        let Some(index) = self.newest_running() else {
            return;
        };
        let r = self.running.swap_remove(index);
        self.pool.free(PageOwner::Kv(r.meta.id), &r.pages);
        if self.cfg.admission == Admission::Conservative {
            self.reserved -= r.worst_case_pages() - r.pages.len() as u64;
        }
        if let Some(a) = r.meta.adapter {
            self.adapters.unpin(a);
        }
        // Drop the work this plan gave it, if any.
        if r.work == Work::Decode {
            plan.decode.retain(|d| d.request != r.meta.id);
        }
        if matches!(r.work, Work::Prefill { .. }) {
            plan.prefill.retain(|p| p.request != r.meta.id);
        }
        self.counters.preemptions += 1;
        plan.preempted.push(r.meta.id);
        self.enqueue(Waiting {
            meta: r.meta,
            arrival: r.arrival,
            seq: r.seq,
            client: r.client,
            generated: r.generated,
            preemptions: r.preemptions + 1,
            bypassed: 0,
        });
    }

    /// Fills `self.candidates` with up to `limit` waiting sequence numbers in policy order.
    fn fill_candidates(&mut self, limit: usize, newest_first: bool) {
        self.candidates.clear();
        if let Some(vtc) = self.vtc.as_ref() {
            vtc.candidates(limit, &mut self.vtc_scratch, &mut self.candidates);
        } else if newest_first {
            self.candidates
                .extend(self.waiting.keys().rev().take(limit).copied());
        } else {
            self.candidates
                .extend(self.waiting.keys().take(limit).copied());
        }
    }

    /// The next request to admit, by queue order, clustering and the adapter cap.
    fn choose(&mut self) -> Option<u64> {
        let cap_reached = self
            .cfg
            .max_adapters_per_batch
            .is_some_and(|cap| self.adapters.pinned_adapters() >= cap);
        let adapters = &self.adapters;
        let waiting = &self.waiting;
        let allowed = |seq: &u64| match waiting[seq].meta.adapter {
            None => true,
            Some(a) => !cap_reached || adapters.is_pinned(a),
        };
        let head = *self.candidates.first()?;
        if !self.cfg.clustering {
            return self.candidates.iter().copied().find(allowed);
        }
        if allowed(&head) && waiting[&head].bypassed >= self.cfg.max_bypass {
            return Some(head);
        }
        let in_batch = |seq: &u64| {
            waiting[seq]
                .meta
                .adapter
                .is_none_or(|a| adapters.is_pinned(a))
        };
        let on_device = |seq: &u64| {
            waiting[seq]
                .meta
                .adapter
                .is_none_or(|a| adapters.is_on_device(a))
        };
        let chosen = self
            .candidates
            .iter()
            .copied()
            .filter(allowed)
            .find(in_batch)
            .or_else(|| {
                self.candidates
                    .iter()
                    .copied()
                    .filter(allowed)
                    .find(on_device)
            })
            .or_else(|| self.candidates.iter().copied().find(allowed))?;
        if chosen != head && allowed(&head) {
            if let Some(w) = self.waiting.get_mut(&head) {
                w.bypassed += 1;
            }
        }
        Some(chosen)
    }

    /// Whether the request's pages fit now, under the admission policy, given that its first
    /// chunk is `chunk` tokens.
    fn fits(&self, w: &Waiting, chunk: u32) -> bool {
        let (adapter_load, own_evictable) = match w.meta.adapter {
            None => (0, 0),
            Some(a) => match self.adapters.residency(a) {
                Residency::Host => (self.adapters.pages_needed(a) as u64, 0),
                Residency::Resident if self.adapters.is_evictable(a) => {
                    (0, self.adapters.pages_needed(a) as u64)
                }
                _ => (0, 0),
            },
        };
        let kv_need = match self.cfg.admission {
            Admission::Conservative => w.meta.worst_case_pages(),
            Admission::Optimistic => chunk as u64,
        };
        if self.pool.is_unified() {
            let available = (self.pool.free_for(PageKind::Kv) as u64
                + self.adapters.evictable_pages())
            .saturating_sub(own_evictable)
            .saturating_sub(self.reserved);
            available >= kv_need + adapter_load
        } else {
            let kv_ok =
                (self.pool.free_for(PageKind::Kv) as u64).saturating_sub(self.reserved) >= kv_need;
            let adapter_ok = adapter_load == 0
                || (self.pool.free_for(PageKind::Adapter) as u64 + self.adapters.evictable_pages())
                    .saturating_sub(own_evictable)
                    >= adapter_load;
            kv_ok && adapter_ok
        }
    }

    fn admit(&mut self, budget: &mut u32, plan: &mut StepPlan) {
        let newest_first = match self.cfg.early_abort {
            Some(ea) if ea.newest_first_under_overload => self.overload.observe(self.waiting.len()),
            _ => false,
        };
        let mut admitted = 0usize;
        // Plain queue order looks at the head only; clustering, the adapter cap and VTC choose
        // among `lookahead` candidates.
        let simple =
            !self.cfg.clustering && self.cfg.max_adapters_per_batch.is_none() && self.vtc.is_none();
        let lookahead = if simple {
            1
        } else {
            self.cfg.lookahead as usize
        };
        while (self.running.len() as u32) < self.cfg.max_batch_size && *budget > 0 {
            self.fill_candidates(lookahead, newest_first);
            let Some(seq) = self.choose() else { break };
            let w = &self.waiting[&seq];
            let target = w.meta.prompt_tokens + w.generated;
            let chunk = if self.cfg.chunked_prefill {
                target.min(*budget)
            } else if target <= *budget || *budget == self.cfg.max_prefill_tokens {
                // A recomputed prompt may exceed the budget; it then runs as the only prefill.
                target
            } else {
                break;
            };
            if !self.fits(w, chunk) {
                break;
            }
            let Some(w) = self.dequeue(seq) else { break };
            self.start_running(w, chunk, plan);
            *budget = budget.saturating_sub(chunk);
            admitted += 1;
        }
        if self
            .cfg
            .early_abort
            .is_some_and(|ea| ea.newest_first_under_overload)
        {
            self.overload.admitted(admitted, self.waiting.len());
        }
    }

    fn start_running(&mut self, w: Waiting, chunk: u32, plan: &mut StepPlan) {
        if let Some(a) = w.meta.adapter {
            if self.adapters.residency(a) == Residency::Host {
                let need = self.adapters.pages_needed(a);
                let room = self.reclaim(PageKind::Adapter, need, plan);
                debug_assert!(room, "admission checked the adapter's pages");
                self.issue_load(a, true, plan);
            }
            self.adapters.pin(a);
        }
        let target = w.meta.prompt_tokens + w.generated;
        if let Some(vtc) = self.vtc.as_mut() {
            if w.preemptions == 0 {
                vtc.charge_input(w.client, w.meta.prompt_tokens);
            }
        }
        if self.cfg.admission == Admission::Conservative {
            self.reserved += w.meta.worst_case_pages();
        }
        self.running.push(Running {
            meta: w.meta,
            arrival: w.arrival,
            seq: w.seq,
            client: w.client,
            prefill_target: target,
            kv_len: 0,
            generated: w.generated,
            preemptions: w.preemptions,
            rank: w.meta.adapter.map_or(0, |a| self.adapters.rank(a)),
            pages: Vec::with_capacity(w.meta.worst_case_pages().min(1 << 16) as usize),
            work: Work::Idle,
        });
        let index = self.running.len() - 1;
        let room = self.reclaim(PageKind::Kv, chunk, plan);
        // Cannot fail after `fits`; if it did, the request would stay correct, waiting idle.
        let planned = room && self.plan_prefill_chunk(index, chunk, plan);
        debug_assert!(planned, "admission checked the first chunk's pages");
    }

    /// Gives running request `index` the KV pages of its next `chunk` prompt tokens and puts
    /// that chunk in the plan; false, with nothing planned, when the pool has no room.
    fn plan_prefill_chunk(&mut self, index: usize, chunk: u32, plan: &mut StepPlan) -> bool {
        let start = plan.pages.len() as u32;
        let mut pages = std::mem::take(&mut plan.pages);
        let ok = self.alloc_kv(index, chunk, &mut pages);
        plan.pages = pages;
        if !ok {
            return false;
        }
        let r = &mut self.running[index];
        let emits = r.kv_len + chunk == r.prefill_target;
        r.work = Work::Prefill {
            tokens: chunk,
            emits,
        };
        plan.prefill.push(PrefillWork {
            request: r.meta.id,
            adapter: r.meta.adapter,
            context_start: r.kv_len,
            tokens: chunk,
            pages: PageSpan { start, len: chunk },
            emits_token: emits,
        });
        true
    }

    fn issue_load(&mut self, adapter: AdapterId, blocking: bool, plan: &mut StepPlan) -> bool {
        if !self.adapters.begin_load(adapter, &mut self.pool) {
            return false;
        }
        let pages = self.adapters.pages(adapter);
        let start = plan.pages.len() as u32;
        plan.pages.extend_from_slice(pages);
        let bytes = self.adapters.weight_bytes(adapter);
        self.counters.adapter_loads += 1;
        self.counters.adapter_load_bytes += bytes;
        plan.loads.push(AdapterLoad {
            adapter,
            rank: self.adapters.rank(adapter),
            bytes,
            pages: PageSpan {
                start,
                len: pages.len() as u32,
            },
            blocking,
        });
        true
    }

    /// Starts loads for the adapters of upcoming requests, using only pages that neither
    /// running requests (their reservation) nor a fellow region may claim; never evicts.
    fn prefetch(&mut self, plan: &mut StepPlan) {
        if self.cfg.prefetch_depth == 0 || self.waiting.is_empty() {
            return;
        }
        self.fill_candidates(self.cfg.prefetch_depth as usize, false);
        let candidates = std::mem::take(&mut self.candidates);
        for &seq in &candidates {
            let Some(adapter) = self.waiting[&seq].meta.adapter else {
                continue;
            };
            if self.adapters.residency(adapter) != Residency::Host {
                continue;
            }
            let need = self.adapters.pages_needed(adapter) as u64;
            let free = self.pool.free_for(PageKind::Adapter) as u64;
            let spare = if self.pool.is_unified() {
                free.saturating_sub(self.reserved)
            } else {
                free
            };
            if spare < need {
                break;
            }
            self.issue_load(adapter, false, plan);
        }
        self.candidates = candidates;
    }

    /// Applies a completed step: tokens are emitted, finished requests release their pages and
    /// adapters, loads become resident. `now` is when the step's tokens became available;
    /// today's policies decide on plan-time `now` only, but both drivers pass it so a policy
    /// that needs completion times (e.g. a measured step-time estimate) changes no driver.
    pub fn complete_step(
        &mut self,
        report: &StepReport,
        _now: Nanos,
    ) -> Result<StepOutcome, EngineError> {
        if self.in_flight != Some(report.step) {
            return Err(EngineError::StepMismatch {
                reported: report.step,
                in_flight: self.in_flight,
            });
        }
        self.in_flight = None;
        self.step += 1;
        self.counters.steps += 1;
        self.adapters.finish_loads();
        let mut outcome = StepOutcome {
            step: report.step,
            emitted: Vec::with_capacity(self.running.len()),
            finished: Vec::new(),
        };
        let mut finished = std::mem::take(&mut self.finished_scratch);
        finished.clear();
        for (i, r) in self.running.iter_mut().enumerate() {
            let emits = match r.work {
                Work::Idle => false,
                Work::Decode => {
                    r.kv_len += 1;
                    true
                }
                Work::Prefill { tokens, emits } => {
                    r.kv_len += tokens;
                    emits
                }
            };
            r.work = Work::Idle;
            if emits {
                outcome.emitted.push(Emitted {
                    request: r.meta.id,
                    adapter: r.meta.adapter,
                    token_index: r.generated,
                });
                r.generated += 1;
                if let Some(vtc) = self.vtc.as_mut() {
                    vtc.charge_output(r.client, 1);
                }
                if r.generated >= r.meta.output_tokens {
                    finished.push(i);
                }
            }
        }
        // Descending, so each swap_remove moves an element that is not itself finished.
        for &i in finished.iter().rev() {
            let r = self.running.swap_remove(i);
            self.pool.free(PageOwner::Kv(r.meta.id), &r.pages);
            if self.cfg.admission == Admission::Conservative {
                self.reserved -= r.worst_case_pages() - r.pages.len() as u64;
            }
            if let Some(a) = r.meta.adapter {
                self.adapters.unpin(a);
            }
            self.live.remove(&r.meta.id);
            self.counters.finished += 1;
            outcome.finished.push(Finished {
                request: r.meta.id,
                adapter: r.meta.adapter,
                prompt_tokens: r.meta.prompt_tokens,
                output_tokens: r.meta.output_tokens,
                arrival: r.arrival,
                preemptions: r.preemptions,
            });
        }
        self.finished_scratch = finished;
        Ok(outcome)
    }

    /// Checks every invariant of the pool, the adapter cache and the scheduler by recounting
    /// from scratch. O(pool + adapters + running). For tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        self.adapters.check_invariants(&self.pool)?;
        let mut pins = vec![0u32; self.adapters.len() as usize];
        let mut reserved = 0u64;
        let mut kv_pages = 0u64;
        for r in &self.running {
            for &p in &r.pages {
                if self
                    .pool
                    .owner(p)
                    .is_some_and(|o| o != PageOwner::Kv(r.meta.id))
                {
                    return Err(format!("{} lists page {p:?} it does not own", r.meta.id));
                }
            }
            kv_pages += r.pages.len() as u64;
            if r.pages.len() as u64 > r.worst_case_pages() {
                return Err(format!(
                    "{} holds more pages than its worst case",
                    r.meta.id
                ));
            }
            reserved += r.worst_case_pages() - r.pages.len() as u64;
            if let Some(a) = r.meta.adapter {
                pins[a.0 as usize] += 1;
                if self.adapters.residency(a) == Residency::Host {
                    return Err(format!("{} runs with {a} not on the device", r.meta.id));
                }
            }
        }
        if kv_pages != self.pool.usage().kv as u64 {
            return Err(format!(
                "running requests hold {kv_pages} KV pages, the pool counts {}",
                self.pool.usage().kv
            ));
        }
        for (i, &n) in pins.iter().enumerate() {
            if self.adapters.pins(AdapterId(i as u32)) != n {
                return Err(format!(
                    "adapter#{i} pinned {} times, used by {n} running",
                    self.adapters.pins(AdapterId(i as u32))
                ));
            }
        }
        if self.cfg.admission == Admission::Conservative {
            if reserved != self.reserved {
                return Err(format!("reserved {} != recount {reserved}", self.reserved));
            }
            if reserved > self.kv_reclaimable() {
                return Err(format!(
                    "running requests may claim {reserved} pages but only {} can be had",
                    self.kv_reclaimable()
                ));
            }
        }
        let live = self.waiting.len() + self.running.len();
        if live != self.live.len() {
            return Err(format!(
                "{} live ids for {live} queued/running requests",
                self.live.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::AdapterSpec;
    use crate::PoolLayout;

    fn scheduler(pool_pages: u32, ranks: &[u32]) -> Scheduler {
        let model = ModelSpec::preset("llama-7b").unwrap();
        Scheduler::new(EngineConfig {
            model,
            adapters: ranks.iter().map(|&r| AdapterSpec::attention(r)).collect(),
            pool_pages,
            pool_layout: PoolLayout::Unified,
            scheduler: SchedulerConfig::default(),
        })
        .unwrap()
    }

    fn step(s: &mut Scheduler, now: Nanos) -> (StepPlan, StepOutcome) {
        let plan = s.plan_step(now).unwrap().unwrap();
        let report = StepReport {
            step: plan.step,
            elapsed: Nanos(1),
        };
        let out = s.complete_step(&report, now).unwrap();
        s.check_invariants().unwrap();
        (plan, out)
    }

    #[test]
    fn conservative_admission_reserves_the_worst_case() {
        // 100 pages; a rank-2 adapter takes 8. Request 0 (worst case 10 + 40 - 1 = 49 pages,
        // plus its adapter) is admitted; request 1 (49 more) would leave no room for request
        // 0's growth, so it waits although 90 pages are free right now.
        let mut s = scheduler(100, &[2]);
        s.submit(RequestMeta::new(0, Some(0), 10, 40), Nanos(0))
            .unwrap();
        s.submit(RequestMeta::new(1, None, 10, 40), Nanos(0))
            .unwrap();
        let (plan, out) = step(&mut s, Nanos(0));
        assert_eq!(plan.prefill.len(), 1);
        assert_eq!(plan.loads.len(), 1);
        assert!(plan.loads[0].blocking);
        assert_eq!(out.emitted.len(), 1);
        assert_eq!(s.reserved, 49 - 10);
        assert_eq!(s.waiting_len(), 1);
        // Request 0 decodes one page per step and never lacks one.
        for _ in 0..39 {
            let (plan, _) = step(&mut s, Nanos(1));
            assert_eq!(plan.decode.len(), 1);
            assert!(plan.prefill.is_empty());
        }
        // Request 0 finished; its adapter stays resident but evictable; request 1 runs.
        assert_eq!(s.counters().finished, 1);
        assert!(s.adapters().is_evictable(AdapterId(0)));
        let (plan, _) = step(&mut s, Nanos(2));
        assert_eq!(plan.prefill[0].request, RequestId(1));
    }

    #[test]
    fn decode_pages_follow_the_prompt_pages() {
        let mut s = scheduler(64, &[]);
        s.submit(RequestMeta::new(7, None, 3, 3), Nanos(0)).unwrap();
        let (plan, _) = step(&mut s, Nanos(0));
        let prompt_pages = plan.pages_of(plan.prefill[0].pages).to_vec();
        assert_eq!(prompt_pages.len(), 3);
        let (plan, _) = step(&mut s, Nanos(1));
        assert_eq!(plan.decode[0].context_len, 3);
        let mut expected = prompt_pages.clone();
        expected.push(plan.decode[0].page);
        assert_eq!(s.pages_of(RequestId(7)).unwrap(), expected.as_slice());
        let (_, out) = step(&mut s, Nanos(2));
        assert_eq!(out.finished.len(), 1);
        assert_eq!(s.pool_usage().kv, 0);
    }
}
