//! The state the cache's handles and loader threads share: the index (one entry per template
//! step, saying which tiers hold its activation cache), each memory tier's LRU book, and the
//! moves between tiers.
//!
//! Lock order: a tier's mutex may be held while the index is read or written, never the
//! other way round (no index guard is held while a tier is locked).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use dashmap::DashMap;
use retouch_models::nn::exec::StepCache;

use super::loader::{Observer, Pending};
use super::tier::{Lru, Tier};
use crate::engine::telemetry;

/// A template step: (template id, step).
pub(super) type Key = (Arc<str>, usize);

/// Where one step's activation cache is.
pub(super) struct StepEntry {
    /// Bytes in memory: exact once in memory, the file's size before the first load.
    pub(super) bytes: u64,
    /// Size of its file on disk; 0 without one.
    pub(super) disk_bytes: u64,
    /// A disk copy exists, so the host tier may drop this step.
    pub(super) on_disk: bool,
    pub(super) host: Option<Arc<StepCache>>,
    /// Per worker.
    pub(super) device: Vec<Option<Arc<StepCache>>>,
    /// Per worker: running requests whose current or next step this is.
    pub(super) pins: Vec<u32>,
}

impl StepEntry {
    pub(super) fn new(workers: usize, bytes: u64, disk_bytes: Option<u64>) -> StepEntry {
        StepEntry {
            bytes,
            disk_bytes: disk_bytes.unwrap_or(0),
            on_disk: disk_bytes.is_some(),
            host: None,
            device: vec![None; workers],
            pins: vec![0; workers],
        }
    }

    pub(super) fn get(&self, tier: Tier) -> Option<&Arc<StepCache>> {
        match tier {
            Tier::Host => self.host.as_ref(),
            Tier::Device(w) => self.device.get(w)?.as_ref(),
            Tier::Disk => None,
        }
    }

    fn slot(&mut self, tier: Tier) -> Option<&mut Option<Arc<StepCache>>> {
        match tier {
            Tier::Host => Some(&mut self.host),
            Tier::Device(w) => self.device.get_mut(w),
            Tier::Disk => None,
        }
    }
}

/// A template as the cache knows it.
pub(super) struct TemplateCache {
    pub(super) id: Arc<str>,
    /// Steps with an activation cache; 0 when it was registered without one.
    pub(super) steps: usize,
    /// The template's saved folder (its `cache/` holds the step files), if any.
    pub(super) dir: Option<PathBuf>,
    /// Open leases (requests that read the cache); deletion waits for them.
    pub(super) leases: AtomicUsize,
    pub(super) deleted: AtomicBool,
    pub(super) purged: AtomicBool,
    /// Bytes of each entry of a step (every step has the same layout), read once from a
    /// step file's header.
    pub(super) entry_bytes: OnceLock<Vec<u64>>,
}

impl TemplateCache {
    pub(super) fn key(&self, step: usize) -> Key {
        (Arc::clone(&self.id), step)
    }
}

pub(super) struct Shared {
    pub(super) workers: usize,
    pub(super) prefetch_steps: usize,
    pub(super) index: DashMap<Key, StepEntry>,
    pub(super) templates: DashMap<Arc<str>, Arc<TemplateCache>>,
    host: Mutex<Lru<Key>>,
    devices: Vec<Mutex<Lru<Key>>>,
    /// Loads from disk under way, so concurrent wants of one step read it once.
    pub(super) inflight: DashMap<Key, Arc<Pending>>,
    pub(super) disk_bytes: AtomicU64,
    /// Prefetch jobs sent and not yet done.
    pub(super) queued: AtomicUsize,
    pub(super) observer: OnceLock<Observer>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn new(
        workers: usize,
        host_bytes: u64,
        device_bytes: u64,
        prefetch_steps: usize,
    ) -> Shared {
        Shared {
            workers,
            prefetch_steps,
            index: DashMap::new(),
            templates: DashMap::new(),
            host: Mutex::new(Lru::new(host_bytes)),
            devices: (0..workers)
                .map(|_| Mutex::new(Lru::new(device_bytes)))
                .collect(),
            inflight: DashMap::new(),
            disk_bytes: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            observer: OnceLock::new(),
        }
    }

    fn lru(&self, tier: Tier) -> Option<&Mutex<Lru<Key>>> {
        match tier {
            Tier::Host => Some(&self.host),
            Tier::Device(w) => self.devices.get(w),
            Tier::Disk => None,
        }
    }

    /// Bytes resident in a memory tier (the disk tier: bytes of the step files).
    pub(super) fn tier_bytes(&self, tier: Tier) -> u64 {
        match self.lru(tier) {
            Some(lru) => lock(lru).bytes(),
            None => self.disk_bytes.load(Ordering::Relaxed),
        }
    }

    /// Counts step files added to and removed from the disk tier.
    pub(super) fn change_disk_bytes(&self, added: u64, removed: u64) {
        let update = |b: u64| Some((b + added).saturating_sub(removed));
        let before = self
            .disk_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, update)
            .unwrap_or_default();
        gauge(Tier::Disk, (before + added).saturating_sub(removed));
    }

    pub(super) fn resident(&self, tier: Tier, key: &Key) -> Option<Arc<StepCache>> {
        self.index.get(key)?.get(tier).cloned()
    }

    pub(super) fn touch(&self, tier: Tier, key: &Key) {
        if let Some(lru) = self.lru(tier) {
            lock(lru).touch(key);
        }
    }

    /// Puts `cache` in a memory tier as its most recent entry, then evicts least recently
    /// used entries until the tier is within budget (pinned ones, and host entries with no
    /// disk copy, stay). A step whose template was purged meanwhile is not placed.
    pub(super) fn place(&self, tier: Tier, key: &Key, cache: &Arc<StepCache>) {
        let Some(lru) = self.lru(tier) else { return };
        let mut lru = lock(lru);
        let bytes = {
            let Some(mut entry) = self.index.get_mut(key) else {
                return;
            };
            let Some(slot) = entry.slot(tier) else { return };
            *slot = Some(Arc::clone(cache));
            entry.bytes
        };
        lru.insert(key.clone(), bytes);
        self.evict(tier, &mut lru);
    }

    /// Brings a tier back within budget if it can (after pins are released).
    pub(super) fn trim(&self, tier: Tier) {
        if let Some(lru) = self.lru(tier) {
            self.evict(tier, &mut lock(lru));
        }
    }

    fn evict(&self, tier: Tier, lru: &mut Lru<Key>) {
        let victims = lru.victims(|k| self.evictable(tier, k));
        for victim in victims {
            lru.remove(&victim);
            if let Some(mut entry) = self.index.get_mut(&victim)
                && let Some(slot) = entry.slot(tier)
            {
                *slot = None;
            }
            metrics::counter!(telemetry::CACHE_EVICTIONS, "tier" => tier.label()).increment(1);
        }
        gauge(tier, lru.bytes());
    }

    fn evictable(&self, tier: Tier, key: &Key) -> bool {
        let Some(entry) = self.index.get(key) else {
            return true;
        };
        match tier {
            // Another copy must remain: the host tier is the last memory copy.
            Tier::Host => entry.on_disk && entry.pins.iter().all(|&p| p == 0),
            Tier::Device(w) => entry.pins.get(w).is_none_or(|&p| p == 0),
            Tier::Disk => false,
        }
    }

    /// Adds `delta` pins to a step for one worker.
    pub(super) fn pin(&self, key: &Key, worker: usize, delta: i32) {
        if let Some(mut entry) = self.index.get_mut(key)
            && let Some(p) = entry.pins.get_mut(worker)
        {
            *p = p.saturating_add_signed(delta);
        }
    }

    /// Drops every step of a template from the index and the tiers, and with `delete_dir`
    /// its folder from disk. Runs once; later calls do nothing.
    pub(super) fn purge(&self, template: &TemplateCache, delete_dir: bool) -> std::io::Result<()> {
        if template.purged.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut freed = 0;
        for step in 0..template.steps {
            if let Some((_, entry)) = self.index.remove(&template.key(step)) {
                freed += entry.disk_bytes;
            }
        }
        let tiers = std::iter::once(Tier::Host).chain((0..self.workers).map(Tier::Device));
        for tier in tiers {
            let Some(lru) = self.lru(tier) else { continue };
            let mut lru = lock(lru);
            for step in 0..template.steps {
                lru.remove(&template.key(step));
            }
            gauge(tier, lru.bytes());
        }
        self.change_disk_bytes(0, freed);
        match &template.dir {
            Some(dir) if delete_dir && dir.exists() => std::fs::remove_dir_all(dir),
            _ => Ok(()),
        }
    }
}

pub(super) fn gauge(tier: Tier, bytes: u64) {
    let g = match tier {
        Tier::Device(w) => {
            metrics::gauge!(telemetry::CACHE_BYTES, "tier" => "device", "worker" => w.to_string())
        }
        _ => metrics::gauge!(telemetry::CACHE_BYTES, "tier" => tier.label()),
    };
    g.set(bytes as f64);
}
