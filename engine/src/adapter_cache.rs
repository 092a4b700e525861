//! Which adapters are on the device, and which may leave.
//!
//! Every registered adapter is in one of three states: `Host` (weights only in host memory),
//! `Loading` (pages assigned, host-to-device copy issued in the current step) or `Resident`.
//! A resident adapter is *pinned* while at least one running request uses it and can then
//! never be evicted. Unpinned resident adapters form the eviction set, ordered by a logical
//! use counter (LRU without a clock: the counter ticks whenever an adapter is released).
//!
//! Complexity: pin/unpin O(log n) (the eviction set is a `BTreeSet`), evicting the least
//! recently used adapter O(log n + pages), everything else O(1).

use crate::pool::{PageId, PageOwner, PagePool};
use crate::spec::{AdapterId, AdapterSpec, ModelSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    Host,
    Loading,
    Resident,
}

/// Per-adapter counters for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterStats {
    pub loads: u32,
    pub evictions: u32,
}

#[derive(Debug)]
struct Entry {
    rank: u32,
    pages_needed: u32,
    weight_bytes: u64,
    state: Residency,
    pages: Vec<PageId>,
    pins: u32,
    last_used: u64,
    stats: AdapterStats,
}

#[derive(Debug)]
pub struct AdapterCache {
    entries: Vec<Entry>,
    /// Resident, unpinned adapters by `(last_used, id)`: the first is the LRU victim.
    evictable: BTreeSet<(u64, u32)>,
    evictable_pages: u64,
    loading: Vec<AdapterId>,
    use_clock: u64,
    pinned_adapters: u32,
    pinned_rank_sum: u64,
}

impl AdapterCache {
    /// The specs have been validated by the engine config.
    pub(crate) fn new(model: &ModelSpec, specs: &[AdapterSpec]) -> AdapterCache {
        let entries = specs
            .iter()
            .map(|s| Entry {
                rank: s.rank,
                pages_needed: s.pages(model).min(u32::MAX as u64) as u32,
                weight_bytes: s.weight_bytes(model),
                state: Residency::Host,
                pages: Vec::new(),
                pins: 0,
                last_used: 0,
                stats: AdapterStats::default(),
            })
            .collect();
        AdapterCache {
            entries,
            evictable: BTreeSet::new(),
            evictable_pages: 0,
            loading: Vec::new(),
            use_clock: 0,
            pinned_adapters: 0,
            pinned_rank_sum: 0,
        }
    }

    pub fn len(&self) -> u32 {
        self.entries.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, id: AdapterId) -> &Entry {
        &self.entries[id.0 as usize]
    }

    pub fn contains(&self, id: AdapterId) -> bool {
        (id.0 as usize) < self.entries.len()
    }

    pub fn residency(&self, id: AdapterId) -> Residency {
        self.entry(id).state
    }

    /// Loading or resident: usable by a step without a new load.
    pub fn is_on_device(&self, id: AdapterId) -> bool {
        self.entry(id).state != Residency::Host
    }

    pub fn rank(&self, id: AdapterId) -> u32 {
        self.entry(id).rank
    }

    pub fn pages_needed(&self, id: AdapterId) -> u32 {
        self.entry(id).pages_needed
    }

    pub fn weight_bytes(&self, id: AdapterId) -> u64 {
        self.entry(id).weight_bytes
    }

    pub fn pages(&self, id: AdapterId) -> &[PageId] {
        &self.entry(id).pages
    }

    pub fn pins(&self, id: AdapterId) -> u32 {
        self.entry(id).pins
    }

    pub fn is_pinned(&self, id: AdapterId) -> bool {
        self.entry(id).pins > 0
    }

    /// Distinct adapters used by running requests.
    pub fn pinned_adapters(&self) -> u32 {
        self.pinned_adapters
    }

    /// Sum of the ranks of the adapters running requests use (their weights are read once
    /// per step by the LoRA kernels).
    pub fn pinned_rank_sum(&self) -> u64 {
        self.pinned_rank_sum
    }

    /// Pages held by resident adapters that no running request uses.
    pub fn evictable_pages(&self) -> u64 {
        self.evictable_pages
    }

    /// Whether `id` is resident and could be evicted (so its pages count as reclaimable).
    pub fn is_evictable(&self, id: AdapterId) -> bool {
        let e = self.entry(id);
        e.state == Residency::Resident && e.pins == 0
    }

    pub fn stats(&self, id: AdapterId) -> AdapterStats {
        self.entry(id).stats
    }

    pub fn max_pages_needed(&self) -> u32 {
        self.entries
            .iter()
            .map(|e| e.pages_needed)
            .max()
            .unwrap_or(0)
    }

    pub(crate) fn pin(&mut self, id: AdapterId) {
        let e = &mut self.entries[id.0 as usize];
        e.pins += 1;
        if e.pins == 1 {
            self.pinned_adapters += 1;
            self.pinned_rank_sum += e.rank as u64;
            if e.state == Residency::Resident && self.evictable.remove(&(e.last_used, id.0)) {
                self.evictable_pages -= e.pages_needed as u64;
            }
        }
    }

    pub(crate) fn unpin(&mut self, id: AdapterId) {
        let e = &mut self.entries[id.0 as usize];
        debug_assert!(e.pins > 0, "{id} unpinned more often than pinned");
        e.pins = e.pins.saturating_sub(1);
        if e.pins == 0 {
            self.pinned_adapters -= 1;
            self.pinned_rank_sum -= e.rank as u64;
            self.use_clock += 1;
            e.last_used = self.use_clock;
            if e.state == Residency::Resident {
                self.evictable.insert((e.last_used, id.0));
                self.evictable_pages += e.pages_needed as u64;
            }
        }
    }

    /// Evicts the least recently used unpinned resident adapter, freeing its pages.
    pub(crate) fn evict_lru(&mut self, pool: &mut PagePool) -> Option<AdapterId> {
        let (_, raw) = self.evictable.pop_first()?;
        let id = AdapterId(raw);
        let e = &mut self.entries[raw as usize];
        self.evictable_pages -= e.pages_needed as u64;
        pool.free(PageOwner::Adapter(id), &e.pages);
        e.pages.clear();
        e.state = Residency::Host;
        e.stats.evictions += 1;
        Some(id)
    }

    /// Assigns pages to a host-only adapter and marks it loading; the caller puts the load in
    /// the step plan. Returns false (changing nothing) when the region lacks free pages.
    pub(crate) fn begin_load(&mut self, id: AdapterId, pool: &mut PagePool) -> bool {
        let e = &mut self.entries[id.0 as usize];
        debug_assert_eq!(e.state, Residency::Host);
        if !pool.alloc(PageOwner::Adapter(id), e.pages_needed, &mut e.pages) {
            return false;
        }
        e.state = Residency::Loading;
        e.stats.loads += 1;
        self.loading.push(id);
        true
    }

    /// The step that issued the loads has completed: its adapters are resident.
    pub(crate) fn finish_loads(&mut self) {
        for id in self.loading.drain(..) {
            let e = &mut self.entries[id.0 as usize];
            e.state = Residency::Resident;
            if e.pins == 0 {
                self.use_clock += 1;
                e.last_used = self.use_clock;
                self.evictable.insert((e.last_used, id.0));
                self.evictable_pages += e.pages_needed as u64;
            }
        }
    }

    /// Checks the eviction set against the entries; O(n). For tests.
    pub fn check_invariants(&self, pool: &PagePool) -> Result<(), String> {
        let mut pinned = 0;
        let mut evictable_pages = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            let id = AdapterId(i as u32);
            let in_set = self.evictable.contains(&(e.last_used, i as u32));
            let should = e.state == Residency::Resident && e.pins == 0;
            if in_set != should {
                return Err(format!(
                    "{id}: in eviction set = {in_set}, should be {should}"
                ));
            }
            if should {
                evictable_pages += e.pages_needed as u64;
            }
            if e.pins > 0 {
                pinned += 1;
                if e.state == Residency::Host {
                    return Err(format!(
                        "{id} is pinned by a running request but not on the device"
                    ));
                }
            }
            let expect_pages = if e.state == Residency::Host {
                0
            } else {
                e.pages_needed as usize
            };
            if e.pages.len() != expect_pages {
                return Err(format!(
                    "{id} holds {} pages, expected {expect_pages}",
                    e.pages.len()
                ));
            }
            for &p in &e.pages {
                if pool.owner(p).is_some_and(|o| o != PageOwner::Adapter(id)) {
                    return Err(format!(
                        "{id} lists page {p:?} owned by {:?}",
                        pool.owner(p)
                    ));
                }
            }
        }
        if pinned != self.pinned_adapters {
            return Err(format!(
                "pinned count {} != recount {pinned}",
                self.pinned_adapters
            ));
        }
        if evictable_pages != self.evictable_pages {
            return Err(format!(
                "evictable pages {} != recount {evictable_pages}",
                self.evictable_pages
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolLayout;

    fn setup(n: u32, pool_pages: u32) -> (AdapterCache, PagePool) {
        let model = ModelSpec::preset("llama-7b").unwrap();
        let specs: Vec<_> = (0..n).map(|_| AdapterSpec::attention(1)).collect();
        (
            AdapterCache::new(&model, &specs),
            PagePool::new(pool_pages, PoolLayout::Unified),
        )
    }

    #[test]
    fn lru_evicts_the_adapter_released_longest_ago() {
        let (mut cache, mut pool) = setup(3, 12);
        for i in 0..3 {
            assert!(cache.begin_load(AdapterId(i), &mut pool));
        }
        cache.finish_loads();
        for i in [2, 0, 1] {
            cache.pin(AdapterId(i));
        }
        for i in [0, 2, 1] {
            cache.unpin(AdapterId(i));
        }
        assert_eq!(cache.evict_lru(&mut pool), Some(AdapterId(0)));
        assert_eq!(cache.evict_lru(&mut pool), Some(AdapterId(2)));
        assert_eq!(cache.residency(AdapterId(2)), Residency::Host);
        assert_eq!(
            cache.stats(AdapterId(2)),
            AdapterStats {
                loads: 1,
                evictions: 1
            }
        );
        cache.check_invariants(&pool).unwrap();
        pool.check_invariants().unwrap();
    }

    #[test]
    fn pinned_and_loading_adapters_are_never_evicted() {
        let (mut cache, mut pool) = setup(2, 8);
        assert!(cache.begin_load(AdapterId(0), &mut pool));
        assert!(cache.begin_load(AdapterId(1), &mut pool));
        assert_eq!(cache.evict_lru(&mut pool), None, "loading adapters stay");
        cache.pin(AdapterId(0));
        cache.finish_loads();
        assert_eq!(cache.evict_lru(&mut pool), Some(AdapterId(1)));
        assert_eq!(cache.evict_lru(&mut pool), None, "pinned adapter stays");
        assert_eq!(cache.pinned_adapters(), 1);
        cache.check_invariants(&pool).unwrap();
    }

    #[test]
    fn a_load_without_room_changes_nothing() {
        let (mut cache, mut pool) = setup(3, 6);
        assert!(cache.begin_load(AdapterId(0), &mut pool));
        assert!(!cache.begin_load(AdapterId(1), &mut pool));
        assert_eq!(cache.residency(AdapterId(1)), Residency::Host);
        assert_eq!(pool.usage().adapter, 4);
        cache.check_invariants(&pool).unwrap();
    }
}
