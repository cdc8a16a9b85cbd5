//! Compares schedules against a dump of diffusers' own numbers written by
//! `scripts/sampling/dump.py` (betas, ᾱ and `set_timesteps` results for many classes/spacings/step
//! counts; run it in the fixture venv). Runs only
//! when `TILLER_DIFFUSERS_DUMP` names the JSON file, so the normal test suite needs no Python.

use tiller::sampling::{build_sampler, NoiseSchedule, SamplerKind, SchedulerConfig};

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn schedules_match_diffusers_dump() {
    let Ok(path) = std::env::var("TILLER_DIFFUSERS_DUMP") else {
        eprintln!("TILLER_DIFFUSERS_DUMP not set; skipping");
        return;
    };
    let dump: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, b) in dump["betas"].as_object().unwrap() {
        let cfg: SchedulerConfig = serde_json::from_value(b["config"].clone()).unwrap();
        let s = NoiseSchedule::from_config(&cfg).unwrap();
        let want_b: Vec<f32> = serde_json::from_value(b["betas"].clone()).unwrap();
        let want_a: Vec<f32> = serde_json::from_value(b["alphas_cumprod"].clone()).unwrap();
        let max_b = s.betas.iter().zip(&want_b).map(|(x, y)| ulps(*x, *y)).max().unwrap();
        let max_a = s.alphas_cumprod.iter().zip(&want_a).map(|(x, y)| ulps(*x, *y)).max().unwrap();
        eprintln!("{name}: betas max {max_b} ulp, alphas_cumprod max {max_a} ulp");
        if cfg.rescale_betas_zero_snr {
            // torch's float32 sqrt is not correctly rounded (1 ulp off for ~20 % of inputs), and
            // the rescale takes sqrt → subtract → square → divide, so ᾱ agrees to ~1e-6 only.
            for (x, y) in s.alphas_cumprod.iter().zip(&want_a) {
                assert!((x - y).abs() <= 1e-5 * y.abs() + 1e-12, "{name}: {x} vs {y}");
            }
        } else {
            assert!(max_b <= 1 && max_a <= 1, "{name}");
        }
    }
    let (mut checked, mut errors) = (0, 0);
    for case in dump["cases"].as_array().unwrap() {
        let cfg: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let class = case["class"].as_str().unwrap();
        let kind = SchedulerConfig::kind_for_class(class).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let ours = build_sampler(kind, &cfg, steps, 0.0);
        let ctx = format!(
            "{class} {:?} offset {} zsnr {} steps {steps}",
            cfg.timestep_spacing, cfg.steps_offset, cfg.rescale_betas_zero_snr
        );
        if case.get("error").is_some() {
            assert!(ours.is_err(), "{ctx}: diffusers errors ({}) but we do not", case["error"]);
            errors += 1;
            continue;
        }
        let want_t: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        let ours = match ours {
            Ok(s) => s,
            Err(e) => {
                // DDIM/DDPM with leading + offset at steps = num_train reach t = 1000, which
                // diffusers only notices when indexing ᾱ inside step().
                let out_of_range = want_t.iter().any(|&t| t >= 1000.0);
                assert!(out_of_range && matches!(kind, SamplerKind::Ddim | SamplerKind::Ddpm), "{ctx}: {e}");
                errors += 1;
                continue;
            }
        };
        // serde_json's default float parser can be 1 ulp off in f64; the values are f32 anyway
        let f32s = |v: &[f64]| v.iter().map(|&t| t as f32).collect::<Vec<_>>();
        assert_eq!(f32s(&ours.timesteps()), f32s(&want_t), "{ctx}");
        let want_init = case["init_noise_sigma"].as_f64().unwrap();
        assert!(
            ((ours.init_noise_sigma() as f32) - want_init as f32).abs() <= 1e-6 * want_init as f32,
            "{ctx}: init sigma {} vs {want_init}",
            ours.init_noise_sigma()
        );
        if let (Some(ws), Some(os)) = (case.get("sigmas"), ours.sigmas()) {
            let ws: Vec<f32> = serde_json::from_value(ws.clone()).unwrap();
            assert_eq!(ws.len(), os.len(), "{ctx}");
            for (a, b) in os.iter().zip(&ws) {
                let ok = if cfg.rescale_betas_zero_snr {
                    (*a as f32 - b).abs() <= 1e-5 * b.abs()
                } else {
                    // torch's sqrt is ~1 ulp off for some inputs; interpolation can double that
                    (*a as f32 - b).abs() <= 1e-6 * b.abs()
                };
                assert!(ok, "{ctx}: sigma {a} vs {b}");
            }
        }
        checked += 1;
    }
    eprintln!("{checked} schedules equal, {errors} rejected as diffusers does");
}
