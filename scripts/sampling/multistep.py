"""Sampling loops of diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M) and
EulerDiscreteScheduler with Karras sigmas, with the closed-form "network"
out = 0.8·tanh(x_in) + bias·t/1000, for tests/sampling_multistep.rs.

    .venv-fixtures/bin/python scripts/sampling/multistep.py tests/fixtures/refs/multistep_sampling.json
"""
import json, sys
import torch
import diffusers.utils.logging as L
L.set_verbosity_error()
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

torch.manual_seed(0)
shape = (1, 1, 2, 2)
init = torch.randn(shape)
bias = torch.randn(shape)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, set_alpha_to_one=False, clip_sample=False)

def model(x_in, t):
    return torch.tanh(x_in) * 0.8 + bias * (float(t) / 1000.0)

cases = []
def run(cls, over, steps, kind):
    cfg = dict(SD)
    cfg.update(over)
    s = cls.from_config(cfg)
    s.set_timesteps(steps)
    x = init * s.init_noise_sigma
    traj = []
    for t in s.timesteps:
        out = model(s.scale_model_input(x, t), t)
        x = s.step(out, t, x).prev_sample
        traj.append(x.flatten().tolist())
    cases.append(dict(kind=kind, config=dict(cfg, _class_name=cls.__name__), steps=steps,
                      timesteps=[float(t) for t in s.timesteps], sigmas=[float(v) for v in s.sigmas], traj=traj))

for steps in [1, 2, 4, 7, 20]:
    run(DPMSolverMultistepScheduler, {}, steps, "dpmpp-2m")
    run(DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, steps, "dpmpp-2m-karras")
for over in [{"timestep_spacing": "leading"}, {"timestep_spacing": "trailing"}, {"prediction_type": "v_prediction"},
             {"thresholding": True, "sample_max_value": 1.5}, {"lower_order_final": False},
             {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}]:
    run(DPMSolverMultistepScheduler, over, 6, "dpmpp-2m")
run(DPMSolverMultistepScheduler, {"prediction_type": "v_prediction", "use_karras_sigmas": True}, 5, "dpmpp-2m-karras")
for steps in [1, 4, 25]:
    run(EulerDiscreteScheduler, {"use_karras_sigmas": True}, steps, "euler-karras")
run(EulerDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "leading"}, 6, "euler-karras")
run(EulerDiscreteScheduler, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 6, "euler")
run(EulerDiscreteScheduler, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 6, "euler")

json.dump(dict(shape=list(shape), init=init.flatten().tolist(), bias=bias.flatten().tolist(), cases=cases),
          open(sys.argv[1], "w"))
print(len(cases), "cases")
