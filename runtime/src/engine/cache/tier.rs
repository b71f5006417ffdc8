//! One memory tier's bookkeeping: what is resident, how many bytes, and the least-recently
//! used order. The data itself lives in the index; this only decides what to evict.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Where a step's activation cache can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Resident for one worker (its device memory; for a CPU worker, its own tier in host
    /// memory).
    Device(usize),
    /// Shared host memory.
    Host,
    /// The template's folder on disk.
    Disk,
}

impl Tier {
    /// The `tier` label of the cache metrics.
    pub fn label(self) -> &'static str {
        match self {
            Tier::Device(_) => "device",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }
}

/// Least-recently-used order by bytes under a budget.
pub(super) struct Lru<K> {
    budget: u64,
    bytes: u64,
    /// A use counter: higher is more recent.
    clock: u64,
    order: BTreeMap<u64, K>,
    /// Key -> (last use, bytes charged when it came in).
    resident: HashMap<K, (u64, u64)>,
}

impl<K: Clone + Eq + Hash> Lru<K> {
    pub(super) fn new(budget: u64) -> Lru<K> {
        Lru {
            budget,
            bytes: 0,
            clock: 0,
            order: BTreeMap::new(),
            resident: HashMap::new(),
        }
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.resident.len()
    }

    #[cfg(test)]
    pub(super) fn contains(&self, key: &K) -> bool {
        self.resident.contains_key(key)
    }

    /// Adds `key` as the most recent (a key already in only moves up).
    pub(super) fn insert(&mut self, key: K, bytes: u64) {
        if self.touch(&key) {
            return;
        }
        self.clock += 1;
        self.order.insert(self.clock, key.clone());
        self.resident.insert(key, (self.clock, bytes));
        self.bytes += bytes;
    }

    /// Marks `key` as just used; false if it is not resident.
    pub(super) fn touch(&mut self, key: &K) -> bool {
        let Some((tick, _)) = self.resident.get_mut(key) else {
            return false;
        };
        self.clock += 1;
        if let Some(k) = self.order.remove(tick) {
            self.order.insert(self.clock, k);
        }
        *tick = self.clock;
        true
    }

    /// Forgets `key`; answers the bytes it had been charged.
    pub(super) fn remove(&mut self, key: &K) -> Option<u64> {
        let (tick, bytes) = self.resident.remove(key)?;
        self.order.remove(&tick);
        self.bytes -= bytes;
        Some(bytes)
    }

    /// The keys to evict to come back within budget: least recently used first, skipping
    /// those `evictable` refuses (pinned, or with no other copy). Fewer than needed when too
    /// much is refused; the tier then stays over budget. Removes nothing.
    pub(super) fn victims(&self, mut evictable: impl FnMut(&K) -> bool) -> Vec<K> {
        let mut bytes = self.bytes;
        let mut out = Vec::new();
        for key in self.order.values() {
            if bytes <= self.budget {
                break;
            }
            if evictable(key) {
                bytes -= self.resident[key].1;
                out.push(key.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evict_all(lru: &mut Lru<&'static str>, pinned: &[&str]) -> Vec<&'static str> {
        let victims = lru.victims(|k| !pinned.contains(k));
        for v in &victims {
            lru.remove(v);
        }
        victims
    }

    #[test]
    fn evicts_least_recently_used_by_bytes_until_within_budget() {
        let mut lru = Lru::new(25);
        lru.insert("a", 10);
        lru.insert("b", 10);
        lru.insert("c", 10);
        assert_eq!(lru.bytes(), 30);
        assert_eq!(evict_all(&mut lru, &[]), vec!["a"]);
        assert_eq!(lru.bytes(), 20);
        // Using b makes c the oldest.
        assert!(lru.touch(&"b"));
        lru.insert("d", 20);
        assert_eq!(evict_all(&mut lru, &[]), vec!["c", "b"]);
        assert_eq!((lru.bytes(), lru.len()), (20, 1));
    }

    #[test]
    fn a_large_entry_evicts_several_small_ones() {
        let mut lru = Lru::new(100);
        for k in ["a", "b", "c", "d"] {
            lru.insert(k, 20);
        }
        lru.insert("big", 70);
        assert_eq!(evict_all(&mut lru, &[]), vec!["a", "b", "c"]);
        assert_eq!(lru.bytes(), 90);
    }

    #[test]
    fn pinned_entries_are_skipped_and_the_tier_may_stay_over_budget() {
        let mut lru = Lru::new(15);
        lru.insert("a", 10);
        lru.insert("b", 10);
        lru.insert("c", 10);
        assert_eq!(evict_all(&mut lru, &["a"]), vec!["b", "c"]);
        assert!(lru.contains(&"a"));
        assert!(evict_all(&mut lru, &["a"]).is_empty());
        lru.insert("d", 10);
        assert_eq!(evict_all(&mut lru, &["a", "d"]), Vec::<&str>::new());
        assert_eq!(lru.bytes(), 20, "over budget: everything left is pinned");
    }

    #[test]
    fn reinserting_charges_once_and_remove_uncharges() {
        let mut lru = Lru::new(100);
        lru.insert("a", 10);
        lru.insert("a", 10);
        assert_eq!(lru.bytes(), 10);
        assert_eq!(lru.remove(&"a"), Some(10));
        assert_eq!(lru.remove(&"a"), None);
        assert!(!lru.touch(&"a"));
        assert_eq!((lru.bytes(), lru.len()), (0, 0));
    }
}
