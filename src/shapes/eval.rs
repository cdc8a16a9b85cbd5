//! The shapes-world evaluator (spec v1, "What counts as a correct image"): detect objects as
//! connected regions of palette-coloured pixels, classify their shapes from geometry, and judge
//! an image against its caption.
//!
//! Decisions the spec leaves open, fixed here:
//!
//! - **Non-background.** A pixel is non-background when its nearest colour (Euclidean RGB) among
//!   the background and the six palette colours is a palette colour; it is then assigned to that
//!   colour. No free threshold: the decision boundary is halfway between the background and the
//!   nearest palette entry (≥ 106 RGB units away for every entry), so anti-aliased edges split
//!   about evenly and noise of ±8 per channel (≤ 14 units) never changes a pixel's class (the
//!   closest two palette colours, blue and cyan, are 102 units apart).
//! - **Connectivity.** 4-connected regions of one colour; pixels touching only at a corner are
//!   separate regions. Regions under [`MIN_REGION_PIXELS`] (40) pixels are ignored.
//! - **Centre.** A region's centre is the centre of its bounding box, as the spec defines an
//!   object's position; relations compare centres strictly (no margin).
//! - **Shape** from three numbers of the region: the fill ratio `f` (pixels / bounding-box area),
//!   the aspect ratio `a` (long / short side of the box) and the vertical centroid `v` (mean pixel
//!   row measured from the box top, as a fraction of the box height: ½ for shapes symmetric top
//!   to bottom, ⅔ for a triangle with its apex up). See [`classify_shape`] for the thresholds
//!   and the values each rendered shape has.

use image::RgbImage;
use serde::Serialize;

use super::world::{parse_caption, CaptionSpec, Category, Color, ObjectSpec, Shape, BACKGROUND, SPEC_VERSION};

/// Regions with fewer pixels are ignored (the spec's 40).
pub const MIN_REGION_PIXELS: usize = 40;
/// Regions whose bounding box is more elongated than this are no shape.
pub const MAX_ASPECT: f32 = 1.5;
/// Vertical centroid above which a region is bottom-heavy (triangle): halfway between ½ and ⅔
/// would be 0.583; rendered triangles sit at 0.64–0.67, squares and discs at exactly 0.5.
pub const TRIANGLE_MIN_CENTROID: f32 = 0.58;
/// Balanced regions (squares, discs) have a vertical centroid within ½ ± this.
pub const BALANCED_CENTROID_TOLERANCE: f32 = 0.06;
/// Fill ratio from which a balanced region is a square (rendered discs ≤ 0.82, squares 1.0).
pub const SQUARE_MIN_FILL: f32 = 0.9;
/// Fill ratio from which a balanced region is a disc (rendered discs ≥ 0.77 at sizes 12..=20).
pub const CIRCLE_MIN_FILL: f32 = 0.68;
/// Fill ratio range of triangles (rendered: 0.50–0.55).
pub const TRIANGLE_FILL: std::ops::Range<f32> = 0.38..0.68;

/// The colour class of a pixel: `None` for background (nearest to (240, 240, 240)), else the
/// nearest palette colour. Ties go to the background, then to the palette order.
pub fn classify_pixel(rgb: [u8; 3]) -> Option<Color> {
    if rgb == BACKGROUND {
        return None;
    }
    let d2 = |c: [u8; 3]| -> i32 {
        let (r, g, b) = (rgb[0] as i32 - c[0] as i32, rgb[1] as i32 - c[1] as i32, rgb[2] as i32 - c[2] as i32);
        r * r + g * g + b * b
    };
    let mut best: (i32, Option<Color>) = (d2(BACKGROUND), None);
    for c in Color::ALL {
        let d = d2(c.rgb());
        if d < best.0 {
            best = (d, Some(c));
        }
    }
    best.1
}

/// One detected object: a connected region of one palette colour with at least
/// [`MIN_REGION_PIXELS`] pixels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub color: Color,
    /// `None` when the region's geometry matches no shape.
    pub shape: Option<Shape>,
    pub pixels: usize,
    /// Bounding box `[x0, y0, x1, y1]`, exclusive end.
    pub bbox: [u32; 4],
    /// Bounding-box centre in pixels.
    pub center: [f32; 2],
    /// Pixels / bounding-box area.
    pub fill: f32,
    /// Long / short side of the bounding box.
    pub aspect: f32,
    /// Mean pixel row (pixel centres) from the box top, as a fraction of the box height.
    pub centroid_y: f32,
}

impl Detection {
    /// Doubled bounding-box centre (integers).
    pub fn center2(&self) -> (i32, i32) {
        ((self.bbox[0] + self.bbox[2]) as i32, (self.bbox[1] + self.bbox[3]) as i32)
    }

    pub fn matches(&self, o: &ObjectSpec) -> bool {
        self.color == o.color && self.shape == Some(o.shape)
    }

    /// "red circle", or "red region (no shape)".
    pub fn describe(&self) -> String {
        match self.shape {
            Some(s) => format!("{} {}", self.color.word(), s.word()),
            None => format!("{} region (no shape)", self.color.word()),
        }
    }
}

/// Shape of a region from its fill ratio, aspect ratio and vertical centroid:
///
/// | shape | rule | rendered at sizes 12..=20 |
/// | --- | --- | --- |
/// | any | aspect ≤ 1.5, else none | 1.0 (triangles of even size 1.09: their top row is empty) |
/// | triangle | v ≥ 0.58 and 0.38 ≤ f < 0.68 | v 0.639–0.666, f 0.501–0.545 |
/// | square | \|v − ½\| ≤ 0.06 and f ≥ 0.9 | v 0.5, f 1.0 |
/// | circle | \|v − ½\| ≤ 0.06 and 0.68 ≤ f < 0.9 | v 0.5, f 0.778–0.812 |
///
/// Anything else (a ring, an upside-down triangle, a bar, a blob half-way between two shapes)
/// has no shape and so matches no caption object.
pub fn classify_shape(fill: f32, aspect: f32, centroid_y: f32) -> Option<Shape> {
    if aspect.is_nan() || aspect > MAX_ASPECT {
        return None;
    }
    if centroid_y >= TRIANGLE_MIN_CENTROID {
        return TRIANGLE_FILL.contains(&fill).then_some(Shape::Triangle);
    }
    if (centroid_y - 0.5).abs() > BALANCED_CENTROID_TOLERANCE {
        return None;
    }
    if fill >= SQUARE_MIN_FILL {
        Some(Shape::Square)
    } else if fill >= CIRCLE_MIN_FILL {
        Some(Shape::Circle)
    } else {
        None
    }
}

/// Detect the objects of an image (any size; the thresholds are meant for 64 × 64), in the
/// order of each region's first pixel in row-major order.
pub fn detect(img: &RgbImage) -> Vec<Detection> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let class: Vec<Option<Color>> = img.pixels().map(|p| classify_pixel(p.0)).collect();
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        let Some(color) = class[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut n, mut sum_y) = (0usize, 0usize);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        while let Some(p) = stack.pop() {
            let (x, y) = (p % w, p / w);
            n += 1;
            sum_y += y;
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            let mut visit = |q: usize| {
                if !seen[q] && class[q] == Some(color) {
                    seen[q] = true;
                    stack.push(q);
                }
            };
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < w {
                visit(p + 1);
            }
            if y > 0 {
                visit(p - w);
            }
            if y + 1 < h {
                visit(p + w);
            }
        }
        if n < MIN_REGION_PIXELS {
            continue;
        }
        let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
        let fill = n as f32 / (bw * bh);
        let aspect = bw.max(bh) / bw.min(bh);
        let centroid_y = (sum_y as f32 / n as f32 + 0.5 - y0 as f32) / bh;
        let bbox = [x0 as u32, y0 as u32, x1 as u32 + 1, y1 as u32 + 1];
        out.push(Detection {
            color,
            shape: classify_shape(fill, aspect, centroid_y),
            pixels: n,
            bbox,
            center: [(bbox[0] + bbox[2]) as f32 / 2.0, (bbox[1] + bbox[3]) as f32 / 2.0],
            fill,
            aspect,
            centroid_y,
        });
    }
    out
}

/// The verdict on one image.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    pub correct: bool,
    /// The caption's category as parsed (`None`: not a caption of the shapes world).
    pub category: Option<Category>,
    pub detected: Vec<Detection>,
    /// "ok", or why the image is wrong.
    pub reason: String,
}

fn list(d: &[Detection]) -> String {
    if d.is_empty() {
        "nothing".into()
    } else {
        d.iter().map(Detection::describe).collect::<Vec<_>>().join(", ")
    }
}

/// Judge an image against a caption (parsed with [`parse_caption`]; an unparsable caption is
/// judged wrong).
pub fn judge(caption: &str, img: &RgbImage) -> Judgement {
    match parse_caption(caption) {
        Some(spec) => judge_spec(&spec, img),
        None => Judgement {
            correct: false,
            category: None,
            detected: detect(img),
            reason: format!("{caption:?} is not a shapes-world caption"),
        },
    }
}

/// Judge an image against a parsed caption, by the rule of its category.
pub fn judge_spec(spec: &CaptionSpec, img: &RgbImage) -> Judgement {
    let detected = detect(img);
    let reason = verdict(spec, &detected).err();
    Judgement {
        correct: reason.is_none(),
        category: Some(spec.category),
        reason: reason.unwrap_or_else(|| "ok".into()),
        detected,
    }
}

fn verdict(spec: &CaptionSpec, d: &[Detection]) -> Result<(), String> {
    let want = &spec.objects;
    if d.len() != want.len() {
        return Err(format!("expected {} object(s), found {}: {}", want.len(), d.len(), list(d)));
    }
    match spec.category {
        Category::Single | Category::Counting => match d.iter().find(|x| !x.matches(&want[0])) {
            Some(x) => Err(format!("expected only {}, found {}", want[0], x.describe())),
            None => Ok(()),
        },
        Category::TwoObjects | Category::Colors | Category::Position => {
            // The two named objects differ, so at most one assignment matches.
            let (a, b) = if d[0].matches(&want[0]) && d[1].matches(&want[1]) {
                (&d[0], &d[1])
            } else if d[1].matches(&want[0]) && d[0].matches(&want[1]) {
                (&d[1], &d[0])
            } else {
                return Err(format!("expected {} and {}, found {}", want[0], want[1], list(d)));
            };
            match spec.relation {
                Some(rel) if !rel.holds_strictly(a.center2(), b.center2()) => Err(format!(
                    "{} at ({}, {}) is not {} {} at ({}, {})",
                    a.describe(),
                    a.center[0],
                    a.center[1],
                    rel.words(),
                    b.describe(),
                    b.center[0],
                    b.center[1]
                )),
                _ => Ok(()),
            }
        }
    }
}

/// Accuracy in one category.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryScore {
    pub category: Category,
    pub total: usize,
    pub correct: usize,
    /// `None` when the category had no images.
    pub accuracy: Option<f64>,
}

/// Per-category and mean accuracy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub spec_version: u32,
    /// The five categories, in the spec's order.
    pub categories: Vec<CategoryScore>,
    /// Mean of the per-category accuracies (the headline; categories without images are left
    /// out of the mean, 0 when none has any).
    pub mean_accuracy: f64,
    pub total: usize,
    pub correct: usize,
    /// Images whose caption did not parse (judged wrong, in no category).
    pub unparsed: usize,
}

impl Report {
    /// A report from `(category, correct)` outcomes; `None` for an unparsed caption.
    pub fn from_outcomes(outcomes: impl IntoIterator<Item = (Option<Category>, bool)>) -> Self {
        let mut tally = [(0usize, 0usize); 5];
        let (mut total, mut correct, mut unparsed) = (0, 0, 0);
        for (cat, ok) in outcomes {
            total += 1;
            correct += ok as usize;
            match cat {
                Some(c) => {
                    tally[c.index()].0 += 1;
                    tally[c.index()].1 += ok as usize;
                }
                None => unparsed += 1,
            }
        }
        let categories: Vec<CategoryScore> = Category::ALL
            .iter()
            .map(|&c| {
                let (t, k) = tally[c.index()];
                CategoryScore { category: c, total: t, correct: k, accuracy: (t > 0).then(|| k as f64 / t as f64) }
            })
            .collect();
        let accs: Vec<f64> = categories.iter().filter_map(|c| c.accuracy).collect();
        let mean_accuracy = if accs.is_empty() { 0.0 } else { accs.iter().sum::<f64>() / accs.len() as f64 };
        Self { spec_version: SPEC_VERSION, categories, mean_accuracy, total, correct, unparsed }
    }

    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = format!("{:<12} {:>8} {:>8} {:>9}\n", "category", "correct", "total", "accuracy");
        for c in &self.categories {
            let acc = c.accuracy.map(|a| format!("{a:.3}")).unwrap_or_else(|| "-".into());
            s += &format!("{:<12} {:>8} {:>8} {:>9}\n", c.category.name(), c.correct, c.total, acc);
        }
        if self.unparsed > 0 {
            s += &format!("{:<12} {:>8} {:>8} {:>9}\n", "(unparsed)", 0, self.unparsed, "-");
        }
        s += &format!("{:<12} {:>8} {:>8} {:>9.3}\n", "mean", self.correct, self.total, self.mean_accuracy);
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Judge `images[i]` against `captions[i]`, with categories taken from the parsed captions
/// (so a same-shape `two_objects` caption counts as `colors`; see [`parse_caption`]).
pub fn evaluate<S: AsRef<str>>(images: &[RgbImage], captions: &[S]) -> Report {
    assert_eq!(images.len(), captions.len(), "one caption per image");
    Report::from_outcomes(images.iter().zip(captions).map(|(img, c)| {
        let j = judge(c.as_ref(), img);
        (j.category, j.correct)
    }))
}

/// Like [`evaluate`], with each image's category given (as the caption sampler drew it).
pub fn evaluate_by_category<S: AsRef<str>>(images: &[RgbImage], captions: &[S], categories: &[Category]) -> Report {
    assert_eq!(images.len(), captions.len(), "one caption per image");
    assert_eq!(images.len(), categories.len(), "one category per image");
    Report::from_outcomes(images.iter().zip(captions).zip(categories).map(|((img, c), &cat)| {
        let j = judge(c.as_ref(), img);
        (j.category.map(|_| cat), j.correct)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::world::{render, Object};

    /// Features of every shape at every size and at a few sub-canvas offsets.
    #[test]
    fn rendered_shapes_classify_with_margin() {
        let mut seen: Vec<(Shape, f32, f32, f32)> = Vec::new();
        for shape in Shape::ALL {
            for size in 12..=20 {
                let o = Object { color: Color::Blue, shape, size, x: 7, y: 9 };
                let d = detect(&render(&[o]));
                assert_eq!(d.len(), 1);
                assert_eq!(d[0].shape, Some(shape), "{shape:?} {size}: {:?}", d[0]);
                seen.push((shape, d[0].fill, d[0].aspect, d[0].centroid_y));
            }
        }
        for (shape, f, a, v) in seen {
            match shape {
                Shape::Square => assert!(f == 1.0 && a == 1.0 && v == 0.5),
                Shape::Circle => assert!((0.74..0.83).contains(&f) && a == 1.0 && v == 0.5, "{f} {v}"),
                Shape::Triangle => {
                    assert!((0.47..0.58).contains(&f) && a <= 1.1 && (0.62..0.68).contains(&v), "{f} {v}")
                }
            }
        }
    }

    #[test]
    fn pixel_classes() {
        assert_eq!(classify_pixel(BACKGROUND), None);
        assert_eq!(classify_pixel([255, 255, 255]), None);
        for c in Color::ALL {
            assert_eq!(classify_pixel(c.rgb()), Some(c));
        }
        assert_eq!(classify_pixel([200, 30, 30]), Some(Color::Red));
    }

    #[test]
    fn odd_regions_have_no_shape() {
        // A 30 × 6 bar, a ring, an upside-down triangle.
        assert_eq!(classify_shape(1.0, 5.0, 0.5), None);
        assert_eq!(classify_shape(0.4, 1.0, 0.5), None);
        assert_eq!(classify_shape(0.52, 1.0, 0.35), None);
    }
}
