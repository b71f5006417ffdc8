//! A step's activation cache on disk: one safetensors file per step, entries named in forward
//! order (`00012.conv.1` is entry 12's conv input for batch element 1; `k`/`v` for keys and
//! values; `stats` is `[batch * groups, 2]` means and reciprocal deviations, `moments.1` batch
//! element 1's per-position moments of that norm's input).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use retouch_kernels::{GroupStats, SafeTensorsFile, Tensor, save_safetensors};

use crate::nn::exec::{CacheEntry, StepCache};
use crate::{Error, Result};

pub(crate) fn step_file(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step_{step:04}.safetensors"))
}

pub(crate) fn save_step(dir: &Path, step: usize, cache: &StepCache) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (i, entry) in (cache.first..).zip(&cache.entries) {
        match entry {
            CacheEntry::ConvInput(maps) => {
                for (b, m) in maps.iter().enumerate() {
                    named.push((format!("{i:05}.conv.{b}"), m.clone()));
                }
            }
            CacheEntry::KeyValue(kv) => {
                for (b, (k, v)) in kv.iter().enumerate() {
                    named.push((format!("{i:05}.k.{b}"), k.clone()));
                    named.push((format!("{i:05}.v.{b}"), v.clone()));
                }
            }
            CacheEntry::Stats { stats, moments } => {
                let flat: Vec<f32> = stats.iter().flat_map(|s| [s.mean, s.rstd]).collect();
                named.push((
                    format!("{i:05}.stats"),
                    Tensor::from_vec(flat, &[stats.len(), 2])?,
                ));
                for (b, m) in moments.iter().enumerate() {
                    named.push((format!("{i:05}.moments.{b}"), m.clone()));
                }
            }
        }
    }
    save_safetensors(
        step_file(dir, step),
        named.iter().map(|(n, t)| (n.as_str(), t)),
    )?;
    Ok(())
}

/// The step's whole recording.
pub(crate) fn load_step(dir: &Path, step: usize) -> Result<StepCache> {
    let mut entries = Vec::new();
    read_entries(dir, step, 0, &mut |_, entry| entries.push(entry))?;
    Ok(StepCache { first: 0, entries })
}

/// Reads the step's entries from `first` on in order, handing each to `deliver(index,
/// entry)` as soon as its tensors are read (a reader streaming them to a forward). The file's
/// header is checked first: a missing entry is an error before any is delivered.
pub(crate) fn read_entries(
    dir: &Path,
    step: usize,
    first: usize,
    deliver: &mut dyn FnMut(usize, CacheEntry),
) -> Result<()> {
    let path = step_file(dir, step);
    let file = SafeTensorsFile::open(&path)?;
    let bad = |message: String| Error::config(&path, message);
    // entry index -> (kind, batch index or none, tensor name)
    let mut grouped: BTreeMap<usize, Vec<(String, Option<usize>, String)>> = BTreeMap::new();
    for name in file.names() {
        let mut parts = name.split('.');
        let index = parts
            .next()
            .and_then(|p| p.parse::<usize>().ok())
            .ok_or_else(|| bad(format!("unexpected tensor name `{name}`")))?;
        let kind = parts.next().unwrap_or_default().to_string();
        let batch = parts.next().and_then(|p| p.parse::<usize>().ok());
        if index >= first {
            grouped.entry(index).or_default().push((kind, batch, name));
        }
    }
    if let Some(missing) = (first..)
        .zip(grouped.keys())
        .find_map(|(expected, &index)| (index != expected).then_some(expected))
    {
        return Err(bad(format!("cache entry {missing} is missing")));
    }
    for (index, mut parts) in grouped {
        parts.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let mut tensors = Vec::with_capacity(parts.len());
        for (kind, _, name) in parts {
            tensors.push((kind, file.get(&name)?));
        }
        deliver(index, entry_of(index, tensors).map_err(bad)?);
    }
    Ok(())
}

/// One entry from its tensors, sorted by (kind, batch element).
fn entry_of(
    index: usize,
    mut parts: Vec<(String, Tensor)>,
) -> std::result::Result<CacheEntry, String> {
    // Sorted by kind: "moments" parts come before their entry's "stats".
    let kind = parts.last().map(|p| p.0.clone()).unwrap_or_default();
    Ok(match kind.as_str() {
        "conv" => CacheEntry::ConvInput(parts.into_iter().map(|p| p.1).collect()),
        "k" | "v" => {
            let (ks, vs): (Vec<_>, Vec<_>) = parts.into_iter().partition(|p| p.0 == "k");
            if ks.len() != vs.len() {
                return Err(format!("entry {index}: keys and values differ in count"));
            }
            CacheEntry::KeyValue(ks.into_iter().zip(vs).map(|(k, v)| (k.1, v.1)).collect())
        }
        "stats" => {
            let flat = parts.pop().map(|p| p.1.to_vec_f32()).unwrap_or_default();
            if parts.iter().any(|p| p.0 != "moments") {
                return Err(format!("entry {index}: statistics mixed with other kinds"));
            }
            CacheEntry::Stats {
                stats: flat
                    .chunks_exact(2)
                    .map(|p| GroupStats {
                        mean: p[0],
                        rstd: p[1],
                    })
                    .collect(),
                moments: parts.into_iter().map(|p| p.1).collect(),
            }
        }
        other => return Err(format!("entry {index}: unknown kind `{other}`")),
    })
}

/// Bytes of each entry of a step's file (all its batch elements' tensors), in entry order,
/// from the file's header alone.
pub(crate) fn entry_bytes(dir: &Path, step: usize) -> Result<Vec<u64>> {
    let path = step_file(dir, step);
    let file = SafeTensorsFile::open(&path)?;
    let mut bytes: BTreeMap<usize, u64> = BTreeMap::new();
    for name in file.names() {
        let index = name
            .split('.')
            .next()
            .and_then(|p| p.parse::<usize>().ok())
            .ok_or_else(|| Error::config(&path, format!("unexpected tensor name `{name}`")))?;
        *bytes.entry(index).or_default() += file.byte_len(&name)? as u64;
    }
    let count = bytes.keys().next_back().map_or(0, |&i| i + 1);
    if bytes.len() != count {
        return Err(Error::config(
            &path,
            "cache entries are missing".to_string(),
        ));
    }
    Ok(bytes.into_values().collect())
}
