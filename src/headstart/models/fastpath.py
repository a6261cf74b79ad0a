"""The inference fast path shared by extraction, `headstart bench` and the benchmarks."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval BatchNorm that directly follows a Conv2d (as registered) into the conv, in place.

    timm's BatchNormAct2d keeps its activation. Returns how many were folded.
    """
    n = 0
    for parent in list(model.modules()):
        kids = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(kids, kids[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm)) or not bn.track_running_stats:
                continue
            if conv.out_channels != bn.num_features or bn.running_var is None:
                continue
            w, b = fuse_conv_bn_weights(
                conv.weight,
                conv.bias,
                bn.running_mean,
                bn.running_var,
                bn.eps,
                bn.weight if bn.affine else None,
                bn.bias if bn.affine else None,
            )
            conv.weight, conv.bias = w.requires_grad_(False), b.requires_grad_(False)
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
            n += 1
    return n


def _fast_copy(backbone: nn.Module, device: torch.device) -> nn.Module:
    """A BN-folded, channels-last copy, used only if it gives the same features (else the original)."""
    fast = copy.deepcopy(backbone).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    if fold_batchnorm(fast) == 0:
        fast = backbone
    fast = fast.to(device=device, memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)  # the global RNG (shuffles, dropout) stays untouched
    x = torch.randn(2, 3, backbone.config.input_size, backbone.config.input_size, generator=gen).to(device)
    with torch.inference_mode():
        ok = torch.allclose(fast(x), backbone(x), rtol=1e-3, atol=1e-3)
    return fast if ok else backbone


def inference_model(backbone: nn.Module, device: torch.device, *, compile: bool = False) -> nn.Module:
    """The frozen backbone for inference: BatchNorm folded into convs, channels-last, compiled if asked.

    Works on a copy (the original keeps its tensors for the frozen proof), built once per backbone
    object; measured on the 2-core CPU, see docs/benchmarks.md.
    """
    backbone.eval().to(device)
    # parameter/buffer versions bump on every in-place update, so a fine-tuned backbone is re-copied
    version = sum(t._version for t in (*backbone.parameters(), *backbone.buffers()))
    key = (str(device), compile, version)
    cached = getattr(backbone, "_headstart_fast", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    model = _fast_copy(backbone, device)
    if compile:
        model = torch.compile(model)
    object.__setattr__(backbone, "_headstart_fast", (key, model))
    return model


def inference_batch_size(device: torch.device) -> int:
    """A batch size that suits the device for frozen-backbone inference."""
    return 256 if device.type == "cuda" else 64
