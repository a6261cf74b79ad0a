"""--tta hflip: the logits of each image and its mirror, averaged, in the loop's validation, in
`headstart.load` and in the exported graph alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_auto import speed
from torch import nn

import headstart
from headstart.core.errors import ConfigError
from headstart.core.files import MODEL_JSON, read_json, write_json
from headstart.data.transforms import eval_transform
from headstart.deploy.export import _runner, export
from headstart.inference.logits import collect_logits, split_items
from headstart.models.tta import features_and_logits, mean_over_views
from headstart.training.auto.candidates import Candidate, grid, seconds
from headstart.training.auto.profile import DataProfile
from headstart.training.options import TrainConfig
from headstart.training.run import train

from conftest import TINY, run_cli

FAST = dict(backbone=TINY, weights="none", strategy="finetune", lr=0.05, batch_size=8, num_workers=0)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))


def test_views_are_averaged_in_logit_space():
    backbone, head = nn.Conv2d(3, 4, 3).eval(), nn.Identity()
    pool = lambda x: backbone(x).mean((2, 3))  # noqa: E731 - a backbone that is not mirror-symmetric
    x = torch.randn(2, 3, 8, 8)
    f, z = features_and_logits(pool, head, x, "hflip")
    assert torch.allclose(z, (pool(x) + pool(x.flip(-1))) / 2) and not torch.allclose(z, pool(x))
    f1, z1 = features_and_logits(pool, head, x, "none")
    assert torch.equal(z1, pool(x)) and torch.equal(f1, pool(x))
    stacked = torch.stack([x, x.flip(-1)], 1)  # [B, V, C, H, W], as validation datasets serve them
    assert torch.allclose(mean_over_views(pool, stacked), z, atol=1e-6)


def half_coloured(root, per_class: int, seed: int):
    """Classes by colour, painted on the left half only: an image and its mirror differ."""
    rng = np.random.default_rng(seed)
    for name, rgb in (("red", (220, 30, 30)), ("green", (30, 200, 40))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.normal(128, 25, (40, 40, 3))
            arr[:, :20] = np.array(rgb) + rng.normal(0, 25, (40, 20, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.mark.parametrize("cache_prefix", [True, False], ids=["cached-maps", "images"])
def test_the_reported_validation_is_what_the_saved_model_predicts(tmp_path, cache_prefix):
    """The loop's val loss (exact mirrored maps for --cache-prefix) is the loss of the saved
    model's TTA logits, and not that of its plain logits."""
    data = tmp_path / "data"
    half_coloured(data / "train", 12, seed=0)
    half_coloured(data / "val", 5, seed=1)
    r = train(data, output=tmp_path / "run", epochs=2, tta="hflip", cache_prefix=cache_prefix,
              cache_dir=str(tmp_path / "cache"), **FAST)  # fmt: skip
    assert read_json(tmp_path / "run" / MODEL_JSON)["tta"] == "hflip"
    predictor = headstart.load(tmp_path / "run", device="cpu")
    items = split_items(tmp_path / "run", "val")
    tta = collect_logits(predictor, items)
    predictor.model.tta = "none"
    plain = collect_logits(predictor, items)
    reported = r.results.to_dict()["val_loss"]
    # float16 cached maps: agreement to ~1e-6 measured, while the plain logits miss by ~7e-3
    assert cross_entropy(tta.logits, tta.y) == pytest.approx(reported, abs=2e-4)
    assert abs(cross_entropy(plain.logits, plain.y) - reported) > 2e-3


def test_export_carries_the_views(tmp_path):
    half_coloured(tmp_path / "data" / "train", 12, seed=0)
    half_coloured(tmp_path / "data" / "val", 5, seed=1)
    train(tmp_path / "data", output=tmp_path / "run", epochs=1, tta="hflip", cache_dir=str(tmp_path / "c"),
          **FAST)  # fmt: skip
    result = export(tmp_path / "run", format="onnx")  # parity against headstart.load, TTA included
    assert result.parity.passed and read_json(result.metadata_path)["tta"] == "hflip"
    predictor = headstart.load(tmp_path / "run", device="cpu")
    tf = eval_transform(predictor.preprocess, normalize=False)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in split_items(tmp_path / "run", "val")])
    onnx_probs = _runner("onnx", result.path)(x)
    norm = eval_transform(predictor.preprocess).transforms[-1]
    assert np.allclose(onnx_probs, predictor.predict_tensor(norm(x)).numpy(), atol=1e-4)
    predictor.model.tta = "none"
    assert np.abs(onnx_probs - predictor.predict_tensor(norm(x)).numpy()).max() > 1e-3


def test_a_model_json_with_an_unknown_tta_is_refused(tiny_split, tmp_path):
    train(tiny_split, output=tmp_path / "run", epochs=1, cache_dir=str(tmp_path / "c"), **FAST)
    record = read_json(tmp_path / "run" / MODEL_JSON)
    assert record["tta"] == "none"  # the default: one forward pass
    write_json(tmp_path / "run" / MODEL_JSON, record | {"tta": "rotate"})
    with pytest.raises(headstart.DataError, match="tta.*one of none, hflip"):
        headstart.load(tmp_path / "run")


def test_tta_on_frozen_features_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="applies to fine-tuning strategies.*--strategy finetune"):
        TrainConfig(data=str(tmp_path), strategy="extract", tta="hflip").resolved()


def test_auto_fine_tunes_with_tta_and_prices_the_mirror():
    photos = DataProfile(num_train=1000, num_val=200, classes=5, smallest_class=200, short_side=500)
    cands = grid(photos, speed())
    tuned = [c for c in cands if c.kind in ("prefix", "images")]
    assert tuned and all(c.options["tta"] == "hflip" for c in tuned)
    assert all("tta" not in c.options for c in cands if c.kind == "features")
    cfg = TrainConfig(data="d", strategy="auto").resolved()
    assert tuned[0].run_options(cfg)["tta"] == "hflip" and cands[0].run_options(cfg)["tta"] == "none"
    no_flips = TrainConfig(data="d", strategy="auto").with_overrides({"hflip": False}).resolved()
    assert tuned[0].run_options(no_flips)["tta"] == "none"  # the user's --no-hflip: no mirror either
    # a prefix run extracts each validation image's mirror too, and validates twice per epoch
    sp = speed()
    c = tuned[0]
    plain = Candidate("p", c.kind, {**c.options, "tta": "none"}, c.size, groups=c.groups)
    extra = seconds(c, sp, n=1000, m=200, epochs=3) - seconds(plain, sp, n=1000, m=200, epochs=3)
    px = (c.size / 224) ** 2
    mirror = 200 / min(sp.forward[c.backbone] / px, sp.decode)
    assert extra == pytest.approx(mirror + 3 * 200 / (3 * sp.suffix_train[c.groups] / px))


def test_predict_can_turn_the_views_off_and_then_refuses_sets_and_rejection(tmp_path):
    """--tta none at predict time: one forward pass, the plain logits; the sets and rejection,
    fitted on the mirrored logits, are refused with the reason; the ONNX graph cannot change."""
    half_coloured(tmp_path / "data" / "train", 12, seed=0)
    half_coloured(tmp_path / "data" / "val", 10, seed=1)
    run = tmp_path / "run"
    train(tmp_path / "data", output=run, epochs=1, tta="hflip", cache_dir=str(tmp_path / "c"), **FAST)
    headstart.calibrate(run, device="cpu", num_workers=0)
    export(run, format="onnx")
    as_trained, off = headstart.load(run, device="cpu"), headstart.load(run, device="cpu", tta="none")
    assert as_trained.model.tta == "hflip" and as_trained.sets is not None and as_trained.distance is not None
    assert off.model.tta == "none" and off.sets is None and off.rejection is None and off.distance is None
    x = torch.stack([as_trained.transform(Image.open(p).convert("RGB")) for p, _ in split_items(run, "val")])
    plain = as_trained.model.head(as_trained.model.backbone(x))
    assert torch.allclose(off.logits_tensor(x), plain, atol=1e-4)
    assert not torch.allclose(as_trained.logits_tensor(x), plain, atol=1e-3)
    with pytest.raises(ConfigError, match="fitted on its logits with test-time views 'hflip'.*drop --tta"):
        off.require(sets=True)
    with pytest.raises(ConfigError, match="'rotate' is not one of none, hflip"):
        headstart.load(run, tta="rotate")

    image = split_items(run, "val")[0][0]
    ok = run_cli("predict", run, image, "--tta", "none", "--device", "cpu")
    assert ok.returncode == 0 and ok.stdout.startswith(image), ok.stderr
    refused = run_cli("predict", run, image, "--tta", "none", "--reject", "--device", "cpu")
    assert refused.returncode != 0 and "No rejection here" in refused.stderr and not refused.stdout
    onnx = run_cli("predict", run, image, "--engine", "onnx", "--tta", "none")
    assert onnx.returncode != 0 and "Use --engine torch --tta none" in onnx.stderr
    assert run_cli("predict", run, image, "--engine", "onnx", "--tta", "hflip").returncode == 0
