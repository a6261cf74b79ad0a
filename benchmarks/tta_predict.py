"""What test-time views cost and give at prediction: a model trained with --tta hflip, predicted
with its views and with `--tta none`, on the same images, in one process.

    python benchmarks/tta_predict.py RUN FOLDER [--limit 2000] [--chunk 250] [--batch-size 32]

FOLDER is a class tree (FOLDER/<class>/image) with the run's class names, so that accuracy is
measured too. The two settings alternate chunk by chunk, so load from other processes falls on
both alike. Prints end-to-end images/s (decode, resize, model, as `headstart predict` runs) and
accuracy of each, then the ratios.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    """Run the comparison and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("folder")
    ap.add_argument("--limit", type=int, default=2000, help="images, every n-th of the folder's (0 = all)")
    ap.add_argument("--chunk", type=int, default=250, help="images per alternation")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()

    import headstart
    from headstart.data.layout import expand_inputs

    trained = headstart.load(a.run, device="cpu")
    if trained.model.tta == "none":
        raise SystemExit(f"{a.run} was trained without test-time views: nothing to compare")
    settings = {trained.model.tta: trained, "none": headstart.load(a.run, device="cpu", tta="none")}
    paths, _ = expand_inputs([a.folder])
    if a.limit:
        paths = paths[:: max(1, len(paths) // a.limit)][: a.limit]
    truth = {p: os.path.basename(os.path.dirname(p)) for p in paths}
    seconds, correct = dict.fromkeys(settings, 0.0), dict.fromkeys(settings, 0)
    for start in range(0, len(paths), a.chunk):
        chunk = paths[start : start + a.chunk]
        for name, predictor in settings.items():
            t = time.perf_counter()
            preds = list(predictor.predict_paths(chunk, batch_size=a.batch_size))
            seconds[name] += time.perf_counter() - t
            correct[name] += sum(p.label == truth[p.path] for p in preds)
    n = len(paths)
    for name in settings:
        print(f"tta {name:5s}: {n / seconds[name]:6.1f} img/s end to end, accuracy {correct[name] / n:.4f} "
              f"({correct[name]}/{n})")  # fmt: skip
    tta = trained.model.tta
    print(
        f"--tta none: {seconds[tta] / seconds['none']:.2f}x the images/s of {tta}, "
        f"{100 * (correct['none'] - correct[tta]) / n:+.2f} accuracy points"
    )


if __name__ == "__main__":
    main()
