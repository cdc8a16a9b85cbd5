//! Replays whole sampling loops recorded from diffusers 0.42 (torch CPU, float32) with a fake
//! closed-form "network" (`out = 0.8·tanh(x_in) + bias·t/1000`) and the noise diffusers drew,
//! comparing every intermediate latent and which steps draw noise.
//!
//! `GOLDEN` below (15 small loops, latents 1×1×2×2) always runs. A larger dump (178 loops:
//! every prediction type, clip/thresholding, η, spacings, zero-SNR) runs when
//! `TILLER_DIFFUSERS_STEPS` names its JSON file; both come from `scripts/sampling/steps.py` (diffusers venv), which
//! monkeypatches diffusers' `randn_tensor` to record each draw.

use candle_core::{Device, Tensor};
use tiller::sampling::{build_sampler, SchedulerConfig};

fn tensor(v: &serde_json::Value, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn golden_loops_match_diffusers() {
    check_dump(GOLDEN);
}

#[test]
fn sampling_loops_match_diffusers_dump() {
    let Ok(path) = std::env::var("TILLER_DIFFUSERS_STEPS") else {
        eprintln!("TILLER_DIFFUSERS_STEPS not set; skipping");
        return;
    };
    check_dump(&std::fs::read_to_string(path).unwrap());
}

fn check_dump(text: &str) {
    let dump: serde_json::Value = serde_json::from_str(text).unwrap();
    let shape: Vec<usize> = serde_json::from_value(dump["shape"].clone()).unwrap();
    let init = tensor(&dump["init"], &shape);
    let bias = tensor(&dump["bias"], &shape);
    let mut worst = 0f32;
    for case in dump["cases"].as_array().unwrap() {
        let cfg = SchedulerConfig::from_json(&case["config"].to_string()).unwrap();
        let kind = SchedulerConfig::kind_for_class(&cfg.class_name).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let eta = case["eta"].as_f64().unwrap();
        let ctx = format!("{} {} steps {steps} eta {eta}", cfg.class_name, case["config"]);
        let sampler = build_sampler(kind, &cfg, steps, eta).unwrap();
        let draws: Vec<usize> = serde_json::from_value(case["draws"].clone()).unwrap();
        let mut noises = case["noises"].as_array().unwrap().iter().map(|n| tensor(n, &shape));
        let mut x = (&init * sampler.init_noise_sigma()).unwrap();
        for (i, want) in case["traj"].as_array().unwrap().iter().enumerate() {
            assert_eq!(sampler.step_needs_noise(i) as usize, draws[i], "{ctx}: noise draw at step {i}");
            let t = sampler.timestep(i);
            let x_in = sampler.scale_model_input(&x, i).unwrap();
            let out = ((x_in.tanh().unwrap() * 0.8).unwrap() + (&bias * (t as f32 / 1000.0) as f64).unwrap()).unwrap();
            let z = if sampler.step_needs_noise(i) { Some(noises.next().unwrap()) } else { None };
            x = sampler.step(&x, &out, i, z.as_ref()).unwrap();
            let want = tensor(want, &shape);
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
            let err = (&x - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale;
            // Zero-terminal-SNR schedules: torch's inexact float32 sqrt makes diffusers' own ᾱ
            // differ ~1e-5 from the exact computation, and DDIM η=1 at ᾱ_t = 0 takes
            // sqrt(1 − ᾱ_prev − σ²) of a value that is 0 up to rounding.
            let tol = if cfg.rescale_betas_zero_snr { 1e-3 } else { 1e-4 };
            if !cfg.rescale_betas_zero_snr {
                worst = worst.max(err);
            }
            assert!(err < tol, "{ctx}: step {i} relative error {err}");
        }
        assert!(noises.next().is_none(), "{ctx}: diffusers drew more noise");
    }
    eprintln!("{} loops match; worst relative error {worst:e}", dump["cases"].as_array().unwrap().len());
}

const GOLDEN: &str = r#"{"shape": [1, 1, 2, 2],
 "init": [1.5409960746765137, -0.293428897857666, -2.1787893772125244, 0.5684312582015991],
 "bias": [-1.0845223665237427, -1.3985954523086548, 0.40334683656692505, 0.8380263447761536],
 "cases": [
  {"class_": "DDIMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "DDIMScheduler"}, "steps": 4, "eta": 0.0, "timesteps": [751.0, 501.0, 251.0, 1.0], "draws": [0, 0, 0, 0], "noises": [], "traj": [[3.5341222286224365, 1.0196541547775269, -4.2169694900512695, -0.09775775671005249], [5.331555366516113, 1.658536672592163, -6.139456748962402, -0.4121941924095154], [6.151078701019287, 1.7632625102996826, -7.023397922515869, -0.43542563915252686], [6.144008159637451, 1.7548750638961792, -7.016692638397217, -0.43164098262786865]]},
  {"class_": "DDIMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "DDIMScheduler"}, "steps": 4, "eta": 1.0, "timesteps": [751.0, 501.0, 251.0, 1.0], "draws": [1, 1, 1, 1], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022], [-0.612273097038269, 0.5036107301712036, 0.23096680641174316, 0.6930773258209229], [-0.26686057448387146, 2.1784658432006836, 0.10213729739189148, -0.2590096890926361], [-0.15490040183067322, -1.3705888986587524, -0.13192042708396912, 0.8848397731781006]], "traj": [[3.613863229751587, 1.9937913417816162, -4.762551784515381, -0.4648069739341736], [5.056214332580566, 3.3012681007385254, -6.67779016494751, -0.44724345207214355], [5.784047603607178, 3.8023409843444824, -7.648114204406738, -0.4685574471950531], [5.766774654388428, 3.759141206741333, -7.637546062469482, -0.4432627558708191]]},
  {"class_": "DDIMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "_class_name": "DDIMScheduler"}, "steps": 4, "eta": 0.0, "timesteps": [999.0, 749.0, 499.0, 249.0], "draws": [0, 0, 0, 0], "noises": [], "traj": [[1.578774094581604, -0.010995179414749146, -2.0821878910064697, 0.34642452001571655], [1.5252363681793213, 0.3165550231933594, -1.8333525657653809, 0.05257853865623474], [1.3247588872909546, 0.4707021117210388, -1.4590835571289062, -0.13506154716014862], [0.8788191676139832, 0.39299172163009644, -0.8859938979148865, -0.16844025254249573]]},
  {"class_": "DDIMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": true, "prediction_type": "sample", "_class_name": "DDIMScheduler"}, "steps": 3, "eta": 0.3, "timesteps": [667.0, 334.0, 1.0], "draws": [1, 1, 1], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022], [-0.612273097038269, 0.5036107301712036, 0.23096680641174316, 0.6930773258209229], [-0.26686057448387146, 2.1784658432006836, 0.10213729739189148, -0.2590096890926361]], "traj": [[1.0787310600280762, -0.5955923199653625, -1.9631483554840088, 0.9271493554115295], [0.3148813843727112, -0.8839510679244995, -0.7174109816551208, 0.8882530927658081], [0.29093846678733826, -0.7726914882659912, -0.6469683051109314, 0.7879067063331604]]},
  {"class_": "DDPMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "DDPMScheduler"}, "steps": 4, "eta": 0.0, "timesteps": [751.0, 501.0, 251.0, 1.0], "draws": [1, 1, 1, 1], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022], [-0.612273097038269, 0.5036107301712036, 0.23096680641174316, 0.6930773258209229], [-0.26686057448387146, 2.1784658432006836, 0.10213729739189148, -0.2590096890926361], [-0.15490040183067322, -1.3705888986587524, -0.13192042708396912, 0.8848397731781006]], "traj": [[3.613863229751587, 1.9937912225723267, -4.762551307678223, -0.46480685472488403], [5.056214332580566, 3.3012678623199463, -6.677789688110352, -0.447243332862854], [5.784048080444336, 3.8023409843444824, -7.64811372756958, -0.4685574173927307], [5.75597620010376, 3.7726237773895264, -7.621603488922119, -0.45454710721969604]]},
  {"class_": "DDPMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "_class_name": "DDPMScheduler"}, "steps": 3, "eta": 0.0, "timesteps": [999.0, 666.0, 332.0], "draws": [1, 1, 1], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022], [-0.612273097038269, 0.5036107301712036, 0.23096680641174316, 0.6930773258209229], [-0.26686057448387146, 2.1784658432006836, 0.10213729739189148, -0.2590096890926361]], "traj": [[0.4770766496658325, 0.8159247636795044, -1.2794601917266846, -0.06707662343978882], [0.044677734375, 0.9308737516403198, -0.1577935367822647, 0.10334303975105286], [0.25351065397262573, 0.5999168753623962, -0.12152443081140518, -0.1697612702846527]]},
  {"class_": "EulerDiscreteScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "EulerDiscreteScheduler"}, "steps": 4, "eta": 0.0, "timesteps": [999.0, 666.0, 333.0, 0.0], "draws": [0, 0, 0, 0], "noises": [], "traj": [[26.662691116333008, 14.717303276062012, -27.43720054626465, -6.286947250366211], [26.50836753845215, 14.97861385345459, -26.38192367553711, -5.859637260437012], [26.111997604370117, 14.676706314086914, -25.780683517456055, -5.389405250549316], [26.08866310119629, 14.653371810913086, -25.757349014282227, -5.366072177886963]]},
  {"class_": "EulerDiscreteScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "timestep_spacing": "leading", "_class_name": "EulerDiscreteScheduler"}, "steps": 4, "eta": 0.0, "timesteps": [751.0, 501.0, 251.0, 1.0], "draws": [0, 0, 0, 0], "noises": [], "traj": [[6.739320755004883, 1.9444087743759155, -8.041462898254395, -0.1864171028137207], [6.5030999183654785, 2.0229809284210205, -7.488529682159424, -0.5027689337730408], [6.156325340270996, 1.7647676467895508, -7.029390335083008, -0.4357970952987671], [6.123318672180176, 1.7336622476577759, -6.9963555335998535, -0.42228567600250244]]},
  {"class_": "EulerDiscreteScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "_class_name": "EulerDiscreteScheduler"}, "steps": 2, "eta": 0.0, "timesteps": [999.0, 499.0], "draws": [0, 0], "noises": [], "traj": [[2.893098831176758, 0.9511775970458984, -3.3118820190429688, -0.1562213897705078], [0.6448984146118164, 0.5424045324325562, -0.45098280906677246, -0.3429402709007263]]},
  {"class_": "EulerDiscreteScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "EulerDiscreteScheduler"}, "steps": 7, "eta": 0.0, "timesteps": [999.0, 832.5, 666.0, 499.5, 333.0, 166.5, 0.0], "draws": [0, 0, 0, 0, 0, 0, 0], "noises": [], "traj": [[25.589576721191406, 9.792791366577148, -28.57857894897461, -2.5054359436035156], [25.902320861816406, 11.07850170135498, -27.172100067138672, -3.6669626235961914], [25.801088333129883, 11.251346588134766, -26.479869842529297, -3.5288591384887695], [25.624624252319336, 11.182074546813965, -26.070940017700195, -3.294276237487793], [25.432052612304688, 11.035396575927734, -25.778833389282227, -3.071310520172119], [25.144397735595703, 10.772027015686035, -25.438512802124023, -2.7675976753234863], [25.121063232421875, 10.748692512512207, -25.415178298950195, -2.7444474697113037]]},
  {"class_": "EulerAncestralDiscreteScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "timestep_spacing": "trailing", "_class_name": "EulerAncestralDiscreteScheduler"}, "steps": 1, "eta": 0.0, "timesteps": [999.0], "draws": [1], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022]], "traj": [[27.6960391998291, 19.459331512451172, -26.338117599487305, -9.928332328796387]]},
  {"class_": "EulerAncestralDiscreteScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "EulerAncestralDiscreteScheduler"}, "steps": 4, "eta": 0.0, "timesteps": [999.0, 666.0, 333.0, 0.0], "draws": [1, 1, 1, 1], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022], [-0.612273097038269, 0.5036107301712036, 0.23096680641174316, 0.6930773258209229], [-0.26686057448387146, 2.1784658432006836, 0.10213729739189148, -0.2590096890926361], [-0.15490040183067322, -1.3705888986587524, -0.13192042708396912, 0.8848397731781006]], "traj": [[27.62160873413086, 19.663108825683594, -29.450088500976562, -8.58143424987793], [26.87704086303711, 20.452550888061523, -27.853609085083008, -7.351306915283203], [26.460491180419922, 20.204708099365234, -27.230581283569336, -6.8736653327941895], [26.437156677246094, 20.181373596191406, -27.207246780395508, -6.8503313064575195]]},
  {"class_": "LCMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "LCMScheduler"}, "steps": 4, "eta": 0.0, "timesteps": [999.0, 759.0, 499.0, 259.0], "draws": [1, 1, 1, 0], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022], [-0.612273097038269, 0.5036107301712036, 0.23096680641174316, 0.6930773258209229], [-0.26686057448387146, 2.1784658432006836, 0.10213729739189148, -0.2590096890926361]], "traj": [[6.383910179138184, 4.837629795074463, -7.01939582824707, -2.055803060531616], [14.25345230102539, 12.17138957977295, -14.882271766662598, -3.841651201248169], [21.463171005249023, 19.888891220092773, -22.083044052124023, -5.570479869842529], [26.06643295288086, 24.18564224243164, -26.703123092651367, -6.442768573760986]]},
  {"class_": "LCMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "prediction_type": "v_prediction", "_class_name": "LCMScheduler"}, "steps": 2, "eta": 0.0, "timesteps": [999.0, 499.0], "draws": [1, 0], "noises": [[0.0461304634809494, 0.4024028182029724, -1.0115290880203247, 0.2167382389307022]], "traj": [[0.2805352210998535, 1.1859573125839233, -0.7399737238883972, -0.4517289400100708], [0.4218819737434387, 0.6542052030563354, -0.13322606682777405, -0.30561956763267517]]},
  {"class_": "LCMScheduler", "config": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "_class_name": "LCMScheduler"}, "steps": 1, "eta": 0.0, "timesteps": [999.0], "draws": [0], "noises": [], "traj": [[27.74162483215332, 19.456655502319336, -26.409589767456055, -9.920319557189941]]}
 ]}
"#;
