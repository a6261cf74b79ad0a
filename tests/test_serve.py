"""headstart serve: every endpoint and error through FastAPI's TestClient, the API key, batching,
a real browser on the page, and SIGTERM draining the requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="headstart serve needs the serve extra: pip install 'headstart[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

import headstart  # noqa: E402
from headstart.core.errors import ConfigError  # noqa: E402
from headstart.deploy.serve import Batcher, check_exposure  # noqa: E402
from headstart.deploy.serve_http import ServeConfig  # noqa: E402
from headstart.serve import create_app  # noqa: E402
from headstart.training.run import train  # noqa: E402

from conftest import TINY, cli_env, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import make_class_tree

    root = tmp_path_factory.mktemp("serve")
    make_class_tree(root / "data" / "train", per_class=10)
    make_class_tree(root / "data" / "val", per_class=4, seed=500)
    train(root / "data", output=root / "run", strategy="extract", backbone=TINY, weights="none", epochs=10,
          lr=0.05, batch_size=8, num_workers=0)  # fmt: skip
    return root / "run"


def png(color=(220, 30, 30), size=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def ready(client: TestClient) -> TestClient:
    for _ in range(300):
        if client.get("/readyz").status_code == 200:
            return client
        time.sleep(0.05)
    raise AssertionError(client.get("/readyz").json())


@pytest.fixture
def client(run):
    with TestClient(create_app(run, ServeConfig(max_wait_ms=1, max_upload_mb=0.5, max_pixels=300 * 300,
                                                max_images=3))) as c:  # fmt: skip
        yield ready(c)


def test_serve_predicts_with_the_views_asked_for(run):
    """--tta overrides the trained views (here none -> hflip): the card says so, and answers are the
    mirrored mean's."""
    with TestClient(create_app(run, ServeConfig(max_wait_ms=1, tta="hflip"))) as c:
        c = ready(c)
        assert c.get("/v1/model").json()["tta"] == "hflip"
        r = c.post("/v1/predict?top_k=2", content=png(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
    predictor = headstart.load(run, device="cpu", tta="hflip")
    want = predictor.predict([Image.open(io.BytesIO(png()))], top_k=2)[0]
    got = r.json()["predictions"][0]["top"]
    assert [t["label"] for t in got] == want.labels
    assert [t["probability"] for t in got] == pytest.approx(want.probabilities, abs=1e-5)


def test_endpoints(client, run):
    assert client.get("/healthz").json() == {"status": "ok"}
    card = client.get("/v1/model").json()
    assert card["classes"] == ["green", "red"] and card["engine"] == "torch" and card["tta"] == "none"
    assert card["training"]["frozen_tensors_changed"] == 0 and card["preprocessing"]["input_size"] == 160
    files = [("files", ("r.png", png(), "image/png")), ("files", ("g.png", png((30, 200, 40)), "image/png"))]
    r = client.post("/v1/predict?top_k=2", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["name"] for p in preds] == ["r.png", "g.png"] and all(len(p["top"]) == 2 for p in preds)
    assert all(abs(sum(t["probability"] for t in p["top"]) - 1) < 1e-5 for p in preds)
    raw = client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["name"] == "body"
    assert raw.json()["predictions"][0]["label"] == preds[0]["label"]  # the same image, the same answer
    metrics = client.get("/metrics").text
    assert 'headstart_requests_total{endpoint="/v1/predict",status="200"} 2.0' in metrics
    assert "headstart_batch_size_bucket" in metrics and "headstart_request_seconds_bucket" in metrics
    page = client.get("/").text
    assert "<!DOCTYPE html>" in page and "http://" not in page and "https://" not in page
    assert "innerHTML" not in page  # model and request strings go in as text


def test_a_calibrated_run_answers_with_its_set_and_unknown(run, tmp_path):
    from headstart.insight.calibrate import calibrate

    cal = tmp_path / "run"
    shutil.copytree(run, cal)
    # 8 validation images: 0.75 is the highest acceptance they can fit a finite threshold for
    calibrate(cal, device="cpu", num_workers=0, coverage=0.75, accept=0.75)
    with TestClient(create_app(cal, ServeConfig(max_wait_ms=1))) as c:
        ready(c)
        files = [
            ("files", ("r.png", png(), "image/png")),
            ("files", ("b.png", png((30, 40, 220)), "image/png")),
        ]
        red, blue = c.post("/v1/predict", files=files).json()["predictions"]
    assert red["label"] == "red" and red["unknown"] is False and "red" in red["set"]
    assert blue["unknown"] is True and blue["ood_score"] > red["ood_score"]  # a colour it never saw
    assert blue["label"] in ("red", "green")  # the closest class stays, flagged


def test_the_onnx_engine_serves_the_exported_graph_with_the_torch_engines_answers(run, tmp_path, monkeypatch):
    """`serve --engine onnx` on a calibrated, exported run: the graph answers (its session runs),
    and every answer (label, probabilities, prediction set, unknown, OOD score) matches the torch
    engine's."""
    pytest.importorskip("onnxruntime")
    from headstart.deploy.export import export
    from headstart.inference.onnx import OnnxPredictor
    from headstart.insight.calibrate import calibrate

    sessions = []
    real_run = OnnxPredictor._run
    monkeypatch.setattr(OnnxPredictor, "_run", lambda self, *a: sessions.append(1) or real_run(self, *a))

    cal = tmp_path / "run"
    shutil.copytree(run, cal)
    calibrate(cal, device="cpu", num_workers=0, coverage=0.75, accept=0.75)
    export(cal, format="onnx")
    files = [
        ("files", (f"{i}.png", png(c), "image/png")) for i, c in enumerate(((220, 30, 30), (30, 40, 220)))
    ]
    answers = {}
    for engine in ("torch", "onnx"):
        with TestClient(create_app(cal, ServeConfig(max_wait_ms=1, engine=engine))) as c:
            assert ready(c).get("/v1/model").json()["engine"] == engine
            r = c.post("/v1/predict?top_k=2", files=files)
            assert r.status_code == 200, r.text
            answers[engine] = r.json()["predictions"]
            assert bool(sessions) == (engine == "onnx")
    for t, o in zip(answers["torch"], answers["onnx"], strict=True):
        assert (o["label"], o["set"], o["unknown"]) == (t["label"], t["set"], t["unknown"])
        assert [x["label"] for x in o["top"]] == [x["label"] for x in t["top"]]
        assert [x["probability"] for x in o["top"]] == pytest.approx(
            [x["probability"] for x in t["top"]], abs=1e-4
        )
        assert o["ood_score"] == pytest.approx(t["ood_score"], rel=1e-3, abs=1e-3)
    assert [p["unknown"] for p in answers["onnx"]] == [False, True]  # the blue one is a stranger


@pytest.mark.parametrize(
    ("body", "kind", "status", "code"),
    [
        (b"this is text, not a picture", "image/jpeg", 422, "not_an_image"),
        (png()[:60], "image/png", 422, "unreadable_image"),
        (b"", "image/png", 400, "empty"),
        (b"\0" * 600_000, "application/octet-stream", 413, "too_large"),
        (png(size=400), "image/png", 413, "too_many_pixels"),
        (png(), "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_bad_uploads_are_4xx_naming_the_problem_and_the_server_goes_on(client, body, kind, status, code):
    r = client.post("/v1/predict", content=body, headers={"Content-Type": kind})
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]
    ok = client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png"})
    assert ok.status_code == 200
    assert f'headstart_errors_total{{code="{code}"}} 1.0' in client.get("/metrics").text


def test_too_many_images_and_no_images(client):
    four = [("files", (f"{i}.png", png(), "image/png")) for i in range(4)]
    assert client.post("/v1/predict", files=four).json()["error"]["code"] in (
        "too_many_images",
        "bad_multipart",
    )
    r = client.post("/v1/predict", data={"note": "x"}, files={"other": ("", b"", "text/plain")})
    assert r.status_code == 400


def test_api_key(run):
    with TestClient(create_app(run, ServeConfig(api_key="s3cret"))) as c:
        ready(c)
        assert c.get("/v1/model").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    with pytest.raises(ConfigError, match="--api-key"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "s3cret")
    r = run_cli("serve", run, "--host", "0.0.0.0")
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr


def test_mounted_in_another_app(run):
    from fastapi import FastAPI

    outer = FastAPI()
    inner = create_app(run)
    outer.mount("/classifier", inner)
    with TestClient(outer) as c:  # Starlette runs no lifespan of a mounted app: the first request loads
        r = c.post("/classifier/v1/predict", content=png(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text  # it waited for the model instead of refusing
        assert c.get("/classifier/readyz").json() == {"status": "ready"}
        assert 'fetch("v1/model"' in c.get("/classifier/").text  # relative: works under the prefix


def test_concurrent_requests_share_forward_passes():
    class Slow:
        calls: list = []
        classes, rejection = ["a", "b"], None

        def outputs(self, x):
            import torch

            self.calls.append(len(x))
            time.sleep(0.05)
            return torch.zeros(len(x), 2), None

        def rank(self, logits, ood, k, *, reject):
            return [k] * len(logits)

    async def go():
        import torch

        b = Batcher(Slow(), max_batch=8, max_wait_ms=20)
        b.start()
        out = await asyncio.gather(*(b.predict(torch.zeros(3, 4, 4)) for _ in range(20)))
        await b.stop()
        return out

    out = asyncio.run(go())
    assert len(out) == 20 and sum(Slow.calls) == 20 and max(Slow.calls) == 8 and len(Slow.calls) <= 5


# ----------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, *extra: str) -> subprocess.Popen:
    log = open(run.parent / f"serve-{port}.log", "w")  # noqa: SIM115 - a pipe nobody reads could fill up
    cmd = [sys.executable, "-m", "headstart", "serve", str(run), "--port", str(port), *extra]
    p = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    p.log = Path(log.name)
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise AssertionError(p.log.read_text()[-3000:])
        time.sleep(0.1)
    p.kill()
    raise AssertionError("server did not become ready")


@pytest.mark.slow
def test_sigterm_answers_every_accepted_request_then_exits(run):
    """Requests in flight when SIGTERM arrives are answered; later connections are refused, never reset."""
    import httpx

    port = free_port()
    server = start_server(run, port, "--max-wait-ms", "20")
    outcomes: list[str] = []
    sent_at_signal = threading.Event()
    answered = asyncio.Event()  # bound to the loop that first waits on it (Python 3.10+)

    async def one(client: httpx.AsyncClient) -> str:
        try:
            r = await client.post(f"http://127.0.0.1:{port}/v1/predict", content=png(),
                                  headers={"Content-Type": "image/png"})  # fmt: skip
            answered.set()
            return f"{r.status_code}{' after' if sent_at_signal.is_set() else ''}"
        except httpx.ConnectError:
            return "refused"
        except httpx.HTTPError as e:
            return f"broken {type(e).__name__}"

    async def load():
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(60)]
            # at the first answer (a fixed 0.3 s found all 60 answered on a quick box: nothing left
            # to drain), or after 0.3 s where the box is slow: then connections still wait in the
            # kernel's backlog, which uvicorn's shutdown used to reset
            with contextlib.suppress(asyncio.TimeoutError):  # noqa: UP041 - another class before 3.11
                await asyncio.wait_for(answered.wait(), 0.3)
            server.send_signal(signal.SIGTERM)
            sent_at_signal.set()
            outcomes.extend(await asyncio.gather(*tasks))

    asyncio.run(load())
    server.wait(timeout=60)
    assert server.returncode == 0, server.log.read_text()[-2000:]
    assert not [o for o in outcomes if o.startswith(("broken", "5"))], outcomes
    assert any(o == "200 after" for o in outcomes), outcomes  # in flight at the signal, still answered


@pytest.mark.slow
def test_the_page_in_a_real_browser_shows_the_label_and_its_probability(tmp_path):
    """Headless Chromium drops an ant photo on the page of the real ant/bee model and sees 'ants'."""
    from conftest import HYMENOPTERA

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium here: .ci/run installs Debian's chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not present")
    run = tmp_path / "ants"
    train(HYMENOPTERA, output=run, strategy="extract")
    port = free_port()
    server = start_server(run, port)
    ant = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[0]
    try:
        with playwright.sync_playwright() as pw:
            quiet = ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
            args = ["--no-sandbox", "--disable-gpu", "--no-first-run", *quiet]  # no calls to Google's hosts
            browser = pw.chromium.launch(executable_path=chromium, args=args)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("text=ants, bees")  # the model card loaded
            page.set_input_files("#files", str(ant))
            page.wait_for_selector(".result .bar")
            first = page.locator(".result .bar").first
            label, prob = first.locator(".label").inner_text(), float(first.locator(".prob").inner_text())
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert label == "ants" and 0.5 < prob <= 1.0
    assert os.path.getsize(tmp_path / "page.png") > 10_000


def test_without_the_serve_extra_it_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs uvicorn.*pip install 'headstart\[serve\]'"):
        create_app("any-run")
