//! Registered templates: an in-memory index (id -> shared template) and, with a cache
//! directory, one folder per template (`Template::save` layout) reloaded at start-up. The
//! store keeps each template's small parts (spec, trajectory, image) resident; its
//! activation cache belongs to the [`CacheManager`], which moves it between tiers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use retouch_models::pipeline::Template;

use super::cache::{CacheLease, CacheManager};
use super::request::EngineError;
use super::telemetry;

pub struct TemplateStore {
    /// Templates without their activation cache (`cache` is empty).
    map: DashMap<String, Arc<Template>>,
    cache: CacheManager,
    dir: Option<PathBuf>,
    next: AtomicU64,
}

/// Template ids are `t` and a number; the number continues past those on disk.
fn parse_id(name: &str) -> Option<u64> {
    name.strip_prefix('t')?.parse().ok()
}

impl TemplateStore {
    /// Opens the store, loading every template folder under `dir` (created if missing)
    /// without its activation cache, which `cache` loads a step at a time when wanted. A
    /// folder that does not load is skipped with a warning rather than failing start-up.
    pub fn open(dir: Option<&Path>, cache: CacheManager) -> std::io::Result<TemplateStore> {
        let store = TemplateStore {
            map: DashMap::new(),
            cache,
            dir: dir.map(Path::to_path_buf),
            next: AtomicU64::new(1),
        };
        let Some(dir) = dir else {
            return Ok(store);
        };
        std::fs::create_dir_all(dir)?;
        let mut max = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = parse_id(&name) else { continue };
            max = max.max(n);
            match Template::load_without_cache(entry.path()) {
                Ok(t) => {
                    store.cache.add_saved(&name, t.spec.steps, entry.path());
                    store.map.insert(name, Arc::new(t));
                }
                Err(e) => eprintln!("warning: skipping template {name}: {e}"),
            }
        }
        store.next.store(max + 1, Ordering::Relaxed);
        metrics::gauge!(telemetry::TEMPLATES).set(store.map.len() as f64);
        Ok(store)
    }

    pub fn new_id(&self) -> String {
        format!("t{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Template>> {
        self.map.get(id).map(|t| Arc::clone(&t))
    }

    /// Writes the template to the cache directory, if any (blocking I/O).
    pub fn persist(&self, id: &str, template: &Template) -> retouch_models::Result<()> {
        match &self.dir {
            Some(dir) => template.save(dir.join(id)),
            None => Ok(()),
        }
    }

    /// Adds a template (after [`TemplateStore::persist`] with a cache directory): its
    /// activation cache goes to the cache manager, the rest stays here. Answers the
    /// template as the store keeps it.
    pub fn insert(&self, id: String, mut template: Template) -> Arc<Template> {
        let cache = std::mem::take(&mut template.cache);
        let dir = self.dir.as_ref().map(|d| d.join(&id));
        self.cache.add_in_memory(&id, cache, dir);
        let template = Arc::new(template);
        self.map.insert(id, Arc::clone(&template));
        metrics::gauge!(telemetry::TEMPLATES).set(self.map.len() as f64);
        template
    }

    /// Removes a template from memory and disk; false if unknown. Edits already holding
    /// it (dense ones through their `Arc`, cached ones through their lease) finish first:
    /// the activation cache and the folder go when the last of them ends.
    pub fn remove(&self, id: &str) -> std::io::Result<bool> {
        if self.map.remove(id).is_none() {
            return Ok(false);
        }
        metrics::gauge!(telemetry::TEMPLATES).set(self.map.len() as f64);
        // Every stored template is registered with the manager, which owns its folder.
        self.cache.remove(id)?;
        Ok(true)
    }

    /// A lease on a template's activation cache, for a cached-mode edit.
    pub fn lease(&self, id: &str) -> Result<CacheLease, EngineError> {
        self.cache.lease(id)
    }

    /// Bytes of a template's activation cache (in memory, or its files' sizes).
    pub fn cache_bytes(&self, id: &str) -> u64 {
        self.cache.template_bytes(id)
    }

    /// Every template, sorted by id number.
    pub fn list(&self) -> Vec<(String, Arc<Template>)> {
        let mut all: Vec<_> = self
            .map
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        all.sort_by_key(|(id, _)| parse_id(id).unwrap_or(u64::MAX));
        all
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
