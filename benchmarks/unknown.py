"""Prediction sets and rejection on a trained run, measured on images that chose nothing.

    python benchmarks/unknown.py RUN [--ood DIR] [--coverage 0.95] [--accept 0.95]

1. `headstart calibrate RUN` fits temperature, sets and the rejection threshold on the run's
   validation split; coverage and acceptance are reported on held-out halves (fit on one random
   half, measured on the other, 200 times), never on the images that fitted them.
2. With --ood DIR (images of other things, never seen in training), the AUROC between the
   validation images and those, and the share of them rejected at the fitted threshold; beside
   it the same for the energy score (-logsumexp of the logits), a common baseline that needs no
   training statistics.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from headstart.data.layout import image_paths
from headstart.inference.logits import collect_logits, evaluation_items
from headstart.inference.predictor import load
from headstart.insight.calibrate import calibrate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--ood", type=Path, help="a folder of images of none of the run's classes")
    ap.add_argument("--ood-limit", type=int, default=2000, help="at most this many OOD images (random)")
    ap.add_argument("--coverage", type=float, default=0.95)
    ap.add_argument("--method", default="lac")
    ap.add_argument("--accept", type=float, default=0.95)
    a = ap.parse_args()

    t = time.perf_counter()
    c = calibrate(a.run, coverage=a.coverage, method=a.method, accept=a.accept)
    print(f"calibrate {a.run}: {time.perf_counter() - t:.0f}s")
    s, h = c["sets"], c["sets"]["held_out"]
    print(f"sets {s['method']} target {s['coverage']:.2f} on {s['calibration_images']} validation images: "
          f"held-out coverage {h['coverage_mean']:.4f} +- {h['coverage_std']:.4f} "
          f"(off target by {100 * (h['coverage_mean'] - s['coverage']):+.2f} points), "
          f"mean set size {h['set_size_mean']:.3f}")  # fmt: skip
    o, h = c["ood"], c["ood"]["held_out"]
    print(f"rejection accept {o['accept']:.2f}: held-out acceptance {h['acceptance_mean']:.4f} "
          f"+- {h['acceptance_std']:.4f} (threshold {o['threshold']:.1f}, "
          f"{o['train_images']} train images)")  # fmt: skip
    if not a.ood:
        return
    predictor = load(a.run)
    val = collect_logits(predictor, evaluation_items(a.run, predictor.classes, None), features=True)
    paths = image_paths([str(a.ood)])
    rng = np.random.default_rng(0)
    paths = [paths[i] for i in sorted(rng.choice(len(paths), min(a.ood_limit, len(paths)), replace=False))]
    ood = collect_logits(predictor, [(p, 0) for p in paths], features=True, desc="ood")
    s_in, s_out = predictor.distance.score(val.features), predictor.distance.score(ood.features)
    truth = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    rejected = float((s_out > predictor.rejection.threshold).mean())
    print(f"OOD {a.ood} ({len(s_out)} images) vs {len(s_in)} validation images:")
    print(f"  mahalanobis (headstart): AUROC {roc_auc_score(truth, np.r_[s_in, s_out]):.4f}, "
          f"rejected {rejected:.4f} of OOD at the fitted threshold")  # fmt: skip
    energy = [-logsumexp(lg.logits, axis=1) for lg in (val, ood)]
    if predictor.head_kind != "binary":
        print(f"  energy score (baseline): AUROC {roc_auc_score(truth, np.r_[energy[0], energy[1]]):.4f}")


if __name__ == "__main__":
    main()
