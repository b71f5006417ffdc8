//! The device tier of a GPU pipeline: template steps kept in device memory across UNet calls,
//! so a cached edit uploads its template's step once, not once per denoising step it shares
//! with other edits or per request that reuses the template.
//!
//! A resident copy is keyed by the identity of the shared host copy it was made from (the
//! runtime's memory tiers hand steps out as `Arc<StepCache>`). The tier holds only a `Weak`
//! to it, which keeps the address from being reused by another step without keeping the step
//! itself; once the host copy is gone (evicted from the host tiers, or its template deleted)
//! the device copy is dropped at the next lookup, and a reload of that step (a new `Arc`) is
//! uploaded afresh. Copies beyond the byte
//! budget are evicted least recently used first; one in use by a running call stays alive
//! (its `Arc`) until that call ends.

use std::sync::{Arc, Mutex, Weak};

use crate::Result;

/// What a device copy costs in device memory.
pub trait DeviceBytes {
    fn device_bytes(&self) -> usize;
}

impl DeviceBytes for crate::nn::gpu::GpuStepCache {
    fn device_bytes(&self) -> usize {
        self.size_in_bytes()
    }
}

/// Device copies of shared host values `H`, within a byte budget.
pub struct DeviceSteps<H, D> {
    budget: u64,
    state: Mutex<State<H, D>>,
}

struct State<H, D> {
    resident: Vec<Resident<H, D>>,
    bytes: u64,
    clock: u64,
}

struct Resident<H, D> {
    host: Weak<H>,
    device: Arc<D>,
    bytes: u64,
    last_use: u64,
}

/// Counter of device-tier lookups, by outcome ([`Lookup::name`]).
pub const DEVICE_STEP_LOOKUPS: &str = "retouch_device_step_lookups_total";

/// Counter of uploads ahead of need, by outcome (`hit`: already resident; `uploaded`).
pub const DEVICE_STEP_PREFETCHES: &str = "retouch_device_step_prefetches_total";

/// What a lookup did, for the caller's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The copy was resident.
    Hit,
    /// Uploaded now and kept.
    Uploaded,
    /// Uploaded now for this call only: larger than the whole budget.
    Passing,
}

impl Lookup {
    pub fn name(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Uploaded => "uploaded",
            Lookup::Passing => "passing",
        }
    }
}

impl<H, D: DeviceBytes> DeviceSteps<H, D> {
    pub fn new(budget_bytes: u64) -> DeviceSteps<H, D> {
        DeviceSteps {
            budget: budget_bytes,
            state: Mutex::new(State {
                resident: Vec::new(),
                bytes: 0,
                clock: 0,
            }),
        }
    }

    /// The device copy of `host`, made by `upload` unless one is resident. A failed upload
    /// changes nothing and returns its error.
    pub fn get_or_upload(
        &self,
        host: &Arc<H>,
        upload: impl FnOnce(&H) -> Result<D>,
    ) -> Result<(Arc<D>, Lookup)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.clock += 1;
        let now = state.clock;
        state.drop_orphans();
        if let Some(at) = state.position(host) {
            let r = &mut state.resident[at];
            r.last_use = now;
            return Ok((Arc::clone(&r.device), Lookup::Hit));
        }
        // Uploading under the lock: one worker thread drives a pipeline, so nothing waits.
        let device = Arc::new(upload(host)?);
        let bytes = device.device_bytes() as u64;
        if bytes > self.budget {
            return Ok((device, Lookup::Passing));
        }
        while state.bytes + bytes > self.budget && !state.resident.is_empty() {
            state.evict_least_recent();
        }
        state.bytes += bytes;
        state.resident.push(Resident {
            host: Arc::downgrade(host),
            device: Arc::clone(&device),
            bytes,
            last_use: now,
        });
        Ok((device, Lookup::Uploaded))
    }

    /// Makes `host` resident ahead of need (`upload` queues a copy beside the compute
    /// stream's work): [`DeviceSteps::get_or_upload`] without handing the copy out. Nothing
    /// is uploaded when `bytes_at_most` (a bound on the copy's size) exceeds the budget: the
    /// copy could not stay.
    pub fn prefetch(
        &self,
        host: &Arc<H>,
        bytes_at_most: u64,
        upload: impl FnOnce(&H) -> Result<D>,
    ) -> Result<Option<Lookup>> {
        if self.holds(host) {
            return Ok(Some(Lookup::Hit));
        }
        if bytes_at_most > self.budget {
            return Ok(None);
        }
        let (_, lookup) = self.get_or_upload(host, upload)?;
        Ok(Some(lookup))
    }

    /// Whether a copy of `host` is resident.
    pub fn holds(&self, host: &Arc<H>) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.position(host).is_some()
    }

    /// Bytes of the resident copies.
    pub fn resident_bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Number of resident copies.
    pub fn len(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.resident.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<H, D> State<H, D> {
    /// Where `host`'s copy is. A `Weak` keeps its value's allocation (not the value), so no
    /// other value can sit at the address of one an entry was made from.
    fn position(&self, host: &Arc<H>) -> Option<usize> {
        self.resident
            .iter()
            .position(|r| std::ptr::eq(r.host.as_ptr(), Arc::as_ptr(host)))
    }

    /// Drops the copies whose host value is gone.
    fn drop_orphans(&mut self) {
        let mut freed = 0;
        self.resident.retain(|r| {
            let alive = r.host.strong_count() > 0;
            if !alive {
                freed += r.bytes;
            }
            alive
        });
        self.bytes -= freed;
    }

    fn evict_least_recent(&mut self) {
        let Some(oldest) = (0..self.resident.len()).min_by_key(|&i| self.resident[i].last_use)
        else {
            return;
        };
        let evicted = self.resident.swap_remove(oldest);
        self.bytes -= evicted.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    struct Copy(usize);
    impl DeviceBytes for Copy {
        fn device_bytes(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn a_resident_copy_is_reused_until_its_host_value_is_dropped() {
        let tier: DeviceSteps<u32, Copy> = DeviceSteps::new(100);
        let (a, b) = (Arc::new(1), Arc::new(2));
        let (_, first) = tier.get_or_upload(&a, |_| Ok(Copy(30))).unwrap();
        let (_, again) = tier.get_or_upload(&a, |_| panic!("resident")).unwrap();
        assert_eq!((first, again), (Lookup::Uploaded, Lookup::Hit));
        tier.get_or_upload(&b, |_| Ok(Copy(30))).unwrap();
        assert_eq!((tier.len(), tier.resident_bytes()), (2, 60));
        // The host copy goes: its device copy goes at the next lookup, and a new value
        // (perhaps at the same address) is uploaded afresh.
        drop(a);
        let c = Arc::new(3);
        let (_, lookup) = tier.get_or_upload(&c, |_| Ok(Copy(10))).unwrap();
        assert_eq!(lookup, Lookup::Uploaded);
        assert_eq!((tier.len(), tier.resident_bytes()), (2, 40));
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_copy() {
        let tier: DeviceSteps<u32, Copy> = DeviceSteps::new(100);
        let values: Vec<Arc<u32>> = (0..4).map(Arc::new).collect();
        for v in &values[..3] {
            tier.get_or_upload(v, |_| Ok(Copy(30))).unwrap();
        }
        // Use the first again: the second is now the least recent.
        tier.get_or_upload(&values[0], |_| panic!("resident"))
            .unwrap();
        tier.get_or_upload(&values[3], |_| Ok(Copy(30))).unwrap();
        assert_eq!((tier.len(), tier.resident_bytes()), (3, 90));
        let (_, lookup) = tier.get_or_upload(&values[1], |_| Ok(Copy(30))).unwrap();
        assert_eq!(lookup, Lookup::Uploaded, "the second was evicted");
        let (_, lookup) = tier.get_or_upload(&values[0], |_| Ok(Copy(30))).unwrap();
        assert_eq!(lookup, Lookup::Hit, "the first was kept");
        assert!(tier.resident_bytes() <= 100);
    }

    #[test]
    fn a_copy_larger_than_the_budget_serves_its_call_without_evicting() {
        let tier: DeviceSteps<u32, Copy> = DeviceSteps::new(100);
        let (small, huge) = (Arc::new(1), Arc::new(2));
        tier.get_or_upload(&small, |_| Ok(Copy(60))).unwrap();
        let (copy, lookup) = tier.get_or_upload(&huge, |_| Ok(Copy(500))).unwrap();
        assert_eq!((lookup, copy.0), (Lookup::Passing, 500));
        assert_eq!((tier.len(), tier.resident_bytes()), (1, 60));
    }

    #[test]
    fn a_prefetched_copy_is_found_by_the_call_that_needs_it() {
        let tier: DeviceSteps<u32, Copy> = DeviceSteps::new(100);
        let v = Arc::new(1);
        assert!(!tier.holds(&v));
        let big = Arc::new(2);
        assert_eq!(
            tier.prefetch(&big, 500, |_| panic!("too big")).unwrap(),
            None
        );
        assert_eq!(
            tier.prefetch(&v, 30, |_| Ok(Copy(30))).unwrap(),
            Some(Lookup::Uploaded)
        );
        assert_eq!(
            tier.prefetch(&v, 30, |_| panic!("resident")).unwrap(),
            Some(Lookup::Hit)
        );
        assert!(tier.holds(&v));
        let (_, lookup) = tier.get_or_upload(&v, |_| panic!("resident")).unwrap();
        assert_eq!(lookup, Lookup::Hit);
    }

    #[test]
    fn a_failed_upload_changes_nothing() {
        let tier: DeviceSteps<u32, Copy> = DeviceSteps::new(100);
        let v = Arc::new(1);
        let err = tier
            .get_or_upload(&v, |_| Err(Error::Invalid("out of memory".into())))
            .err()
            .unwrap();
        assert!(err.to_string().contains("out of memory"));
        assert!(tier.is_empty());
        let (_, lookup) = tier.get_or_upload(&v, |_| Ok(Copy(10))).unwrap();
        assert_eq!(lookup, Lookup::Uploaded);
    }
}
