#!/usr/bin/env python3
"""Reference steps of PyTorch's Adam (L2 weight decay) and AdamW for cwseg-train's optimizer.

    python scripts/optim_fixtures.py        # torch
Writes crates/train/tests/fixtures/adam.json: per case the settings, the initial parameters,
the gradient of each of three steps and the parameters after each step (float32, as cwseg
trains).
"""
import json
import os

import torch

OUT = os.path.join("crates", "train", "tests", "fixtures", "adam.json")
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


def main():
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    cases = [case("adam", 3e-4, 0.0), case("adam", 1e-2, 0.05), case("adamw", 1e-2, 0.05)]
    with open(OUT, "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f)
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
