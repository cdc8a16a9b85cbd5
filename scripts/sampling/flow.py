"""Sampling loops of diffusers' FlowMatchEulerDiscreteScheduler with a closed-form "network"
(out = 0.8·tanh(x) + bias·t/1000), for tests/sampling_flow.rs. Each case records the config,
how the pipeline passed sigmas (SD3: the scheduler's own; FLUX: linspace(1, 1/N, N) and μ),
the timesteps, every noise draw and every intermediate latent.

    .venv-fixtures/bin/python scripts/sampling/flow.py tests/fixtures/refs/flow_sampling.json
"""
import json, sys, importlib
import numpy as np, torch
import diffusers.utils.logging as L
L.set_verbosity_error()
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

torch.manual_seed(0)
shape = (1, 1, 2, 2)
init = torch.randn(shape)
bias = torch.randn(shape)
draws = []
def fake_randn(shape_, generator=None, device=None, dtype=None, layout=None):
    z = torch.randn(shape_, generator=GEN, dtype=torch.float32)
    draws.append(z.clone())
    return z
importlib.import_module("diffusers.schedulers.scheduling_flow_match_euler_discrete").randn_tensor = fake_randn

def model(x, t):
    return torch.tanh(x) * 0.8 + bias * (float(t) / 1000.0)

cases = []
def run(config, steps, sigmas="scheduler", seq_len=0):
    global GEN
    GEN = torch.Generator().manual_seed(1234)
    s = FlowMatchEulerDiscreteScheduler.from_config(config)
    kw = {}
    if s.config.use_dynamic_shifting:
        kw["mu"] = calculate_shift(seq_len, s.config.base_image_seq_len, s.config.max_image_seq_len,
                                   s.config.base_shift, s.config.max_shift)
    if sigmas == "linspace":
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    s.set_timesteps(steps, **kw)
    x = init.clone()
    traj, flags, noises = [], [], []
    for t in s.timesteps:
        out = model(x, t)
        n0 = len(draws)
        x = s.step(out, t, x, generator=GEN).prev_sample
        new = draws[n0:]
        flags.append(len(new))
        noises += [z.flatten().tolist() for z in new]
        traj.append(x.flatten().tolist())
    cases.append(dict(config=dict(config, _class_name="FlowMatchEulerDiscreteScheduler"), steps=steps, sigmas=sigmas,
                      seq_len=seq_len, timesteps=[float(t) for t in s.timesteps],
                      sigma_values=[float(v) for v in s.sigmas], draws=flags, noises=noises, traj=traj))

SD3 = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
for n in [1, 4, 7]:
    run(SD3, n)
run({}, 3)
for n in [1, 4, 28]:
    run(FLUX_DEV, n, "linspace", 1024)
run(FLUX_DEV, 4, "linspace", 4096)
run(FLUX_DEV, 4, "scheduler", 64)
run(dict(FLUX_DEV, time_shift_type="linear"), 4, "linspace", 1024)
run(SCHNELL, 4, "linspace")
run(dict(SD3, shift_terminal=0.1), 5)
run(dict(SD3, stochastic_sampling=True), 4)

json.dump(dict(shape=list(shape), init=init.flatten().tolist(), bias=bias.flatten().tolist(), cases=cases),
          open(sys.argv[1], "w"))
print(len(cases), "cases")
