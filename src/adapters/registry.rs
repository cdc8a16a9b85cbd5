//! The adapters directory and the cache of adapted model variants.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::apply::{resolve, ResolvedLayer};
use super::{Adapter, AdapterError, AdapterSet, AdapterSummary};
use crate::models::DiffusionModel;

/// Adapters found under a root directory, plus those registered at run time.
///
/// A file `NAME.safetensors` directly under the root is adapter `NAME`; a directory `NAME/`
/// holding `adapter_model.safetensors` (PEFT layout, with `adapter_config.json`) or
/// `pytorch_lora_weights.safetensors` (diffusers layout) is adapter `NAME`.
pub struct AdapterRegistry {
    root: Option<PathBuf>,
    adapters: RwLock<BTreeMap<String, Arc<Adapter>>>,
}

impl std::fmt::Debug for AdapterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterRegistry").field("root", &self.root).finish()
    }
}

const DIR_FILES: [&str; 2] = ["adapter_model.safetensors", "pytorch_lora_weights.safetensors"];

/// Adapter names: letters, digits, `_`, `-`, `.` (no path separators), 1 to 128 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl AdapterRegistry {
    /// No root: nothing can be registered (requests naming adapters get 404).
    pub fn empty() -> Self {
        Self { root: None, adapters: RwLock::new(BTreeMap::new()) }
    }

    /// Scan `root`. Files that fail to parse are skipped with a warning, so one bad file does
    /// not stop the server; registering it by path reports the error. A missing root gives an
    /// empty registry that cannot register files (create the directory to enable adapters).
    pub fn open(root: &Path) -> Result<Self, AdapterError> {
        if !root.exists() {
            tracing::info!("adapters root {} does not exist: no LoRA adapters", root.display());
            return Ok(Self::empty());
        }
        let root = root.canonicalize().map_err(|e| AdapterError::Io(format!("{}: {e}", root.display())))?;
        let reg = Self { root: Some(root.clone()), adapters: RwLock::new(BTreeMap::new()) };
        let entries = std::fs::read_dir(&root).map_err(|e| AdapterError::Io(format!("{}: {e}", root.display())))?;
        let mut found: Vec<(String, PathBuf)> = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            if p.is_file() && p.extension().is_some_and(|x| x == "safetensors") {
                found.push((name, p));
            } else if p.is_dir() {
                if let Some(f) = DIR_FILES.iter().map(|f| p.join(f)).find(|f| f.is_file()) {
                    let dir_name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default().to_string();
                    found.push((dir_name, f));
                }
            }
        }
        found.sort();
        for (name, path) in found {
            // The same confinement as POST /v1/adapters: a symlink in the root that leads out
            // of it is not followed at start-up either.
            let inside = path.canonicalize().is_ok_and(|real| real.starts_with(&root));
            if !inside {
                tracing::warn!(
                    "adapter file {} skipped: it resolves outside the adapters root {} (symlinks are followed)",
                    path.display(),
                    root.display()
                );
                continue;
            }
            if !valid_name(&name) {
                tracing::warn!("adapter file {} skipped: `{name}` is not a valid adapter name", path.display());
                continue;
            }
            match Adapter::load(&name, &path) {
                Ok(a) => {
                    reg.adapters.write().unwrap().insert(name, Arc::new(a));
                }
                Err(e) => tracing::warn!("adapter file {} skipped: {e}", path.display()),
            }
        }
        Ok(reg)
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    pub fn list(&self) -> Vec<AdapterSummary> {
        let root = self.root.clone().unwrap_or_default();
        self.adapters.read().unwrap().values().map(|a| a.summary(&root)).collect()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Adapter>, AdapterError> {
        self.adapters.read().unwrap().get(name).cloned().ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Resolve a client-supplied path (relative to the root, or absolute) and make sure it stays
    /// inside the root: no `..` components, and after following symlinks still under the root.
    pub fn confine(&self, path: &str) -> Result<PathBuf, AdapterError> {
        let root = self.root.as_ref().ok_or_else(|| AdapterError::invalid("no adapters root is configured"))?;
        let p = Path::new(path);
        if p.components().any(|c| matches!(c, PathComponent::ParentDir)) {
            return Err(AdapterError::invalid(format!("path `{path}` must not contain `..`")));
        }
        let joined = if p.is_absolute() { p.to_path_buf() } else { root.join(p) };
        let real = joined.canonicalize().map_err(|e| {
            AdapterError::invalid(format!("path `{path}`: {e} (paths are relative to the adapters root)"))
        })?;
        if !real.starts_with(root) {
            return Err(AdapterError::invalid(format!(
                "path `{path}` resolves outside the adapters root {} (symlinks are followed)",
                root.display()
            )));
        }
        let real = if real.is_dir() {
            DIR_FILES.iter().map(|f| real.join(f)).find(|f| f.is_file()).ok_or_else(|| {
                AdapterError::invalid(format!("directory `{path}` holds no {}", DIR_FILES.join(" or ")))
            })?
        } else {
            real
        };
        Ok(real)
    }

    /// Register the file at `path` (inside the root) as `name` (default: its file stem).
    /// Parse errors are returned (400); an existing name is replaced only with `replace`.
    pub fn register(&self, name: Option<&str>, path: &str, replace: bool) -> Result<AdapterSummary, AdapterError> {
        let real = self.confine(path)?;
        let name = match name {
            Some(n) => n.to_string(),
            None => {
                let stem =
                    if DIR_FILES.iter().any(|f| real.ends_with(f)) { real.parent() } else { Some(real.as_path()) };
                stem.and_then(|p| p.file_stem()).and_then(|s| s.to_str()).unwrap_or_default().to_string()
            }
        };
        if !valid_name(&name) {
            return Err(AdapterError::invalid(format!(
                "`{name}` is not a valid adapter name (letters, digits, `_`, `-`, `.`; at most 128)"
            )));
        }
        if !replace && self.adapters.read().unwrap().contains_key(&name) {
            return Err(AdapterError::invalid(format!("adapter `{name}` already exists (DELETE it first)")));
        }
        let a = Arc::new(Adapter::load(&name, &real)?);
        let summary = a.summary(self.root.as_deref().unwrap_or(Path::new("")));
        self.adapters.write().unwrap().insert(name, a);
        Ok(summary)
    }

    /// Forget an adapter (the file stays on disk). Cached variants using it are dropped by the
    /// engine when it next sees the name gone.
    pub fn remove(&self, name: &str) -> Result<(), AdapterError> {
        self.adapters.write().unwrap().remove(name).map(|_| ()).ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Insert an adapter built in code (tests, benches).
    pub fn insert(&self, adapter: Adapter) {
        self.adapters.write().unwrap().insert(adapter.name.clone(), Arc::new(adapter));
    }
}

/// How variants are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergePolicy {
    /// Merge and cache, except for a combination's first request when it runs at most
    /// [`UNMERGED_MAX_STEPS`] denoising steps: there the unmerged path is cheaper. Measured on
    /// the medium CPU model (benches/adapters.rs): a cold merge costs about 0.55 of a UNet step,
    /// while unmerged steps cost 1.2–2× merged ones, so unmerged only wins for 1–2 steps
    /// (Turbo/LCM). A combination's second request is always merged and cached.
    #[default]
    Auto,
    /// Always merge and cache.
    Always,
    /// Never merge (nothing is cached).
    Never,
}

/// Largest step count for which `auto` runs a new combination unmerged.
pub const UNMERGED_MAX_STEPS: usize = 2;

/// What happened when a request asked for a variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VariantInfo {
    pub merged: bool,
    pub cached: bool,
    pub build_ms: f64,
}

struct Entry {
    model: Arc<dyn DiffusionModel>,
    bytes: usize,
    /// Adapter identities the variant was built from, to notice replaced or removed adapters.
    adapters: Vec<Arc<Adapter>>,
}

/// LRU cache of merged variants per (model, sorted adapters with weights), with a memory
/// budget. Lives on the engine worker, which builds one variant at a time: a second request for
/// a variant being built waits in the queue and then finds it cached.
pub struct VariantCache {
    budget_bytes: usize,
    policy: MergePolicy,
    lenient: bool,
    entries: HashMap<String, Entry>,
    order: VecDeque<String>,
    seen: HashMap<String, u32>,
    resolved: HashMap<String, Arc<Vec<ResolvedLayer>>>,
}

impl VariantCache {
    pub fn new(budget_bytes: usize, policy: MergePolicy, lenient: bool) -> Self {
        Self {
            budget_bytes,
            policy,
            lenient,
            entries: HashMap::new(),
            order: VecDeque::new(),
            seen: HashMap::new(),
            resolved: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held by cached variants' own tensors.
    pub fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.bytes).sum()
    }

    /// Layers of `adapter` matched to `model` (cached per model and adapter file).
    fn layers(
        &mut self,
        model_name: &str,
        model: &dyn DiffusionModel,
        adapter: &Arc<Adapter>,
    ) -> Result<Arc<Vec<ResolvedLayer>>, AdapterError> {
        let key = format!("{model_name}\u{0}{}\u{0}{:p}", adapter.name, Arc::as_ptr(adapter));
        if let Some(r) = self.resolved.get(&key) {
            return Ok(r.clone());
        }
        let index = model.adapter_targets().ok_or_else(|| {
            AdapterError::WrongFamily(format!(
                "model `{model_name}` ({}) does not take LoRA adapters",
                model.info().family
            ))
        })?;
        let (layers, warnings) = resolve(&adapter.file.layers, index, self.lenient)?;
        for w in warnings {
            tracing::warn!("adapter `{}` on `{model_name}` (lenient): {w}", adapter.name);
        }
        let layers = Arc::new(layers);
        self.resolved.insert(key, layers.clone());
        Ok(layers)
    }

    /// The model to run for `set`: the base model when empty, a cached variant, or a new one.
    pub fn get(
        &mut self,
        model_name: &str,
        base: &Arc<dyn DiffusionModel>,
        set: &AdapterSet,
    ) -> Result<(Arc<dyn DiffusionModel>, Option<VariantInfo>), AdapterError> {
        self.get_for_steps(model_name, base, set, None)
    }

    /// [`VariantCache::get`] for a request of `steps` denoising steps (lets `auto` pick the
    /// unmerged path for short requests).
    pub fn get_for_steps(
        &mut self,
        model_name: &str,
        base: &Arc<dyn DiffusionModel>,
        set: &AdapterSet,
        steps: Option<usize>,
    ) -> Result<(Arc<dyn DiffusionModel>, Option<VariantInfo>), AdapterError> {
        if set.is_empty() {
            return Ok((base.clone(), None));
        }
        let t0 = Instant::now();
        let key = format!("{model_name}|{}", set.key());
        let same_files = |e: &Entry| {
            e.adapters.len() == set.items.len()
                && set.items.iter().all(|(a, _)| e.adapters.iter().any(|b| Arc::ptr_eq(a, b)))
        };
        if let Some(e) = self.entries.get(&key) {
            if same_files(e) {
                let model = e.model.clone();
                self.touch(&key);
                return Ok((model, Some(VariantInfo { merged: true, cached: true, build_ms: ms(t0) })));
            }
            // An adapter was replaced under the same name: rebuild.
            self.evict(&key);
        }
        let mut weighted: Vec<(f64, Arc<Vec<ResolvedLayer>>)> = Vec::with_capacity(set.items.len());
        for (a, s) in &set.items {
            weighted.push((*s, self.layers(model_name, base.as_ref(), a)?));
        }
        let seen = {
            let n = self.seen.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let merge = match self.policy {
            MergePolicy::Always => true,
            MergePolicy::Never => false,
            MergePolicy::Auto => seen >= 2 || steps.is_none_or(|s| s > UNMERGED_MAX_STEPS),
        };
        let refs: Vec<(f64, &[ResolvedLayer])> = weighted.iter().map(|(s, l)| (*s, l.as_slice())).collect();
        let model = base.with_adapters(&refs, merge).map_err(|e| AdapterError::Invalid(e.to_string()))?;
        let bytes: usize = weighted
            .iter()
            .flat_map(|(_, ls)| ls.iter())
            .map(|l| if merge { l.up.dims()[0] * l.down.elem_count() / l.down.dims()[0] * 4 } else { 0 })
            .sum();
        if merge {
            self.entries.insert(
                key.clone(),
                Entry { model: model.clone(), bytes, adapters: set.items.iter().map(|(a, _)| a.clone()).collect() },
            );
            self.order.push_back(key.clone());
            self.shrink(&key);
        }
        Ok((model, Some(VariantInfo { merged: merge, cached: false, build_ms: ms(t0) })))
    }

    fn touch(&mut self, key: &str) {
        if let Some(i) = self.order.iter().position(|k| k == key) {
            let k = self.order.remove(i).expect("present");
            self.order.push_back(k);
        }
    }

    fn evict(&mut self, key: &str) {
        self.entries.remove(key);
        self.order.retain(|k| k != key);
    }

    /// Drop least recently used variants until the budget holds (the newest always stays).
    fn shrink(&mut self, keep: &str) {
        while self.bytes() > self.budget_bytes {
            let Some(victim) = self.order.iter().find(|k| k.as_str() != keep).cloned() else { break };
            self.evict(&victim);
        }
    }

    /// Forget resolutions and variants of adapters that are no longer registered under their
    /// name (removed or replaced).
    pub fn retain_adapters(&mut self, alive: impl Fn(&Arc<Adapter>) -> bool) {
        let dead: Vec<String> =
            self.entries.iter().filter(|(_, e)| !e.adapters.iter().all(&alive)).map(|(k, _)| k.clone()).collect();
        for k in dead {
            self.evict(&k);
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
