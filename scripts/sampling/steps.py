import json, numpy as np, torch, importlib
import diffusers.utils.logging as L; L.set_verbosity_error()
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LCMScheduler
torch.manual_seed(0)
import sys
shape = (1, 1, 2, 2) if len(sys.argv) > 1 else (2, 4, 4, 4)
init = torch.randn(shape)
bias = torch.randn(shape)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, set_alpha_to_one=False, clip_sample=False)
draws = []
def fake_randn(shape_, generator=None, device=None, dtype=None, layout=None):
    z = torch.randn(shape_, generator=GEN, dtype=torch.float32)
    draws.append(z.clone()); return z
for m in ["scheduling_ddim", "scheduling_ddpm", "scheduling_euler_discrete", "scheduling_euler_ancestral_discrete", "scheduling_lcm"]:
    importlib.import_module("diffusers.schedulers." + m).randn_tensor = fake_randn
def model(x_in, t):
    return torch.tanh(x_in) * 0.8 + bias * (float(t) / 1000.0)
cases = []
def run(cls, over, steps, eta=None):
    global GEN
    GEN = torch.Generator().manual_seed(1234)
    cfg = dict(SD); cfg.update(over)
    s = cls.from_config(cfg); s.set_timesteps(steps)
    x = init * s.init_noise_sigma
    traj, flags, noises = [], [], []
    for i, t in enumerate(s.timesteps):
        xin = s.scale_model_input(x, t)
        out = model(xin, t)
        n0 = len(draws)
        kw = {}
        if eta is not None: kw["eta"] = eta; kw["generator"] = GEN
        x = s.step(out, t, x, **kw).prev_sample
        new = draws[n0:]
        flags.append(len(new)); noises += [z.flatten().tolist() for z in new]
        traj.append(x.flatten().tolist())
    cases.append(dict(class_=cls.__name__, config=dict(cfg, _class_name=cls.__name__), steps=steps, eta=eta or 0.0,
                      timesteps=[float(t) for t in s.timesteps], draws=flags, noises=noises, traj=traj))
import sys
if len(sys.argv) > 1:
    run(DDIMScheduler, {}, 4, 0.0); run(DDIMScheduler, {}, 4, 1.0)
    run(DDIMScheduler, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 4, 0.0)
    run(DDIMScheduler, {"clip_sample": True, "prediction_type": "sample"}, 3, 0.3)
    run(DDPMScheduler, {}, 4); run(DDPMScheduler, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 3)
    run(EulerDiscreteScheduler, {}, 4); run(EulerDiscreteScheduler, {"timestep_spacing": "leading"}, 4)
    run(EulerDiscreteScheduler, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 2)
    run(EulerDiscreteScheduler, {}, 7)
    run(EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, 1); run(EulerAncestralDiscreteScheduler, {}, 4)
    run(LCMScheduler, {}, 4); run(LCMScheduler, {"prediction_type": "v_prediction"}, 2); run(LCMScheduler, {}, 1)
else:
    for cls in [DDIMScheduler]:
        for over in [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}, {"prediction_type": "v_prediction"},
                     {"prediction_type": "sample"}, {"clip_sample": True}, {"set_alpha_to_one": True},
                     {"thresholding": True, "sample_max_value": 1.5}, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}]:
            for steps in [1, 4, 10]:
                for eta in [0.0, 0.5, 1.0]:
                    run(cls, over, steps, eta)
    for over in [{}, {"timestep_spacing": "trailing"}, {"steps_offset": 0}, {"prediction_type": "v_prediction"}, {"clip_sample": True},
                 {"variance_type": "fixed_large"}, {"prediction_type": "sample"}]:
        for steps in [1, 4, 10]:
            run(DDPMScheduler, over, steps)
    for cls in [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler]:
        for over in [{}, {"timestep_spacing": "leading"}, {"timestep_spacing": "trailing"}, {"prediction_type": "v_prediction"},
                     {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}]:
            for steps in [1, 2, 4, 7, 25]:
                run(cls, over, steps)
        run(EulerDiscreteScheduler, {"prediction_type": "sample"}, 4)
    for over in [{}, {"set_alpha_to_one": True}, {"prediction_type": "v_prediction"}, {"clip_sample": True}, {"original_inference_steps": 30}, {"timestep_scaling": 1.0}]:
        for steps in [1, 2, 4, 8]:
            run(LCMScheduler, over, steps)

OUT = sys.argv[1] if len(sys.argv) > 1 else '/tmp/tiller_sampling/steps_dump.json'
json.dump(dict(shape=list(shape), init=init.flatten().tolist(), bias=bias.flatten().tolist(), cases=cases),
          open(OUT, "w"))
print(len(cases))
