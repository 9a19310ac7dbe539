#!/usr/bin/env python3
"""Reference steps of PyTorch's Adam (L2 weight decay) and AdamW for cwseg-train's optimizer,
and of `torch.amp.GradScaler` (dynamic loss scaling) driving Adam.

    python scripts/optim_fixtures.py        # torch
Writes crates/train/tests/fixtures/adam.json: per case the settings, the initial parameters,
the gradient of each of three steps and the parameters after each step (float32, as cwseg
trains); and crates/train/tests/fixtures/grad_scaler.json: per case the scaler's settings, the
initial parameters and per step the loss's coefficients `c` (the unscaled gradient of
`sum(p * c)`, with an infinity or a NaN in some steps), then the scale, the growth tracker,
Adam's step count and the parameters after `scaler.step` and `scaler.update`.
"""
import json
import os

import torch

OUT = os.path.join("crates", "train", "tests", "fixtures", "adam.json")
SCALER_OUT = os.path.join("crates", "train", "tests", "fixtures", "grad_scaler.json")
torch.manual_seed(5)


def case(kind, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, n=24, steps=3):
    theta = torch.randn(n, dtype=torch.float32)
    p = torch.nn.Parameter(theta.clone())
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    opt = cls([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    grads, after = [], []
    for _ in range(steps):
        g = 0.1 * torch.randn(n, dtype=torch.float32)
        p.grad = g.clone()
        opt.step()
        grads.append(g.tolist())
        after.append(p.detach().clone().tolist())
    return {"kind": kind, "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "eps": eps,
            "theta": theta.tolist(), "grads": grads, "after": after}


def scaler_case(init_scale, growth_interval, bad, growth_factor=2.0, backoff_factor=0.5,
                steps=8, n=12, lr=1e-2):
    """`bad`: step -> "inf" or "nan", the value put into one coefficient of that step."""
    theta = torch.randn(n, dtype=torch.float32)
    p = torch.nn.Parameter(theta.clone())
    opt = torch.optim.Adam([p], lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=growth_factor,
                                  backoff_factor=backoff_factor, growth_interval=growth_interval)
    out = []
    for step in range(steps):
        c = torch.randn(n, dtype=torch.float32)
        if step in bad:
            c[step % n] = float(bad[step])
        opt.zero_grad()
        scaler.scale((p * c).sum()).backward()
        scaler.step(opt)
        scaler.update()
        state = opt.state[p]
        out.append({"c": [str(x) if not torch.isfinite(torch.tensor(x)) else x for x in c.tolist()],
                    "scale": scaler.get_scale(), "growth_tracker": int(scaler._growth_tracker),
                    "optimizer_steps": int(state["step"]) if "step" in state else 0,
                    "theta": p.detach().clone().tolist()})
    return {"init_scale": init_scale, "growth_factor": growth_factor,
            "backoff_factor": backoff_factor, "growth_interval": growth_interval, "lr": lr,
            "theta": theta.tolist(), "steps": out}


def main():
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    cases = [case("adam", 3e-4, 0.0), case("adam", 1e-2, 0.05), case("adamw", 1e-2, 0.05)]
    with open(OUT, "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f)
    print("fixtures written to", OUT)
    torch.manual_seed(11)
    scaler_cases = [
        # powers of two: a skipped first step, a NaN, growth after 3 finite steps
        scaler_case(65536.0, 3, {0: "inf", 4: "nan"}),
        # a scale whose reciprocal rounds in f32, other factors, a long run of skips
        scaler_case(1000.0, 2, {1: "inf", 2: "-inf", 3: "inf"}, growth_factor=1.5,
                    backoff_factor=0.25),
        # growth beyond f32's range is not kept
        scaler_case(2.0 ** 127, 1, {}, steps=3),
    ]
    with open(SCALER_OUT, "w") as f:
        json.dump({"torch": torch.__version__, "cases": scaler_cases}, f)
    print("fixtures written to", SCALER_OUT)


if __name__ == "__main__":
    main()
