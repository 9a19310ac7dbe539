#!/usr/bin/env python3
"""Reference p-values of the Wilcoxon signed-rank test for cwseg-metrics' paired comparison
(SPEC §6), computed with scipy.stats.wilcoxon at its defaults (two-sided, zero_method="wilcox",
method="auto", no continuity correction).

Run from the repository root with numpy and scipy installed (outside the repo):
    python scripts/paired_fixtures.py
Writes crates/metrics/tests/fixtures/wilcoxon.json (small, committed).
"""
import json
import os
import sys

import numpy as np
import scipy
from scipy import stats

OUT = os.path.join("crates", "metrics", "tests", "fixtures", "wilcoxon.json")
rng = np.random.default_rng(20261201)

cases = {
    "exact_n12": rng.normal(0.02, 0.05, 12),
    "exact_n5_all_positive": np.array([0.1, 0.2, 0.05, 0.3, 0.15]),
    "exact_n30_shift": rng.normal(-0.01, 0.03, 30),
    "exact_n50": rng.normal(0.0, 1.0, 50),
    "approx_n60": rng.normal(0.1, 1.0, 60),
    "approx_ties": np.array([0.1, -0.1, 0.2, 0.2, -0.3, 0.1, 0.4, 0.2, -0.1, 0.5, 0.3, 0.3]),
    "approx_zeros_dropped": np.array([0.0, 0.1, -0.2, 0.3, 0.0, 0.25, 0.4, -0.05, 0.15, 0.35]),
    "dice_like": np.round(rng.normal(0.01, 0.04, 36), 3),
}
out = {"versions": {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__},
       "cases": {}}
for name, d in cases.items():
    res = stats.wilcoxon(d)
    out["cases"][name] = {"differences": [float(x) for x in d], "p_value": float(res.pvalue),
                          "statistic": float(res.statistic)}
with open(OUT, "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps({k: v["p_value"] for k, v in out["cases"].items()}, indent=1))
