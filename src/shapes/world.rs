//! The shapes world, spec v1 (described in docs/shapes/README.md): vocabulary,
//! caption templates, the seeded scene sampler and the renderer.
//!
//! Everything here is integer geometry driven by ChaCha12 words (never floating point, never
//! `rand`'s distribution code), so a `(seed, index)` gives the same scene and the same pixels on
//! every platform and every version of `rand`.
//!
//! Coordinates: an object's box is the pixels `x..x + size` × `y..y + size` (top-left corner
//! `(x, y)`); pixel `(i, j)` covers `[i, i + 1) × [j, j + 1)` and is inside a shape when its centre
//! `(i + ½, j + ½)` is. Centres are kept doubled (`2x + size`) so that they stay integers.

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use serde::{Deserialize, Serialize};

/// The spec version this module implements.
pub const SPEC_VERSION: u32 = 1;
/// Canvas side in pixels.
pub const CANVAS: u32 = 64;
/// Background colour.
pub const BACKGROUND: [u8; 3] = [240, 240, 240];
/// Smallest object size (side of the bounding box), pixels.
pub const MIN_SIZE: i32 = 12;
/// Largest object size, pixels.
pub const MAX_SIZE: i32 = 20;
/// Minimum distance between an object's box and the canvas edge.
pub const MARGIN: i32 = 2;
/// Minimum number of background pixels between two boxes (along x or along y).
pub const GAP: i32 = 3;
/// Margin of a sampled position relation: centre of object 1 + 8 ≤ centre of object 2.
pub const RELATION_MARGIN: i32 = 8;
/// Placement tries per object before the whole layout is redrawn.
pub const PLACEMENT_TRIES: u32 = 100;
/// Layouts (fresh sizes and positions) tried for one caption before a new caption is drawn.
pub const LAYOUT_TRIES: u32 = 100;

/// Uniform integer in `0..n` from whole ChaCha words (rejection of the biased top zone), so the
/// stream of draws is defined by the generator alone.
pub fn below<R: RngCore + ?Sized>(rng: &mut R, n: u32) -> u32 {
    assert!(n > 0, "below(0)");
    let zone = u32::MAX - u32::MAX % n; // multiple of n
    loop {
        let v = rng.next_u32();
        if v < zone {
            return v % n;
        }
    }
}

fn pick<T: Copy, R: RngCore + ?Sized>(rng: &mut R, items: &[T]) -> T {
    items[below(rng, items.len() as u32) as usize]
}

/// A palette colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Cyan,
}

impl Color {
    pub const ALL: [Color; 6] = [Color::Red, Color::Green, Color::Blue, Color::Yellow, Color::Purple, Color::Cyan];

    /// Exact sRGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 170, 70],
            Color::Blue => [40, 90, 220],
            Color::Yellow => [240, 200, 30],
            Color::Purple => [140, 60, 190],
            Color::Cyan => [40, 190, 200],
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Cyan => "cyan",
        }
    }

    pub fn from_word(w: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.word() == w)
    }
}

/// A shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Square,
    Circle,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Square, Shape::Circle, Shape::Triangle];

    pub fn word(self) -> &'static str {
        match self {
            Shape::Square => "square",
            Shape::Circle => "circle",
            Shape::Triangle => "triangle",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Square => "squares",
            Shape::Circle => "circles",
            Shape::Triangle => "triangles",
        }
    }

    pub fn from_word(w: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.word() == w)
    }

    pub fn from_plural(w: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.plural() == w)
    }

    /// Whether the pixel at `(dx, dy)` relative to the top-left corner of an `s × s` box is
    /// inside the shape (its centre is; boundary included). Integer arithmetic in doubled units.
    pub fn covers(self, s: i32, dx: i32, dy: i32) -> bool {
        if dx < 0 || dy < 0 || dx >= s || dy >= s {
            return false;
        }
        // Doubled offsets of the pixel centre from the box centre.
        let (u, v) = (2 * dx + 1 - s, 2 * dy + 1 - s);
        match self {
            Shape::Square => true,
            // Disc of diameter s centred in the box: |p - c| ≤ s/2.
            Shape::Circle => u * u + v * v <= s * s,
            // Apex (s/2, 0), base from (0, s) to (s, s): half-width at depth d is d/2, so
            // |x - s/2| ≤ (y)/2 with y the pixel centre's depth below the apex.
            Shape::Triangle => 2 * u.abs() <= 2 * dy + 1,
        }
    }
}

/// A caption category (template).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Single,
    Counting,
    TwoObjects,
    Position,
    Colors,
}

impl Category {
    pub const ALL: [Category; 5] =
        [Category::Single, Category::Counting, Category::TwoObjects, Category::Position, Category::Colors];

    pub fn name(self) -> &'static str {
        match self {
            Category::Single => "single",
            Category::Counting => "counting",
            Category::TwoObjects => "two_objects",
            Category::Position => "position",
            Category::Colors => "colors",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Position in [`Category::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A position relation between object 1 and object 2 of a `position` caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [Relation::LeftOf, Relation::RightOf, Relation::Above, Relation::Below];

    pub fn words(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Whether the relation holds between doubled centres `a` (object 1) and `b` (object 2)
    /// with a margin of `margin2` doubled pixels: `left of` is `a.x + margin ≤ b.x` etc. (above:
    /// smaller y). With `margin2 = 0` this is not strict; use [`Relation::holds_strictly`].
    pub fn holds_with_margin(self, a: (i32, i32), b: (i32, i32), margin2: i32) -> bool {
        match self {
            Relation::LeftOf => a.0 + margin2 <= b.0,
            Relation::RightOf => b.0 + margin2 <= a.0,
            Relation::Above => a.1 + margin2 <= b.1,
            Relation::Below => b.1 + margin2 <= a.1,
        }
    }

    /// The relation without margin (as judged on detected regions): strictly left of, etc.
    pub fn holds_strictly(self, a: (i32, i32), b: (i32, i32)) -> bool {
        self.holds_with_margin(a, b, 1)
    }
}

/// A named object: colour and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub color: Color,
    pub shape: Shape,
}

impl ObjectSpec {
    pub fn new(color: Color, shape: Shape) -> Self {
        Self { color, shape }
    }

    fn sample<R: RngCore + ?Sized>(rng: &mut R) -> Self {
        // Colour first, then shape: each uniform, so the pair is uniform over all 18.
        let color = pick(rng, &Color::ALL);
        let shape = pick(rng, &Shape::ALL);
        Self { color, shape }
    }
}

impl std::fmt::Display for ObjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.color.word(), self.shape.word())
    }
}

/// What a caption asks for: its category, the objects the scene holds (in caption order;
/// `counting` repeats the one object N times) and, for `position`, the relation of object 1
/// to object 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptionSpec {
    pub category: Category,
    pub objects: Vec<ObjectSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relation: Option<Relation>,
}

const COUNT_WORDS: [&str; 3] = ["two", "three", "four"];

impl CaptionSpec {
    /// Draw the slots of `category` uniformly among the values the spec allows (rejection for
    /// the "must differ" constraints, which keeps the draw uniform over the allowed pairs).
    pub fn sample<R: RngCore + ?Sized>(rng: &mut R, category: Category) -> Self {
        let (objects, relation) = match category {
            Category::Single => (vec![ObjectSpec::sample(rng)], None),
            Category::Counting => {
                let n = 2 + below(rng, 3) as usize;
                let o = ObjectSpec::sample(rng);
                (vec![o; n], None)
            }
            Category::TwoObjects | Category::Position => {
                let (a, b) = loop {
                    let a = ObjectSpec::sample(rng);
                    let b = ObjectSpec::sample(rng);
                    if a != b {
                        break (a, b);
                    }
                };
                let rel = (category == Category::Position).then(|| pick(rng, &Relation::ALL));
                (vec![a, b], rel)
            }
            Category::Colors => {
                let shape = pick(rng, &Shape::ALL);
                let (c1, c2) = loop {
                    let c1 = pick(rng, &Color::ALL);
                    let c2 = pick(rng, &Color::ALL);
                    if c1 != c2 {
                        break (c1, c2);
                    }
                };
                (vec![ObjectSpec::new(c1, shape), ObjectSpec::new(c2, shape)], None)
            }
        };
        Self { category, objects, relation }
    }

    /// The caption text (the spec's template for the category).
    pub fn caption(&self) -> String {
        let o = &self.objects;
        match self.category {
            Category::Single => format!("a {}", o[0]),
            Category::Counting => {
                format!("{} {} {}", COUNT_WORDS[o.len() - 2], o[0].color.word(), o[0].shape.plural())
            }
            Category::TwoObjects | Category::Colors => format!("a {} and a {}", o[0], o[1]),
            Category::Position => {
                format!("a {} {} a {}", o[0], self.relation.map(Relation::words).unwrap_or("?"), o[1])
            }
        }
    }

    /// Whether the spec's constraints on the slots hold (object count, "must differ", ...).
    pub fn is_valid(&self) -> bool {
        let o = &self.objects;
        let rel_ok = self.relation.is_some() == (self.category == Category::Position);
        rel_ok
            && match self.category {
                Category::Single => o.len() == 1,
                Category::Counting => (2..=4).contains(&o.len()) && o.iter().all(|x| *x == o[0]),
                Category::TwoObjects | Category::Position => o.len() == 2 && o[0] != o[1],
                Category::Colors => o.len() == 2 && o[0].shape == o[1].shape && o[0].color != o[1].color,
            }
    }
}

/// Parse a caption of the spec's grammar (case and runs of whitespace are forgiven, words are
/// not). `None` when the text is not a caption of the shapes world or breaks a template's
/// constraint (e.g. two identical objects).
///
/// `a {color} {shape} and a {color2} {shape}` (same shape, different colours) is both a
/// `two_objects` and a `colors` caption; it parses as `colors`, the more specific template. The
/// two categories are judged by the same rule, so only per-category bookkeeping can differ:
/// [`crate::shapes::eval::evaluate_by_category`] takes the categories from the sampler instead.
pub fn parse_caption(text: &str) -> Option<CaptionSpec> {
    let lower = text.to_lowercase();
    let w: Vec<&str> = lower.split_whitespace().collect();
    let object = |c: &str, s: &str| Some(ObjectSpec::new(Color::from_word(c)?, Shape::from_word(s)?));
    let spec = match w.as_slice() {
        ["a", c, s] => CaptionSpec { category: Category::Single, objects: vec![object(c, s)?], relation: None },
        [n, c, s] if COUNT_WORDS.contains(n) => {
            let count = 2 + COUNT_WORDS.iter().position(|x| x == n)?;
            let o = ObjectSpec::new(Color::from_word(c)?, Shape::from_plural(s)?);
            CaptionSpec { category: Category::Counting, objects: vec![o; count], relation: None }
        }
        ["a", c1, s1, rest @ ..] => {
            let a = object(c1, s1)?;
            let (category, relation, tail) = match rest {
                ["and", tail @ ..] => (
                    if matches!(tail, ["a", _, s2] if s2 == s1) { Category::Colors } else { Category::TwoObjects },
                    None,
                    tail,
                ),
                ["left", "of", tail @ ..] => (Category::Position, Some(Relation::LeftOf), tail),
                ["right", "of", tail @ ..] => (Category::Position, Some(Relation::RightOf), tail),
                ["above", tail @ ..] => (Category::Position, Some(Relation::Above), tail),
                ["below", tail @ ..] => (Category::Position, Some(Relation::Below), tail),
                _ => return None,
            };
            let b = match tail {
                ["a", c2, s2] => object(c2, s2)?,
                _ => return None,
            };
            CaptionSpec { category, objects: vec![a, b], relation }
        }
        _ => return None,
    };
    spec.is_valid().then_some(spec)
}

/// One placed object: colour, shape and its `size × size` box with top-left corner `(x, y)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Object {
    pub color: Color,
    pub shape: Shape,
    pub size: i32,
    pub x: i32,
    pub y: i32,
}

impl Object {
    pub fn spec(&self) -> ObjectSpec {
        ObjectSpec::new(self.color, self.shape)
    }

    /// Bounding box `(x0, y0, x1, y1)`, exclusive end.
    pub fn bbox(&self) -> (i32, i32, i32, i32) {
        (self.x, self.y, self.x + self.size, self.y + self.size)
    }

    /// Box centre in doubled pixel units: `(2x + size, 2y + size)`.
    pub fn center2(&self) -> (i32, i32) {
        (2 * self.x + self.size, 2 * self.y + self.size)
    }

    /// Box centre in pixels.
    pub fn center(&self) -> (f32, f32) {
        let (x, y) = self.center2();
        (x as f32 / 2.0, y as f32 / 2.0)
    }

    /// Whether pixel `(i, j)` of the canvas belongs to this object.
    pub fn covers(&self, i: i32, j: i32) -> bool {
        self.shape.covers(self.size, i - self.x, j - self.y)
    }

    /// Inside the canvas with the margin.
    pub fn within_canvas(&self) -> bool {
        let c = CANVAS as i32;
        self.x >= MARGIN && self.y >= MARGIN && self.x + self.size + MARGIN <= c && self.y + self.size + MARGIN <= c
    }

    /// At least [`GAP`] background pixels between the two boxes, along x or along y.
    pub fn apart_from(&self, o: &Object) -> bool {
        self.x + self.size + GAP <= o.x
            || o.x + o.size + GAP <= self.x
            || self.y + self.size + GAP <= o.y
            || o.y + o.size + GAP <= self.y
    }
}

/// A scene: its caption and the objects it holds (in caption order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scene {
    pub caption: String,
    pub spec: CaptionSpec,
    pub objects: Vec<Object>,
}

impl Scene {
    /// Draw a scene: a category uniformly, then its slots, then the layout.
    pub fn sample<R: RngCore + ?Sized>(rng: &mut R) -> Self {
        let category = pick(rng, &Category::ALL);
        Self::sample_category(rng, category)
    }

    /// Draw a scene of one category (the evaluation caption sampler).
    pub fn sample_category<R: RngCore + ?Sized>(rng: &mut R, category: Category) -> Self {
        loop {
            let spec = CaptionSpec::sample(rng, category);
            // Every caption of the spec has layouts (4 boxes of 20 fit with room to spare), so a
            // failure here is astronomically rare; a fresh caption keeps the draw bounded per try.
            if let Some(objects) = layout(rng, &spec) {
                return Self { caption: spec.caption(), spec, objects };
            }
        }
    }

    pub fn category(&self) -> Category {
        self.spec.category
    }

    /// Render at 64 × 64.
    pub fn render(&self) -> RgbImage {
        render(&self.objects)
    }

    /// Render as a (1, 3, 64, 64) f32 tensor in [0, 1] (byte / 255).
    pub fn render_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        image_to_tensor(&self.render(), device)
    }

    /// Check every constraint of the spec; `Err` names the first one broken.
    pub fn check(&self) -> Result<(), String> {
        if !self.spec.is_valid() {
            return Err(format!("caption slots break the template: {:?}", self.spec));
        }
        if self.spec.caption() != self.caption {
            return Err(format!("caption {:?} is not the template's {:?}", self.caption, self.spec.caption()));
        }
        if self.objects.len() != self.spec.objects.len() {
            return Err(format!("{} objects for a caption naming {}", self.objects.len(), self.spec.objects.len()));
        }
        for (o, s) in self.objects.iter().zip(&self.spec.objects) {
            if o.spec() != *s {
                return Err(format!("object {o:?} is not the caption's {s}"));
            }
            if !(MIN_SIZE..=MAX_SIZE).contains(&o.size) {
                return Err(format!("size {} outside {MIN_SIZE}..={MAX_SIZE}", o.size));
            }
            if !o.within_canvas() {
                return Err(format!("{o:?} is not inside the canvas with margin {MARGIN}"));
            }
        }
        for (i, a) in self.objects.iter().enumerate() {
            for b in &self.objects[i + 1..] {
                if !a.apart_from(b) {
                    return Err(format!("{a:?} and {b:?} are closer than {GAP} pixels"));
                }
            }
        }
        if let Some(rel) = self.spec.relation {
            let (a, b) = (self.objects[0].center2(), self.objects[1].center2());
            if !rel.holds_with_margin(a, b, 2 * RELATION_MARGIN) {
                return Err(format!("relation `{}` does not hold with margin {RELATION_MARGIN}", rel.words()));
            }
        }
        Ok(())
    }

    /// The JSON line written by `tiller shapes sample` (without the file name).
    pub fn to_json(&self) -> serde_json::Value {
        let objects: Vec<serde_json::Value> = self
            .objects
            .iter()
            .map(|o| {
                let (cx, cy) = o.center();
                serde_json::json!({
                    "color": o.color, "shape": o.shape, "size": o.size, "x": o.x, "y": o.y,
                    "center": [cx, cy],
                })
            })
            .collect();
        let mut v = serde_json::json!({"caption": self.caption, "category": self.spec.category, "objects": objects});
        if let Some(r) = self.spec.relation {
            v["relation"] = serde_json::json!(r);
        }
        v
    }
}

/// Place the caption's objects: sizes uniform in 12..=20, top-left corners uniform over the
/// positions inside the margin, each object redrawn up to [`PLACEMENT_TRIES`] times until it
/// keeps its distance to the objects already placed (and, for object 2 of `position`, the
/// relation holds with its margin); up to [`LAYOUT_TRIES`] fresh layouts. `None` if all fail.
pub fn layout<R: RngCore + ?Sized>(rng: &mut R, spec: &CaptionSpec) -> Option<Vec<Object>> {
    let c = CANVAS as i32;
    'layout: for _ in 0..LAYOUT_TRIES {
        let mut placed: Vec<Object> = Vec::with_capacity(spec.objects.len());
        for (k, o) in spec.objects.iter().enumerate() {
            let size = MIN_SIZE + below(rng, (MAX_SIZE - MIN_SIZE + 1) as u32) as i32;
            let span = (c - 2 * MARGIN - size + 1) as u32;
            let mut ok = None;
            for _ in 0..PLACEMENT_TRIES {
                let x = MARGIN + below(rng, span) as i32;
                let y = MARGIN + below(rng, span) as i32;
                let cand = Object { color: o.color, shape: o.shape, size, x, y };
                let related = match (spec.relation, k) {
                    (Some(rel), 1) => rel.holds_with_margin(placed[0].center2(), cand.center2(), 2 * RELATION_MARGIN),
                    _ => true,
                };
                if related && placed.iter().all(|p| p.apart_from(&cand)) {
                    ok = Some(cand);
                    break;
                }
            }
            match ok {
                Some(cand) => placed.push(cand),
                None => continue 'layout,
            }
        }
        return Some(placed);
    }
    None
}

/// The generator of `seed`: ChaCha12 seeded by `seed_from_u64(seed)` on stream `stream`.
pub fn rng_for(seed: u64, stream: u64) -> ChaCha12Rng {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Scene `index` of the training stream of `seed` (stream `index` of the seed's ChaCha12
/// generator; indices below 2^56).
pub fn sample_scene(seed: u64, index: u64) -> Scene {
    Scene::sample(&mut rng_for(seed, index))
}

/// Scene `index` of `category` for the evaluation caption sampler: the category's slots drawn
/// uniformly on stream `(category + 1) << 56 | index` of the seed's generator (disjoint from the
/// streams of [`sample_scene`]).
pub fn sample_scene_of(seed: u64, category: Category, index: u64) -> Scene {
    let stream = ((category.index() as u64 + 1) << 56) | (index & ((1 << 56) - 1));
    Scene::sample_category(&mut rng_for(seed, stream), category)
}

/// Render objects on the background, 64 × 64, no anti-aliasing (later objects on top; the
/// sampler's objects never overlap).
pub fn render(objects: &[Object]) -> RgbImage {
    let mut img = RgbImage::from_pixel(CANVAS, CANVAS, image::Rgb(BACKGROUND));
    for o in objects {
        let rgb = image::Rgb(o.color.rgb());
        for j in o.y.max(0)..(o.y + o.size).min(CANVAS as i32) {
            for i in o.x.max(0)..(o.x + o.size).min(CANVAS as i32) {
                if o.covers(i, j) {
                    img.put_pixel(i as u32, j as u32, rgb);
                }
            }
        }
    }
    img
}

/// An RGB image as a (1, 3, H, W) f32 tensor in [0, 1] (byte / 255).
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    Tensor::from_vec(data, (1, h as usize, w as usize, 3), device)?.permute((0, 3, 1, 2))?.contiguous()
}

/// A (3, H, W) or (1, 3, H, W) tensor in [0, 1] as an RGB image (each value quantised with
/// `round(x · 255)`, as the PNG encoder does).
pub fn tensor_to_image(t: &Tensor) -> candle_core::Result<RgbImage> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
    let t = if t.rank() == 4 { t.squeeze(0)? } else { t };
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        candle_core::bail!("expected 3 channels, got {c}");
    }
    let hwc: Vec<f32> = t.permute((1, 2, 0))?.contiguous()?.flatten_all()?.to_vec1()?;
    let bytes = hwc.into_iter().map(crate::util::encode::quantize).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| candle_core::Error::Msg("bad image buffer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_round_trip_through_the_parser() {
        for i in 0..500 {
            let s = sample_scene(3, i);
            let p = parse_caption(&s.caption).unwrap_or_else(|| panic!("unparsed {:?}", s.caption));
            assert_eq!(p.objects, s.spec.objects);
            assert_eq!(p.relation, s.spec.relation);
            let same_shape_pair = s.spec.objects.len() == 2 && s.spec.objects[0].shape == s.spec.objects[1].shape;
            if s.category() == Category::TwoObjects && same_shape_pair {
                assert_eq!(p.category, Category::Colors);
            } else {
                assert_eq!(p.category, s.category());
            }
        }
    }

    #[test]
    fn parser_rejects_off_grammar() {
        for bad in [
            "",
            "a red",
            "a red circles",
            "two red circle",
            "one red circle",
            "five red circles",
            "a red circle and a red circle",
            "a red circle left of a red circle",
            "a red circle left a blue square",
            "a red circle and blue square",
            "a pink circle",
            "a red circle, and a blue square",
            "a red circle near a blue square",
        ] {
            assert_eq!(parse_caption(bad), None, "{bad:?}");
        }
        let p = parse_caption("  A Red  Circle right of a blue square ").unwrap();
        assert_eq!(p.relation, Some(Relation::RightOf));
        assert_eq!(parse_caption("four cyan triangles").unwrap().objects.len(), 4);
    }

    #[test]
    fn shapes_cover_expected_pixels() {
        for s in MIN_SIZE..=MAX_SIZE {
            let count = |sh: Shape| {
                (0..s).flat_map(|j| (0..s).map(move |i| (i, j))).filter(|&(i, j)| sh.covers(s, i, j)).count()
            };
            assert_eq!(count(Shape::Square), (s * s) as usize);
            let circle = count(Shape::Circle) as f64 / (s * s) as f64;
            assert!((circle - std::f64::consts::FRAC_PI_4).abs() < 0.06, "s={s} circle fill {circle}");
            let tri = count(Shape::Triangle) as f64 / (s * s) as f64;
            assert!((tri - 0.5).abs() < 0.06, "s={s} triangle fill {tri}");
            // Bottom row of the triangle spans the box; apex in the middle column(s).
            assert!((0..s).all(|i| Shape::Triangle.covers(s, i, s - 1)));
            assert!(!Shape::Triangle.covers(s, 0, s / 2));
        }
    }

    #[test]
    fn tensor_round_trip() {
        let s = sample_scene(1, 2);
        let img = s.render();
        let t = s.render_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 64, 64]);
        assert_eq!(tensor_to_image(&t).unwrap(), img);
    }
}
