//! The page pool: the mechanism under the adapter cache and the scheduler.
//!
//! One array of page owners and one free list per *region*. In the unified layout (S-LoRA)
//! there is one region, so KV pages of requests and weight pages of adapters come from the
//! same free list and either can use all of the memory. In the separate layout (S-LoRA's
//! ablation, and what servers without unified paging do) a fixed number of pages is set aside
//! for adapters and the rest for KV; the code is the same, only the region a kind of page
//! draws from differs.
//!
//! Invariants (checked by [`PagePool::check_invariants`], which the property tests call):
//! every page is either on exactly one free list or has exactly one owner; the counters equal
//! a recount of the owners; `kv + adapter + free == capacity`.
//!
//! The owner table exists in debug builds only (where tests re-check every invariant after
//! every step): in release the hot path is a stack pop or push and a counter, and writes no
//! per-page table, whose random stores cost more than the rest of a decode step together.
//!
//! Complexity: allocating or freeing a page is O(1) (a stack push or pop). Pages are handed out in whatever order they were freed: allocation is
//! deliberately non-contiguous, which the executor's gather kernels support.

use crate::request::RequestId;
use crate::spec::AdapterId;
use serde::{Deserialize, Serialize};

/// Index of a page in the pool (the same index in the K-side and V-side buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PageId(pub u32);

/// Who holds a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageOwner {
    Free,
    Kv(RequestId),
    Adapter(AdapterId),
}

/// How the pool's pages are divided between KV cache and adapter weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolLayout {
    /// One free list for both (S-LoRA's unified paging).
    Unified,
    /// `adapter_pages` pages reserved for adapter weights, the rest for KV.
    Separate { adapter_pages: u32 },
}

/// Which kind of page an allocation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    Kv,
    Adapter,
}

/// Page counts at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub capacity: u32,
    pub kv: u32,
    pub adapter: u32,
    pub free: u32,
}

/// Per-page owners, tracked in debug builds only (see the module doc).
#[derive(Debug)]
struct OwnerTable {
    #[cfg(debug_assertions)]
    owners: Vec<PageOwner>,
}

impl OwnerTable {
    fn new(_capacity: u32) -> Self {
        OwnerTable {
            #[cfg(debug_assertions)]
            owners: vec![PageOwner::Free; _capacity as usize],
        }
    }

    #[inline]
    fn set(&mut self, _page: PageId, _owner: PageOwner) {
        #[cfg(debug_assertions)]
        {
            self.owners[_page.0 as usize] = _owner;
        }
    }

    /// Replaces an owner, checking the old one (debug builds).
    #[inline]
    fn release(&mut self, _page: PageId, _expected: PageOwner) {
        #[cfg(debug_assertions)]
        {
            let slot = &mut self.owners[_page.0 as usize];
            debug_assert_eq!(*slot, _expected, "page {_page:?} freed by a non-owner");
            *slot = PageOwner::Free;
        }
    }

    fn get(&self, _page: PageId) -> Option<PageOwner> {
        #[cfg(debug_assertions)]
        {
            self.owners.get(_page.0 as usize).copied()
        }
        #[cfg(not(debug_assertions))]
        {
            None
        }
    }
}

#[derive(Debug)]
pub struct PagePool {
    capacity: u32,
    owners: OwnerTable,
    /// `free[0]` serves KV (and adapters when unified); `free[1]` serves adapters when separate.
    free: [Vec<PageId>; 2],
    region_capacity: [u32; 2],
    separate: bool,
    kv: u32,
    adapter: u32,
}

impl PagePool {
    /// A pool of `capacity` pages. The caller (engine config) has validated the layout.
    pub(crate) fn new(capacity: u32, layout: PoolLayout) -> PagePool {
        let (separate, adapter_region) = match layout {
            PoolLayout::Unified => (false, 0),
            PoolLayout::Separate { adapter_pages } => (true, adapter_pages.min(capacity)),
        };
        let kv_region = capacity - adapter_region;
        // Reverse so that the first pages handed out are 0, 1, 2, ...: easier to read in tests.
        let kv_free: Vec<PageId> = (0..kv_region).rev().map(PageId).collect();
        let adapter_free: Vec<PageId> = (kv_region..capacity).rev().map(PageId).collect();
        PagePool {
            capacity,
            owners: OwnerTable::new(capacity),
            free: [kv_free, adapter_free],
            region_capacity: [kv_region, adapter_region],
            separate,
            kv: 0,
            adapter: 0,
        }
    }

    fn list(&self, kind: PageKind) -> usize {
        match kind {
            PageKind::Adapter if self.separate => 1,
            _ => 0,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn is_unified(&self) -> bool {
        !self.separate
    }

    /// Pages of the region that serves `kind`.
    pub fn region_capacity(&self, kind: PageKind) -> u32 {
        if self.separate {
            self.region_capacity[self.list(kind)]
        } else {
            self.capacity()
        }
    }

    /// Free pages available to an allocation of `kind`.
    pub fn free_for(&self, kind: PageKind) -> u32 {
        self.free[self.list(kind)].len() as u32
    }

    pub fn usage(&self) -> PoolUsage {
        PoolUsage {
            capacity: self.capacity(),
            kv: self.kv,
            adapter: self.adapter,
            free: (self.free[0].len() + self.free[1].len()) as u32,
        }
    }

    /// Who holds a page; `None` in release builds, which do not track owners.
    pub fn owner(&self, page: PageId) -> Option<PageOwner> {
        self.owners.get(page)
    }

    /// Allocates `n` pages for `owner`, appending them to `out`; all or nothing.
    /// Returns false (and allocates nothing) when the region has fewer than `n` free pages.
    pub(crate) fn alloc(&mut self, owner: PageOwner, n: u32, out: &mut Vec<PageId>) -> bool {
        let kind = match owner {
            PageOwner::Kv(_) => PageKind::Kv,
            PageOwner::Adapter(_) => PageKind::Adapter,
            PageOwner::Free => return n == 0,
        };
        let list = self.list(kind);
        if (self.free[list].len() as u64) < n as u64 {
            return false;
        }
        for _ in 0..n {
            // Checked above: the list holds at least n pages.
            let Some(page) = self.free[list].pop() else {
                return false;
            };
            self.owners.set(page, owner);
            out.push(page);
        }
        match kind {
            PageKind::Kv => self.kv += n,
            PageKind::Adapter => self.adapter += n,
        }
        true
    }

    /// Allocates one KV page: the decode fast path (one per running request per step).
    #[inline]
    pub(crate) fn alloc_kv_page(&mut self, request: RequestId) -> Option<PageId> {
        let page = self.free[0].pop()?;
        self.owners.set(page, PageOwner::Kv(request));
        self.kv += 1;
        Some(page)
    }

    /// Returns pages to their free list. Each page must be owned by `owner`; a page that is
    /// not is a bug in the engine, caught by `debug_assert` and by `check_invariants`.
    pub(crate) fn free(&mut self, owner: PageOwner, pages: &[PageId]) {
        let kind = match owner {
            PageOwner::Kv(_) => PageKind::Kv,
            PageOwner::Adapter(_) => PageKind::Adapter,
            PageOwner::Free => return,
        };
        let list = self.list(kind);
        for &page in pages {
            self.owners.release(page, owner);
            self.free[list].push(page);
        }
        let n = pages.len() as u32;
        match kind {
            PageKind::Kv => self.kv -= n,
            PageKind::Adapter => self.adapter -= n,
        }
    }

    /// Recounts everything from scratch; O(capacity). For tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        let capacity = self.capacity as usize;
        let mut on_free_list = vec![false; capacity];
        for (list, pages) in self.free.iter().enumerate() {
            for &p in pages {
                let i = p.0 as usize;
                if i >= capacity {
                    return Err(format!("free list {list} holds out-of-range page {i}"));
                }
                if on_free_list[i] {
                    return Err(format!("page {i} is on a free list twice"));
                }
                on_free_list[i] = true;
                let kv_region = self.region_capacity[0];
                if self.separate && ((i as u32) < kv_region) != (list == 0) {
                    return Err(format!("page {i} is on the wrong region's free list"));
                }
            }
        }
        let free = on_free_list.iter().filter(|&&f| f).count() as u32;
        let u = self.usage();
        if u.kv + u.adapter + free != u.capacity {
            return Err(format!(
                "counters {u:?} do not sum to capacity ({free} free-listed)"
            ));
        }
        // With an owner table (debug builds): every page is free-listed xor owned, and the
        // counters equal a recount.
        if self.owner(PageId(0)).is_some() {
            let (mut kv, mut adapter) = (0u32, 0u32);
            for (i, &listed) in on_free_list.iter().enumerate() {
                match self.owner(PageId(i as u32)) {
                    Some(PageOwner::Free) if !listed => {
                        return Err(format!("page {i} is free but on no free list (leaked)"))
                    }
                    Some(PageOwner::Free) | None => {}
                    Some(owner) if listed => {
                        return Err(format!("page {i} is free-listed but owned by {owner:?}"))
                    }
                    Some(PageOwner::Kv(_)) => kv += 1,
                    Some(PageOwner::Adapter(_)) => adapter += 1,
                }
            }
            if kv != self.kv || adapter != self.adapter {
                return Err(format!(
                    "counters say kv={} adapter={}, recount says kv={kv} adapter={adapter}",
                    self.kv, self.adapter
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_and_adapter_pages_share_one_free_list_when_unified() {
        let mut pool = PagePool::new(10, PoolLayout::Unified);
        let mut pages = Vec::new();
        assert!(pool.alloc(PageOwner::Adapter(AdapterId(1)), 4, &mut pages));
        let mut kv = Vec::new();
        assert!(pool.alloc(PageOwner::Kv(RequestId(7)), 6, &mut kv));
        assert_eq!(
            pool.usage(),
            PoolUsage {
                capacity: 10,
                kv: 6,
                adapter: 4,
                free: 0
            }
        );
        // Nothing left for either kind.
        assert!(!pool.alloc(PageOwner::Kv(RequestId(8)), 1, &mut kv));
        pool.free(PageOwner::Adapter(AdapterId(1)), &pages);
        assert!(pool.alloc(PageOwner::Kv(RequestId(8)), 4, &mut Vec::new()));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn separate_layout_keeps_regions_apart() {
        let mut pool = PagePool::new(10, PoolLayout::Separate { adapter_pages: 3 });
        assert_eq!(pool.free_for(PageKind::Kv), 7);
        assert_eq!(pool.free_for(PageKind::Adapter), 3);
        let mut pages = Vec::new();
        assert!(!pool.alloc(PageOwner::Adapter(AdapterId(0)), 4, &mut pages));
        assert!(pages.is_empty(), "a failed allocation takes nothing");
        assert!(pool.alloc(PageOwner::Adapter(AdapterId(0)), 3, &mut pages));
        assert!(pages.iter().all(|p| p.0 >= 7));
        // KV cannot use the adapter region even when it is free.
        let mut kv = Vec::new();
        assert!(!pool.alloc(PageOwner::Kv(RequestId(1)), 8, &mut kv));
        assert!(pool.alloc(PageOwner::Kv(RequestId(1)), 7, &mut kv));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn freed_pages_are_reused_non_contiguously() {
        let mut pool = PagePool::new(8, PoolLayout::Unified);
        let mut a = Vec::new();
        assert!(pool.alloc(PageOwner::Kv(RequestId(1)), 8, &mut a));
        pool.free(PageOwner::Kv(RequestId(1)), &[a[1], a[5], a[3]]);
        let mut b = Vec::new();
        assert!(pool.alloc(PageOwner::Kv(RequestId(2)), 3, &mut b));
        b.sort();
        assert_eq!(b, vec![PageId(1), PageId(3), PageId(5)]);
        pool.check_invariants().unwrap();
    }
}
