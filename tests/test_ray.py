"""Ray Data map_batches with headstart.ray.RayPredictor / FeatureExtractor on a local Ray instance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.deploy.ray import FeatureExtractor, RayPredictor

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'headstart[ray]'")
pytest.importorskip("ray.data", reason="ray.data is not installed: pip install 'headstart[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_predictor_is_picklable_and_handles_all_input_columns(hymenoptera_run):
    import pickle

    from PIL import Image

    val = [p for p, _ in json.loads((hymenoptera_run / "split.json").read_text())["val"]][:4]
    pred = pickle.loads(pickle.dumps(RayPredictor(hymenoptera_run)))
    ref = headstart.load(hymenoptera_run, device="cpu").predict(val, num_workers=0)
    by_bytes = pred({"bytes": np.array([open(p, "rb").read() for p in val] + [b"junk"], dtype=object),
                     "path": np.array(val + ["junk.jpg"], dtype=object)})  # fmt: skip
    by_path = pred({"path": np.array(val, dtype=object)})
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in val]
    ragged = np.empty(len(arrays), dtype=object)  # read_images gives varying sizes as objects
    ragged[:] = arrays
    by_image = pred({"image": ragged})
    for out in (by_bytes, by_path, by_image):
        assert list(out["label"][:4]) == [r.label for r in ref]
    np.testing.assert_allclose(by_path["probability"], [r.probability for r in ref], atol=1e-5)
    assert by_bytes["label"][4] == "" and "UnidentifiedImageError" in by_bytes["error"][4]
    assert np.isnan(by_bytes["probabilities"][4]).all() and by_bytes["probabilities"].shape == (5, 2)
    # other test-time views than the run's, as `predict --tta` gives them; they survive pickling
    flip = pickle.loads(pickle.dumps(RayPredictor(hymenoptera_run, tta="hflip")))
    assert flip.predictor.tta == "hflip" != pred.predictor.tta
    mirrored = headstart.load(hymenoptera_run, device="cpu", tta="hflip").predict(val, num_workers=0)
    np.testing.assert_allclose(flip({"path": np.array(val, dtype=object)})["probability"],
                               [r.probability for r in mirrored], atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_ray_map_batches_matches_headstart_predict(local_ray, hymenoptera_run, tmp_path):
    from conftest import real_data_dir

    folder = real_data_dir() / "hymenoptera_data"
    expected = {p.path: p.label for p in headstart.load(hymenoptera_run, device="cpu").predict([folder])}
    assert len(expected) >= 390  # all of train/ and val/, the placeholder GIF included
    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    kwargs = {"run_dir": str(hymenoptera_run), "threads": 1}
    # two actors at half a CPU each leave a CPU for the read tasks of a num_cpus=2 instance
    pool = ray.data.ActorPoolStrategy(size=2)
    out = ds.map_batches(RayPredictor, fn_constructor_kwargs=kwargs, batch_size=32, compute=pool,
                         num_cpus=0.5).to_pandas()  # fmt: skip
    got = dict(zip(out["path"], out["label"], strict=True))
    # Ray names files without a leading "/" on some filesystems; compare on absolute paths
    # and both sides resolved: ../shared may be a symbolic link
    got = {str(Path("/" + p.lstrip("/")).resolve()): lab for p, lab in got.items()}
    expected = {str(Path(p).resolve()): lab for p, lab in expected.items()}
    common = set(got) & set(expected)
    assert len(common) == len(expected), sorted(set(expected) ^ set(got))[:5]
    assert all(got[p] == expected[p] for p in common)


@pytest.mark.slow
def test_ray_feature_extractor_gives_backbone_features(local_ray, hymenoptera_run):
    from conftest import real_data_dir

    folder = real_data_dir() / "hymenoptera_data" / "val" / "bees"
    ds = ray.data.read_binary_files(str(folder), include_paths=True).limit(40)
    pool = ray.data.ActorPoolStrategy(size=1)
    out = ds.map_batches(FeatureExtractor, fn_constructor_kwargs={"run_dir": str(hymenoptera_run)},
                         batch_size=20, compute=pool, num_cpus=0.5).to_pandas()  # fmt: skip
    feats = np.stack(out["features"].to_numpy())
    assert feats.shape == (40, 1280) and np.isfinite(feats).all() and (out["error"] == "").all()
    p = headstart.load(hymenoptera_run, device="cpu")
    from headstart.data.images import load_image

    x = p.transform(load_image(out["path"][0], draft=p.preprocess.resize_size))[None]
    ref = p.model.backbone(x).detach().numpy()[0]
    np.testing.assert_allclose(feats[0], ref, atol=1e-4)
