//! Virtual token counters (VTC; Sheng et al., OSDI 2024, Algorithm 2).
//!
//! Each client (an adapter or a tenant) has a counter of the weighted service it received:
//! `input_weight` per prompt token at admission and `output_weight` per generated token,
//! divided by the client's weight. The backlogged client with the smallest counter is served
//! next. A client that becomes backlogged has its counter lifted to the smallest counter among
//! backlogged clients (or, when none are, to the counter of the last client that left the
//! queue), so idling never banks credit. This bounds the service gap between two backlogged
//! clients by a constant (the paper's Theorem 4.4).
//!
//! Counters are `f64`: IEEE arithmetic is deterministic, so runs stay reproducible.

use crate::config::{FairnessConfig, FairnessKey};
use crate::request::RequestMeta;
use std::collections::BTreeSet;

#[derive(Debug)]
pub(crate) struct VirtualTokenCounters {
    key: FairnessKey,
    input_weight: f64,
    output_weight: f64,
    counters: Vec<f64>,
    weights: Vec<f64>,
    /// Waiting requests of each client, by queue sequence number (oldest first).
    waiting: Vec<BTreeSet<u64>>,
    backlogged: BTreeSet<u32>,
    last_left: f64,
    configured_weights: Vec<(u32, f64)>,
}

impl VirtualTokenCounters {
    pub(crate) fn new(cfg: &FairnessConfig) -> Self {
        VirtualTokenCounters {
            key: cfg.key,
            input_weight: cfg.input_weight,
            output_weight: cfg.output_weight,
            counters: Vec::new(),
            weights: Vec::new(),
            waiting: Vec::new(),
            backlogged: BTreeSet::new(),
            last_left: 0.0,
            configured_weights: cfg.weights.clone(),
        }
    }

    /// The client a request is accounted to. Under adapter keying, base-model requests (no
    /// adapter) are client 0 and adapter `i` is client `i + 1`; `weights` still name adapters
    /// by their id (`ensure` applies the shift). Under tenant keying, no tenant is tenant 0.
    pub(crate) fn client_of(&self, meta: &RequestMeta) -> u32 {
        match self.key {
            FairnessKey::Adapter => meta.adapter.map_or(0, |a| a.0 + 1),
            FairnessKey::Tenant => meta.tenant.map_or(0, |t| t.0),
        }
    }

    fn ensure(&mut self, client: u32) {
        let need = client as usize + 1;
        if self.counters.len() < need {
            self.counters.resize(need, 0.0);
            self.waiting.resize_with(need, BTreeSet::new);
            let old = self.weights.len();
            self.weights.resize(need, 1.0);
            for &(id, w) in &self.configured_weights {
                let index = match self.key {
                    FairnessKey::Adapter => id as usize + 1,
                    FairnessKey::Tenant => id as usize,
                };
                if index >= old && index < need {
                    self.weights[index] = w;
                }
            }
        }
    }

    pub(crate) fn counter(&self, client: u32) -> f64 {
        self.counters.get(client as usize).copied().unwrap_or(0.0)
    }

    pub(crate) fn enqueue(&mut self, client: u32, seq: u64) {
        self.ensure(client);
        let c = client as usize;
        if self.waiting[c].is_empty() {
            let floor = self
                .backlogged
                .iter()
                .map(|&b| self.counters[b as usize])
                .reduce(f64::min)
                .unwrap_or(self.last_left);
            self.counters[c] = self.counters[c].max(floor);
            self.backlogged.insert(client);
        }
        self.waiting[c].insert(seq);
    }

    pub(crate) fn dequeue(&mut self, client: u32, seq: u64) {
        let c = client as usize;
        if let Some(set) = self.waiting.get_mut(c) {
            set.remove(&seq);
            if set.is_empty() {
                self.backlogged.remove(&client);
                self.last_left = self.counters[c];
            }
        }
    }

    pub(crate) fn charge_input(&mut self, client: u32, tokens: u32) {
        self.ensure(client);
        let c = client as usize;
        self.counters[c] += self.input_weight * tokens as f64 / self.weights[c];
    }

    pub(crate) fn charge_output(&mut self, client: u32, tokens: u32) {
        self.ensure(client);
        let c = client as usize;
        self.counters[c] += self.output_weight * tokens as f64 / self.weights[c];
    }

    /// The oldest waiting request of up to `limit` backlogged clients, smallest counter first
    /// (ties: smaller client id). O(backlogged clients).
    pub(crate) fn candidates(
        &self,
        limit: usize,
        scratch: &mut Vec<(f64, u32)>,
        out: &mut Vec<u64>,
    ) {
        scratch.clear();
        scratch.extend(
            self.backlogged
                .iter()
                .map(|&c| (self.counters[c as usize], c)),
        );
        let by_counter = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if scratch.len() > limit {
            scratch.select_nth_unstable_by(limit, by_counter);
            scratch.truncate(limit);
        }
        scratch.sort_unstable_by(by_counter);
        out.extend(
            scratch
                .iter()
                .filter_map(|&(_, c)| self.waiting[c as usize].first().copied()),
        );
    }
}
