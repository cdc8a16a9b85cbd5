import json, numpy as np, torch, warnings
warnings.filterwarnings("ignore")
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LCMScheduler
import diffusers.utils.logging as L; L.set_verbosity_error()
out = {"betas": {}, "cases": []}
base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
for name, kw in [("scaled_linear", {}), ("linear", dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")),
                 ("cos", dict(beta_schedule="squaredcos_cap_v2")), ("zsnr", dict(rescale_betas_zero_snr=True))]:
    c = dict(base); c.update(kw)
    s = DDIMScheduler(**c)
    out["betas"][name] = {"config": c, "betas": s.betas.tolist(), "alphas_cumprod": s.alphas_cumprod.tolist()}
    e = EulerDiscreteScheduler(**c)
    out["betas"][name]["euler_sigmas_full"] = e.sigmas.tolist()
Ns = list(range(1, 61)) + [75, 99, 100, 101, 128, 150, 200, 250, 333, 500, 999, 1000]
for cls in [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler]:
    for sp in ["leading", "trailing", "linspace"]:
        for off in [0, 1]:
            for zs in [False, True]:
                if zs and (sp != "trailing" or off): continue
                c = dict(base, timestep_spacing=sp, steps_offset=off, rescale_betas_zero_snr=zs)
                for N in Ns:
                    s = cls(**c)
                    try:
                        s.set_timesteps(N)
                    except Exception as ex:
                        out["cases"].append({"class": cls.__name__, "config": c, "steps": N, "error": str(ex)}); continue
                    d = {"class": cls.__name__, "config": c, "steps": N, "timesteps": [float(t) for t in s.timesteps]}
                    if hasattr(s, "sigmas"): d["sigmas"] = s.sigmas.tolist()
                    d["init_noise_sigma"] = float(s.init_noise_sigma)
                    out["cases"].append(d)
for orig in [50, 30, 100]:
    for N in range(1, 101):
        c = dict(base, original_inference_steps=orig)
        s = LCMScheduler(**c)
        try: s.set_timesteps(N)
        except Exception as ex:
            out["cases"].append({"class": "LCMScheduler", "config": c, "steps": N, "error": str(ex)}); continue
        out["cases"].append({"class": "LCMScheduler", "config": c, "steps": N, "timesteps": [float(t) for t in s.timesteps], "init_noise_sigma": 1.0})
json.dump(out, open("/tmp/tiller_sampling/diffusers_dump.json", "w"))
print(len(out["cases"]))
a = out["betas"]["scaled_linear"]["alphas_cumprod"]; print([a[i] for i in (999,749,499,249,0)])
# cumprod accumulation check
al = (1 - torch.tensor(out["betas"]["scaled_linear"]["betas"], dtype=torch.float32))
c64 = np.cumprod(al.double().numpy()).astype(np.float32); c32 = np.cumprod(al.numpy(), dtype=np.float32)
t = torch.cumprod(al, 0).numpy()
print("torch==f64acc", np.array_equal(t, c64), "torch==f32seq", np.array_equal(t, c32), np.abs(c32/t-1).max())
