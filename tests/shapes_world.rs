//! The shapes world (spec v1): sampler determinism and constraints, renderer colours, and the
//! evaluator's verdicts on ground truth, on perturbed ground truth and on wrong images.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;

use image::RgbImage;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiller::shapes::eval::{detect, evaluate, evaluate_by_category, judge};
use tiller::shapes::world::{
    parse_caption, render, sample_scene, sample_scene_of, CaptionSpec, Category, Color, Object, ObjectSpec, Relation,
    Scene, Shape, BACKGROUND, CANVAS, GAP, MARGIN, RELATION_MARGIN,
};

const VOCABULARY: [&str; 22] = [
    "a",
    "and",
    "of",
    "left",
    "right",
    "above",
    "below",
    "two",
    "three",
    "four",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "cyan",
    "circle",
    "circles",
    "square",
    "squares",
    "triangle",
    "triangles",
];

fn scenes(seed: u64, n: u64) -> Vec<Scene> {
    (0..n).map(|i| sample_scene(seed, i)).collect()
}

#[test]
fn same_seed_same_scenes_and_pixels() {
    let a = scenes(11, 200);
    let b = scenes(11, 200);
    assert_eq!(a, b);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.render(), y.render());
    }
    let c = scenes(12, 200);
    assert!(a.iter().zip(&c).filter(|(x, y)| x == y).count() < 20, "another seed gives other scenes");
    assert_eq!(sample_scene_of(2026, Category::Position, 7), sample_scene_of(2026, Category::Position, 7));
}

/// Pins the generator: the spec's sampler must not drift between versions or platforms.
#[test]
fn generator_is_pinned() {
    let captions: Vec<String> = (0..4).map(|i| sample_scene(0, i).caption).collect();
    let eval: Vec<String> = Category::ALL.iter().map(|&c| sample_scene_of(2026, c, 0).caption).collect();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a over 50 rendered scenes
    for s in scenes(0, 50) {
        for &b in s.render().as_raw() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let train = [
        "a blue circle and a red square",
        "a blue circle and a cyan circle",
        "a red square and a yellow square",
        "a purple circle",
    ];
    let eval_first = [
        "a yellow triangle",
        "three cyan circles",
        "a blue triangle and a red square",
        "a red circle below a cyan circle",
        "a red circle and a yellow circle",
    ];
    assert_eq!(captions, train);
    assert_eq!(eval, eval_first);
    assert_eq!(h, 10480939082144843993);
}

#[test]
fn every_constraint_holds_on_5000_scenes() {
    let all = scenes(5, 5000);
    let mut per_cat: BTreeMap<Category, usize> = BTreeMap::new();
    let mut colors: BTreeMap<Color, usize> = BTreeMap::new();
    let mut shapes: BTreeMap<Shape, usize> = BTreeMap::new();
    let mut sizes: BTreeMap<i32, usize> = BTreeMap::new();
    let mut relations: BTreeMap<&str, usize> = BTreeMap::new();
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    let vocab: HashSet<&str> = VOCABULARY.into_iter().collect();
    let c = CANVAS as i32;
    for s in &all {
        s.check().unwrap_or_else(|e| panic!("{:?}: {e}", s.caption));
        *per_cat.entry(s.category()).or_default() += 1;
        // Vocabulary and spacing: lower case, single spaces, only the spec's words.
        assert!(s.caption.split(' ').all(|w| vocab.contains(w)), "{:?}", s.caption);
        assert_eq!(parse_caption(&s.caption).map(|p| p.objects), Some(s.spec.objects.clone()));
        for o in &s.objects {
            assert!(o.x >= MARGIN && o.y >= MARGIN && o.x + o.size <= c - MARGIN && o.y + o.size <= c - MARGIN);
            assert!((12..=20).contains(&o.size));
            *sizes.entry(o.size).or_default() += 1;
        }
        for (i, a) in s.objects.iter().enumerate() {
            for b in &s.objects[i + 1..] {
                let gap_x = (b.x - (a.x + a.size)).max(a.x - (b.x + b.size));
                let gap_y = (b.y - (a.y + a.size)).max(a.y - (b.y + b.size));
                assert!(gap_x >= GAP || gap_y >= GAP, "{:?}", s);
            }
        }
        let o = &s.objects;
        match s.category() {
            Category::Single => assert_eq!(o.len(), 1),
            Category::Counting => {
                assert!((2..=4).contains(&o.len()));
                assert!(o.iter().all(|x| x.color == o[0].color && x.shape == o[0].shape));
                *counts.entry(o.len()).or_default() += 1;
            }
            Category::TwoObjects => {
                assert_eq!(o.len(), 2);
                assert!(o[0].color != o[1].color || o[0].shape != o[1].shape);
            }
            Category::Position => {
                assert_eq!(o.len(), 2);
                assert!(o[0].color != o[1].color || o[0].shape != o[1].shape);
                let (a, b) = (o[0].center(), o[1].center());
                let m = RELATION_MARGIN as f32;
                let rel = s.spec.relation.unwrap();
                *relations.entry(rel.words()).or_default() += 1;
                assert!(s.caption.contains(&format!(" {} a ", rel.words())));
                match rel {
                    Relation::LeftOf => assert!(a.0 + m <= b.0),
                    Relation::RightOf => assert!(b.0 + m <= a.0),
                    Relation::Above => assert!(a.1 + m <= b.1),
                    Relation::Below => assert!(b.1 + m <= a.1),
                }
            }
            Category::Colors => {
                assert_eq!(o.len(), 2);
                assert!(o[0].shape == o[1].shape && o[0].color != o[1].color);
            }
        }
        for x in o {
            *colors.entry(x.color).or_default() += 1;
            *shapes.entry(x.shape).or_default() += 1;
        }
    }
    // Uniform category, then uniform slots: within ~4.5 standard deviations.
    let near = |got: usize, n: usize, p: f64| {
        let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        (got as f64 - mean).abs() <= 4.5 * sd
    };
    assert_eq!(per_cat.len(), 5);
    for (&k, &v) in &per_cat {
        assert!(near(v, 5000, 0.2), "{k}: {v} of 5000");
    }
    let n_counting = per_cat[&Category::Counting];
    for (&k, &v) in &counts {
        assert!(near(v, n_counting, 1.0 / 3.0), "count {k}: {v}");
    }
    let n_pos = per_cat[&Category::Position];
    for (&k, &v) in &relations {
        assert!(near(v, n_pos, 0.25), "{k}: {v}");
    }
    assert_eq!(relations.len(), 4);
    // Colours and shapes over scenes: approximately balanced (objects of a scene are correlated,
    // so only a loose check).
    let objs: usize = colors.values().sum();
    for (&k, &v) in &colors {
        assert!((v as f64 / objs as f64 - 1.0 / 6.0).abs() < 0.02, "{k:?}: {v}/{objs}");
    }
    for (&k, &v) in &shapes {
        assert!((v as f64 / objs as f64 - 1.0 / 3.0).abs() < 0.03, "{k:?}: {v}/{objs}");
    }
    assert_eq!(sizes.len(), 9);
    for (&k, &v) in &sizes {
        assert!(near(v, objs, 1.0 / 9.0), "size {k}: {v}/{objs}");
    }
}

#[test]
fn evaluation_sampler_draws_each_category() {
    for cat in Category::ALL {
        for i in 0..200 {
            let s = sample_scene_of(2026, cat, i);
            assert_eq!(s.category(), cat);
            s.check().unwrap();
        }
    }
}

#[test]
fn object_interiors_have_exact_palette_colours() {
    for s in scenes(9, 300) {
        let img = s.render();
        assert_eq!(img.dimensions(), (64, 64));
        for (i, j, p) in img.enumerate_pixels() {
            let owner: Vec<&Object> = s.objects.iter().filter(|o| o.covers(i as i32, j as i32)).collect();
            match owner.as_slice() {
                [] => assert_eq!(p.0, BACKGROUND),
                [o] => assert_eq!(p.0, o.color.rgb()),
                _ => panic!("objects overlap at ({i}, {j})"),
            }
        }
        let t = s.render_tensor(&candle_core::Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 64, 64]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        // Channel-major: channel 0 of pixel (0, 0) is the background's red.
        assert_eq!(v[0], 240.0 / 255.0);
    }
}

#[test]
fn palette_words_and_values_are_the_spec() {
    let want = [
        ("red", [220, 40, 40]),
        ("green", [40, 170, 70]),
        ("blue", [40, 90, 220]),
        ("yellow", [240, 200, 30]),
        ("purple", [140, 60, 190]),
        ("cyan", [40, 190, 200]),
    ];
    for (c, (w, rgb)) in Color::ALL.iter().zip(want) {
        assert_eq!((c.word(), c.rgb()), (w, rgb));
    }
}

#[test]
fn ground_truth_scores_100_percent_on_2000_scenes() {
    let mut imgs = Vec::new();
    let mut caps = Vec::new();
    let mut cats = Vec::new();
    for s in scenes(21, 1500) {
        imgs.push(s.render());
        caps.push(s.caption.clone());
        cats.push(s.category());
    }
    for cat in Category::ALL {
        for i in 0..100 {
            let s = sample_scene_of(2026, cat, i);
            imgs.push(s.render());
            caps.push(s.caption.clone());
            cats.push(cat);
        }
    }
    assert_eq!(imgs.len(), 2000);
    let r = evaluate_by_category(&imgs, &caps, &cats);
    if r.correct < 2000 {
        for (img, cap) in imgs.iter().zip(&caps) {
            let j = judge(cap, img);
            assert!(j.correct, "{cap:?}: {}", j.reason);
        }
    }
    assert_eq!((r.total, r.correct, r.mean_accuracy), (2000, 2000, 1.0));
    assert!(r.categories.iter().all(|c| c.total >= 100 && c.accuracy == Some(1.0)));
    // From the captions alone, same-shape two_objects captions are booked as colors.
    let r = evaluate(&imgs[..500], &caps[..500]);
    assert_eq!((r.correct, r.mean_accuracy, r.unparsed), (500, 1.0, 0));
}

fn noisy(img: &RgbImage, amp: i32, rng: &mut ChaCha8Rng) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for ch in p.0.iter_mut() {
            let d = (rng.next_u32() % (2 * amp as u32 + 1)) as i32 - amp;
            *ch = (*ch as i32 + d).clamp(0, 255) as u8;
        }
    }
    out
}

#[test]
fn robust_to_mild_noise() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let all = scenes(31, 1000);
    let ok = all.iter().filter(|s| judge(&s.caption, &noisy(&s.render(), 8, &mut rng)).correct).count();
    assert!(ok >= 990, "{ok}/1000 with ±8 noise");
    // Each shape at each size, with and without noise.
    for shape in Shape::ALL {
        for size in 12..=20 {
            for color in Color::ALL {
                let o = Object { color, shape, size, x: 20, y: 23 };
                let img = render(&[o]);
                for im in [img.clone(), noisy(&img, 8, &mut rng), noisy(&img, 20, &mut rng)] {
                    let d = detect(&im);
                    assert_eq!(d.len(), 1, "{shape:?} {size}");
                    assert_eq!((d[0].color, d[0].shape), (color, Some(shape)), "{shape:?} {size}: {:?}", d[0]);
                }
            }
        }
    }
}

/// Render with 4×4 supersampling (anti-aliased edges, as the spec allows a renderer to draw).
fn render_antialiased(objects: &[Object]) -> RgbImage {
    let mut img = RgbImage::from_pixel(CANVAS, CANVAS, image::Rgb(BACKGROUND));
    for (i, j, p) in img.enumerate_pixels_mut() {
        let mut acc = [0u32; 3];
        for sub in 0..16 {
            let (si, sj) = (4 * i as i32 + sub % 4, 4 * j as i32 + sub / 4);
            let rgb = objects
                .iter()
                .find(|o| o.shape.covers(4 * o.size, si - 4 * o.x, sj - 4 * o.y))
                .map(|o| o.color.rgb())
                .unwrap_or(BACKGROUND);
            for k in 0..3 {
                acc[k] += rgb[k] as u32;
            }
        }
        p.0 = acc.map(|a| ((a + 8) / 16) as u8);
    }
    img
}

#[test]
fn robust_to_antialiased_edges() {
    let all = scenes(41, 200);
    let ok = all.iter().filter(|s| judge(&s.caption, &render_antialiased(&s.objects)).correct).count();
    assert!(ok >= 198, "{ok}/200 anti-aliased");
}

fn with_objects(objects: Vec<Object>) -> RgbImage {
    assert!(objects.iter().enumerate().all(|(i, a)| objects[i + 1..].iter().all(|b| a.apart_from(b))));
    render(&objects)
}

/// An object from another scene that keeps its distance from all of `objects`, if any.
fn extra_object(objects: &[Object], from: u64) -> Option<Object> {
    (0..200u64)
        .flat_map(|i| sample_scene(from, i).objects)
        .find(|c| c.within_canvas() && objects.iter().all(|o| o.apart_from(c)))
}

#[test]
fn rejects_wrong_images() {
    let mut checked = BTreeMap::<&str, usize>::new();
    for (k, s) in scenes(51, 400).into_iter().enumerate() {
        let o = s.objects.clone();
        let mut wrong: Vec<(&str, RgbImage)> = Vec::new();
        // Wrong colour / wrong shape of one object (one that leaves the scene different from the
        // caption: with two named objects, not turning it into the other).
        let idx = k % o.len();
        let mut recolour = o.clone();
        recolour[idx].color = Color::ALL[(recolour[idx].color as usize + 1 + k % 5) % 6];
        let mut reshape = o.clone();
        reshape[idx].shape = Shape::ALL[(reshape[idx].shape as usize + 1 + k % 2) % 3];
        let named: Vec<ObjectSpec> = s.spec.objects.clone();
        let still_matches = |objs: &[Object]| {
            let mut a: Vec<ObjectSpec> = objs.iter().map(Object::spec).collect();
            let mut b = named.clone();
            a.sort_by_key(|x| (x.color, x.shape));
            b.sort_by_key(|x| (x.color, x.shape));
            a == b
        };
        if !still_matches(&recolour) {
            wrong.push(("wrong colour", with_objects(recolour)));
        }
        if !still_matches(&reshape) {
            wrong.push(("wrong shape", with_objects(reshape)));
        }
        // An extra object, and a missing one.
        if let Some(x) = extra_object(&o, 1000 + k as u64) {
            let mut more = o.clone();
            more.push(x);
            wrong.push(("extra object", with_objects(more)));
        }
        let mut fewer = o.clone();
        fewer.remove(idx);
        wrong.push(("missing object", with_objects(fewer)));
        wrong.push(("empty", render(&[])));
        for (what, img) in &wrong {
            let j = judge(&s.caption, img);
            assert!(!j.correct, "{what} accepted for {:?}", s.caption);
            *checked.entry(what).or_default() += 1;
        }
        // Wrong count: the same image judged against another count.
        if s.category() == Category::Counting {
            for n in 2..=4 {
                let mut spec = s.spec.clone();
                spec.objects = vec![spec.objects[0]; n];
                let j = judge(&spec.caption(), &s.render());
                assert_eq!(j.correct, n == o.len(), "{} on a scene of {}", spec.caption(), o.len());
                if n != o.len() {
                    *checked.entry("wrong count").or_default() += 1;
                }
            }
        }
        // Violated relation: the opposite relation, and the objects' roles swapped.
        if let Some(rel) = s.spec.relation {
            let opposite = match rel {
                Relation::LeftOf => Relation::RightOf,
                Relation::RightOf => Relation::LeftOf,
                Relation::Above => Relation::Below,
                Relation::Below => Relation::Above,
            };
            let flipped = CaptionSpec { relation: Some(opposite), ..s.spec.clone() };
            let swapped = CaptionSpec { objects: vec![named[1], named[0]], ..s.spec.clone() };
            for spec in [flipped, swapped] {
                let j = judge(&spec.caption(), &s.render());
                assert!(!j.correct, "{} accepted", spec.caption());
                assert!(j.reason.contains("is not"), "{}", j.reason);
                *checked.entry("violated relation").or_default() += 1;
            }
        }
    }
    for what in
        ["wrong colour", "wrong shape", "extra object", "missing object", "empty", "wrong count", "violated relation"]
    {
        assert!(checked.get(what).copied().unwrap_or(0) >= 30, "{what}: {checked:?}");
    }
}

#[test]
fn unparsable_caption_is_wrong() {
    let s = sample_scene(0, 0);
    let j = judge("a red dog", &s.render());
    assert!(!j.correct && j.category.is_none());
    let r = evaluate(&[s.render()], &["a red dog"]);
    assert_eq!((r.unparsed, r.correct, r.mean_accuracy), (1, 0, 0.0));
}

fn tiller() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tiller"));
    c.env("RUST_LOG", "warn");
    c
}

#[test]
fn cli_ground_truth_eval_scores_one() {
    let out = tiller().args(["eval", "shapes", "--ground-truth", "--per-category", "20", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mean_accuracy"], 1.0, "{v}");
    assert_eq!(v["total"], 100);
    let cats = v["categories"].as_array().unwrap();
    assert_eq!(cats.len(), 5);
    assert!(cats.iter().all(|c| c["total"] == 20 && c["accuracy"] == 1.0), "{v}");
}

#[test]
fn cli_sample_writes_pngs_and_captions() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        tiller().args(["shapes", "sample", "--seed", "3", "--count", "6", "--out"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(dir.path().join("captions.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    for (i, v) in lines.iter().enumerate() {
        let s = sample_scene(3, i as u64);
        assert_eq!(v["caption"], s.caption.as_str());
        assert_eq!(v["category"], s.category().name());
        assert_eq!(v["objects"].as_array().unwrap().len(), s.objects.len());
        assert_eq!(v["objects"][0]["x"], s.objects[0].x);
        let file = dir.path().join(v["file"].as_str().unwrap());
        let img = image::open(Path::new(&file)).unwrap().to_rgb8();
        assert_eq!(img, s.render());
    }
}

#[test]
fn cli_eval_runs_a_model_and_resizes_its_images() {
    // The tiny random-weight fixture draws 16×16 noise: it scores nothing, but the path runs.
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd15-tiny");
    let out = tiller()
        .args(["eval", "shapes", "--per-category", "1", "--steps", "2", "--json", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resized to 64x64 (nearest neighbour)"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], 5);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(saved, v);
    let results = std::fs::read_to_string(dir.path().join("results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 5);
    for line in results.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let img = image::open(dir.path().join(r["file"].as_str().unwrap())).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        assert_eq!(judge(r["caption"].as_str().unwrap(), &img).correct, r["correct"].as_bool().unwrap());
    }
}

/// `tiller shapes stream` writes the documented fixed-size records: category index, caption
/// length, zero-padded caption, then the rendered pixels of scene i of the seed.
#[test]
fn stream_records_are_the_sampled_scenes() {
    use tiller::shapes::cli::STREAM_RECORD_BYTES;
    let out = tiller().args(["shapes", "stream", "--seed", "5", "--start", "3", "--count", "4"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(STREAM_RECORD_BYTES, 2 + 94 + 64 * 64 * 3);
    assert_eq!(out.stdout.len(), 4 * STREAM_RECORD_BYTES);
    for (k, rec) in out.stdout.chunks(STREAM_RECORD_BYTES).enumerate() {
        let scene = sample_scene(5, 3 + k as u64);
        assert_eq!(rec[0] as usize, scene.category().index());
        let len = rec[1] as usize;
        assert_eq!(&rec[2..2 + len], scene.caption.as_bytes());
        assert!(rec[2 + len..96].iter().all(|&b| b == 0));
        assert_eq!(&rec[96..], scene.render().as_raw().as_slice());
    }
}

/// `tiller shapes sample --per-category` exports exactly the evaluation scenes, and
/// `tiller eval shapes --images` judges such a directory: the renderer's own images score 1,
/// and a wrong caption is counted wrong.
#[test]
fn eval_scenes_export_and_judging_saved_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out =
        tiller().args(["shapes", "sample", "--per-category", "3", "--seed", "2026", "--out"]).arg(d).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = tiller::shapes::cli::eval_scenes(2026, 3);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("captions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), want.len());
    for (l, s) in lines.iter().zip(&want) {
        assert_eq!(l["caption"], s.caption.as_str());
        assert_eq!(l["category"], s.category().name());
    }

    let judge_dir = |d: &Path| {
        let out = tiller().args(["eval", "shapes", "--json", "--images"]).arg(d).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = judge_dir(d);
    assert_eq!(r["total"], 15);
    assert_eq!(r["mean_accuracy"], 1.0);

    // Swap the first caption for another scene's: that image is now judged wrong.
    let mut edited = lines.clone();
    edited[0]["caption"] = lines[1]["caption"].clone();
    let text: String = edited.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(d.join("captions.jsonl"), text).unwrap();
    let r = judge_dir(d);
    assert_eq!(r["correct"], 14);

    // A listed file that is missing is an error naming it, not a panic.
    std::fs::remove_file(d.join(lines[2]["file"].as_str().unwrap())).unwrap();
    let out = tiller().args(["eval", "shapes", "--images"]).arg(d).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(lines[2]["file"].as_str().unwrap()));
}
