"""Mixup and CutMix of a training batch (Zhang et al. 2018; Yun et al. 2019): the loss is the
mixing weight's share of each label's loss, so any loss (weighted, smoothed, binary) takes it as is.

They work on whatever the batch holds: images, cached prefix maps (where CutMix cuts a box of the
map, the same region of the image at the prefix's stride) or pooled features (mixup only)."""

from __future__ import annotations

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam


def mix_batch(x: torch.Tensor, mixup: float, cutmix: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`x` mixed with a shuffled copy of itself: (mixed x, the shuffle, weight of the unshuffled
    labels). CutMix where asked and `x` is spatial, mixup otherwise; half and half where both are."""
    perm = torch.randperm(len(x), device=x.device)
    use_cutmix = cutmix > 0 and x.dim() == 4 and (mixup <= 0 or np.random.rand() < 0.5)
    if use_cutmix:
        (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, float(np.random.beta(cutmix, cutmix)))
        x = x.clone()
        x[..., yl:yh, xl:xh] = x[perm, :, yl:yh, xl:xh]  # only the box is gathered
        return x, perm, float(lam)
    alpha = mixup if mixup > 0 else cutmix  # pooled features have no box to cut: mix them instead
    lam = float(np.random.beta(alpha, alpha))
    mixed = lam * x.float() + (1 - lam) * x[perm].float()
    # uint8 images (the frozen engines normalise them) stay uint8: rounding moves a pixel by < 0.5/255
    return (mixed if x.is_floating_point() else mixed.round().to(x.dtype)), perm, lam
