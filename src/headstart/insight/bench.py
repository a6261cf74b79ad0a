"""`headstart bench`: images/s of inference and of a training step, before committing to a run."""

from __future__ import annotations

import torch

from headstart.core.device import autocast_for, configure_threads, pick_device
from headstart.core.timing import images_per_second
from headstart.models.backbones import create_backbone
from headstart.models.fastpath import inference_model
from headstart.models.freezing import train_everything, unfreeze_last
from headstart.models.heads import HeadSpec
from headstart.models.transfer import TransferModel


def bench(
    backbone: str = "efficientnet_lite0",
    *,
    weights: str | None = "none",
    device: str = "auto",
    batch_size: int | None = None,
    unfreeze: int = 2,
    min_seconds: float = 3.0,
) -> dict:
    """Images/s for frozen-backbone inference and for fine-tune/full training steps."""
    dev = pick_device(device)
    threads = configure_threads()
    bs = batch_size or (128 if dev.type == "cuda" else 32)
    bb = create_backbone(backbone, weights=weights)  # speed does not depend on the values: default random
    size = bb.config.input_size
    x = torch.randn(bs, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=dev)
    out = {"backbone": bb.config.name, "device": str(dev), "threads": threads, "batch_size": bs,
           "input_size": size}  # fmt: skip

    net = inference_model(bb, dev)

    def infer():
        with torch.inference_mode(), autocast_for(dev):
            net(x)

    out["inference_img_s"] = images_per_second(infer, bs, min_seconds=min_seconds, device=dev)
    for strategy in ("finetune", "full"):
        model = TransferModel.build(create_backbone(backbone, weights=weights), HeadSpec(), ["a", "b"])
        unfreeze_last(model, unfreeze) if strategy == "finetune" else train_everything(model)
        model.to(dev, memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            with autocast_for(dev, training=True):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        key = f"train_{strategy}{unfreeze if strategy == 'finetune' else ''}_img_s"
        out[key] = images_per_second(step, bs, min_seconds=min_seconds, device=dev)
    return out
