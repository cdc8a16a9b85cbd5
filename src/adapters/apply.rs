//! Matching LoRA layers to a model's modules, and applying them: merged
//! (W' = W + Σ sᵢ·scaleᵢ·Bᵢ·Aᵢ, new tensors; the base weights are never touched) or unmerged
//! (the factors ride along and each layer adds s·scale·(x·Aᵀ)·Bᵀ at run time).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};

use super::lora::{sgm_to_diffusers, Component, LoraLayer, ModuleKey};
use super::AdapterError;

/// The weight names of one model's adaptable components, for resolving LoRA keys.
#[derive(Debug, Clone, Default)]
pub struct TargetIndex {
    /// component → (module path → weight shape).
    modules: HashMap<Component, BTreeMap<String, Vec<usize>>>,
    /// component → (underscore form → module path).
    underscored: HashMap<Component, HashMap<String, String>>,
    /// UNet `layers_per_block`, for SDXL's original block names.
    pub layers_per_block: usize,
}

impl TargetIndex {
    /// Index the `*.weight` tensors of each component (only 2-D and 4-D weights can take LoRA).
    pub fn new(components: &[(Component, &HashMap<String, Tensor>)], layers_per_block: usize) -> Self {
        let mut modules = HashMap::new();
        let mut underscored = HashMap::new();
        for (c, tensors) in components {
            let mut m = BTreeMap::new();
            let mut u = HashMap::new();
            for (k, t) in tensors.iter() {
                let Some(module) = k.strip_suffix(".weight") else { continue };
                if !matches!(t.rank(), 2 | 4) {
                    continue;
                }
                m.insert(module.to_string(), t.dims().to_vec());
                let under = module.replace('.', "_");
                // Text encoders appear with and without transformers' `text_model.` prefix.
                if let Some(s) = under.strip_prefix("text_model_") {
                    u.insert(s.to_string(), module.to_string());
                } else if matches!(c, Component::TextEncoder | Component::TextEncoder2) {
                    u.insert(format!("text_model_{under}"), module.to_string());
                }
                u.insert(under, module.to_string());
            }
            modules.insert(*c, m);
            underscored.insert(*c, u);
        }
        Self { modules, underscored, layers_per_block }
    }

    pub fn has_component(&self, c: Component) -> bool {
        self.modules.contains_key(&c)
    }

    fn lookup(&self, c: Component, key: &ModuleKey) -> Option<(String, Vec<usize>)> {
        let modules = self.modules.get(&c)?;
        let found = match key {
            ModuleKey::Dotted(p) => {
                let mut cands = vec![p.clone(), format!("text_model.{p}")];
                if let Some(s) = p.strip_prefix("text_model.") {
                    cands.push(s.to_string());
                }
                cands.into_iter().find(|m| modules.contains_key(m))
            }
            ModuleKey::Underscored(u) => {
                let u = if c == Component::Unet { sgm_to_diffusers(u, self.layers_per_block) } else { u.clone() };
                self.underscored.get(&c)?.get(&u).cloned()
            }
        }?;
        let shape = modules.get(&found)?.clone();
        Some((found, shape))
    }
}

/// A layer matched to a module, with factors shaped for that module's weight.
#[derive(Debug, Clone)]
pub struct ResolvedLayer {
    pub component: Component,
    /// The module path as the model names it (weight = `<module>.weight`).
    pub module: String,
    /// 2-D (r, in) for linear weights, 4-D (r, in, kh, kw) for convolutions.
    pub down: Tensor,
    /// 2-D (out, r) or 4-D (out, r, 1, 1).
    pub up: Tensor,
    pub scale: f64,
}

/// Match every layer of a file to a module of the model. Unmatched keys and shape mismatches
/// are errors listing them all, unless `lenient` (then they are skipped and returned as
/// warnings).
pub fn resolve(
    layers: &[LoraLayer],
    index: &TargetIndex,
    lenient: bool,
) -> Result<(Vec<ResolvedLayer>, Vec<String>), AdapterError> {
    let mut out = Vec::new();
    let mut unmatched = Vec::new();
    let mut mismatched = Vec::new();
    let mut missing_components = std::collections::BTreeSet::new();
    for l in layers {
        if !index.has_component(l.component) {
            missing_components.insert(l.component.name());
            unmatched.push(l.source.clone());
            continue;
        }
        let Some((module, shape)) = index.lookup(l.component, &l.key) else {
            unmatched.push(l.source.clone());
            continue;
        };
        match shape_for(l, &shape) {
            Some((down, up)) => {
                out.push(ResolvedLayer { component: l.component, module, down, up, scale: l.scale });
            }
            None => mismatched.push(format!(
                "{} (down {:?}, up {:?}) vs {module}.weight {shape:?}",
                l.source,
                l.down.dims(),
                l.up.dims()
            )),
        }
    }
    if !missing_components.is_empty() && out.is_empty() {
        return Err(AdapterError::WrongFamily(format!(
            "the adapter targets {} which this model does not have (an adapter for another model family?)",
            missing_components.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    if out.is_empty() && !unmatched.is_empty() && mismatched.is_empty() {
        return Err(AdapterError::WrongFamily(format!(
            "none of the adapter's {} modules exists in this model (an adapter for another model family?); first: {}",
            unmatched.len(),
            unmatched.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let mut problems = Vec::new();
    if !unmatched.is_empty() {
        problems.push(format!(
            "{} keys match no module of the model: {}",
            unmatched.len(),
            unmatched.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if !mismatched.is_empty() {
        problems.push(format!("{} shape mismatches: {}", mismatched.len(), mismatched.join("; ")));
    }
    if !problems.is_empty() && !lenient {
        return Err(AdapterError::Mismatch(problems.join(". ")));
    }
    Ok((out, problems))
}

/// Factors reshaped for a weight of `shape`, or `None` when they cannot form its delta.
fn shape_for(l: &LoraLayer, shape: &[usize]) -> Option<(Tensor, Tensor)> {
    let (d, u) = (l.down.dims(), l.up.dims());
    let (r, out) = (d[0], u[0]);
    match shape.len() {
        2 => {
            let (o, i) = (shape[0], shape[1]);
            // A 1×1 conv LoRA on a linear layer (SD-1 conv proj_in vs SD-2 linear) is the same map.
            let din: usize = d[1..].iter().product();
            let one_by_one = d.len() == 2 || (d[2] == 1 && d[3] == 1);
            if out == o && din == i && one_by_one {
                Some((l.down.reshape((r, i)).ok()?, l.up.reshape((o, r)).ok()?))
            } else {
                None
            }
        }
        4 => {
            let (o, i, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
            let down = match d.len() {
                4 if d[1] == i && d[2] == kh && d[3] == kw => l.down.clone(),
                2 if kh == 1 && kw == 1 && d[1] == i => l.down.reshape((r, i, 1, 1)).ok()?,
                _ => return None,
            };
            if out != o {
                return None;
            }
            Some((down, l.up.reshape((o, r, 1, 1)).ok()?))
        }
        _ => None,
    }
}

/// ΔW = up · down for one layer, shaped like the weight (f32).
pub fn delta(layer: &ResolvedLayer) -> candle_core::Result<Tensor> {
    let (r, o) = (layer.down.dims()[0], layer.up.dims()[0]);
    let down = layer.down.reshape((r, ()))?;
    let up = layer.up.reshape((o, r))?;
    let d = up.matmul(&down)?;
    if layer.down.rank() == 4 {
        let dd = layer.down.dims();
        d.reshape((o, dd[1], dd[2], dd[3]))
    } else {
        Ok(d)
    }
}

/// A weighted set of resolved adapters.
pub type WeightedLayers<'a> = [(f64, &'a [ResolvedLayer])];

/// The weights of a model whose only adaptable component is `component` (a flow model's
/// transformer), with `adapters` merged or kept unmerged; an error names the model when an
/// adapter targets anything else.
pub fn single_component(
    model: &str,
    base: &HashMap<String, Tensor>,
    component: Component,
    adapters: &WeightedLayers,
    merge: bool,
) -> candle_core::Result<HashMap<String, Tensor>> {
    if adapters.iter().any(|(_, ls)| ls.iter().any(|l| l.component != component)) {
        candle_core::bail!("model `{model}` takes LoRA on its {} only", component.name());
    }
    if merge {
        self::merge(base, component, adapters)
    } else {
        unmerged(base, component, adapters)
    }
}

/// Merged weights for `component`: a copy of `base` where each adapted weight is replaced by
/// W + Σ s·scale·ΔW (accumulated in f32, stored in the base dtype). Untouched tensors are shared.
pub fn merge(
    base: &HashMap<String, Tensor>,
    component: Component,
    adapters: &WeightedLayers,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut deltas: BTreeMap<&str, Tensor> = BTreeMap::new();
    for (s, layers) in adapters {
        for l in layers.iter().filter(|l| l.component == component) {
            let d = (delta(l)? * (s * l.scale))?;
            let e = match deltas.remove(l.module.as_str()) {
                Some(acc) => (acc + d)?,
                None => d,
            };
            deltas.insert(l.module.as_str(), e);
        }
    }
    let mut out = base.clone();
    for (module, d) in deltas {
        let key = format!("{module}.weight");
        let w = base.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("no weight {key}")))?;
        let merged = (w.to_dtype(DType::F32)? + d.to_device(w.device())?)?.to_dtype(w.dtype())?;
        out.insert(key, merged);
    }
    Ok(out)
}

/// Unmerged weights for `component`: `base` plus, for every adapted module, the factors as
/// `<module>.lora.<j>.{down,up,scale}` (read by `nn::Linear` / `nn::Conv2d`).
pub fn unmerged(
    base: &HashMap<String, Tensor>,
    component: Component,
    adapters: &WeightedLayers,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut out = base.clone();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (s, layers) in adapters {
        for l in layers.iter().filter(|l| l.component == component) {
            let key = format!("{}.weight", l.module);
            let w = base.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("no weight {key}")))?;
            let j = count.entry(l.module.as_str()).or_insert(0);
            let p = format!("{}.lora.{j}", l.module);
            *j += 1;
            out.insert(format!("{p}.down"), l.down.to_dtype(w.dtype())?.to_device(w.device())?);
            out.insert(format!("{p}.up"), l.up.to_dtype(w.dtype())?.to_device(w.device())?);
            let sc = Tensor::new(&[(s * l.scale) as f32], w.device())?.to_dtype(w.dtype())?;
            out.insert(format!("{p}.scale"), sc);
        }
    }
    Ok(out)
}
