"""`headstart bench` reports positive images/s for inference and training steps."""

from __future__ import annotations

from headstart.insight.bench import bench

from conftest import TINY, run_cli


def test_bench_api_and_cli():
    r = bench(TINY, batch_size=4, min_seconds=0.05)
    assert r["device"] in ("cpu", "cuda", "mps") and r["input_size"] == 160
    for key in ("inference_img_s", "train_finetune2_img_s", "train_full_img_s"):
        assert r[key] > 0
    out = run_cli("bench", TINY, "--batch-size", "2", "--seconds", "0.05")
    assert out.returncode == 0, out.stderr
    assert "inference" in out.stdout and "images/s" in out.stdout
    p = run_cli("bench", "timm:no_such_net")
    assert p.returncode == 2 and "Unknown timm model" in p.stderr
    # --weights like every other backbone command: a file that is not there is named
    p = run_cli("bench", TINY, "--weights", "missing.safetensors", "--seconds", "0.05")
    assert p.returncode == 2 and "missing.safetensors" in p.stderr


def test_compile_is_a_parameter_not_a_process_wide_switch():
    """--compile used to set a global that leaked into later runs in the same process."""
    import torch

    from headstart.models.backbones import create_backbone
    from headstart.models.fastpath import inference_model

    bb = create_backbone(TINY, weights="none")
    compiled = inference_model(bb, torch.device("cpu"), compile=True)  # torch.compile is lazy: no compile yet
    plain = inference_model(bb, torch.device("cpu"))
    assert type(compiled).__name__ == "OptimizedModule" and type(plain).__name__ != "OptimizedModule"


def test_inference_model_folds_bn_and_keeps_features():
    import torch

    from headstart.models.backbones import create_backbone
    from headstart.models.fastpath import fold_batchnorm, inference_model

    torch.manual_seed(0)
    bb = create_backbone(TINY, weights="none").eval()
    for m in bb.modules():  # non-trivial statistics, so folding has something to get wrong
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    fast = inference_model(bb, torch.device("cpu"))
    assert fast is not bb and inference_model(bb, torch.device("cpu")) is fast  # built once
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), bb(x),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())  # original untouched
    copy = create_backbone(TINY, weights="none")
    assert fold_batchnorm(copy) > 0


def test_inference_model_is_rebuilt_after_weights_change():
    import torch

    from headstart.models.backbones import create_backbone
    from headstart.models.fastpath import inference_model

    bb = create_backbone(TINY, weights="none").eval()
    x = torch.randn(2, 3, 64, 64)
    first = inference_model(bb, torch.device("cpu"))
    with torch.no_grad():
        next(bb.parameters()).mul_(2.0)  # as an optimizer step would
    second = inference_model(bb, torch.device("cpu"))
    assert second is not first
    with torch.inference_mode():
        torch.testing.assert_close(second(x), bb(x), rtol=1e-4, atol=1e-4)
