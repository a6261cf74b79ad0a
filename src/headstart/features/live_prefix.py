"""Fine-tuning on augmented images with the frozen prefix on the fast path.

Where only the last block groups train, the first blocks need no gradient and never change, so
every batch runs them like frozen extraction does: BatchNorm folded, channels-last, or on ONNX
Runtime on a CPU where enough images pass through to repay the export; only the suffix and the
head run under autograd. Unlike --cache-prefix nothing is cached: each epoch's augmented crops
go through the prefix, so the usual augmentation stays. On 2 cores this trains lite0 with 2 groups
unfrozen at 224 px about 1.2x (PyTorch) to 1.7x (ONNX Runtime) faster (docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headstart.core import logs
from headstart.core.errors import ConfigError
from headstart.data.layout import DataSplit
from headstart.data.transforms import Preprocess
from headstart.features.engine import (
    ORT,
    EngineChoice,
    EngineSource,
    EngineUnavailable,
    Normalized,
    choose_engine,
    engine_path,
    fall_back,
)
from headstart.features.prefix import PrefixSplit, split_model
from headstart.features.views import FeatureOptions, cache_spec, engine_store
from headstart.models.fastpath import inference_model
from headstart.models.transfer import TransferModel


class LivePrefix(nn.Module):
    """uint8 images -> frozen prefix on its engine (no autograd) -> trainable suffix and head.

    The whole model is its one submodule, so its state dict (checkpoints, --resume) is the model's
    and train()/eval() keep frozen BatchNorm layers in eval as the model does.
    """

    def __init__(self, model: TransferModel, split: PrefixSplit, prefix: Callable[[Tensor], Tensor]):
        super().__init__()
        self.model = model
        self._parts = (split, prefix)  # a tuple: the suffix shares the model's modules, registered once

    def state_dict(self, *args, **kwargs):
        """The model's own state dict: checkpoints read the same with or without the live prefix."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Into the model, as state_dict wrote it."""
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's maps [B, C, H, W] (channels-last) of a uint8 batch, without autograd."""
        split, prefix = self._parts
        return prefix(x).view(len(x), *split.shape).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a uint8 batch [B, 3, H, W]."""
        return self._parts[0].suffix(self.maps(x))


@dataclass
class LiveSetup:
    """The net the loop trains and what results.json says of it (the engine's entry is filled in at
    the first batch, where the engine is built and checked)."""

    net: LivePrefix
    stats: dict


def live_prefix(model: TransferModel, split: DataSplit, pp: Preprocess, opts: FeatureOptions,
                device: torch.device, *, epochs: int,
                distributed: bool = False) -> LiveSetup | None:  # fmt: skip
    """The live-prefix net for this model, or None where nothing frozen comes before the first
    trainable module (full fine-tuning) or the backbone is not a chain of modules: the whole
    model trains as it is then."""
    try:
        sp = split_model(model, input_size=pp.input_size)
    except ConfigError:
        return None
    if random_in_training(sp.prefix):  # e.g. stochastic depth in frozen blocks: keep it as it was
        return None
    passes = (len(split.train) + len(split.val)) * epochs
    spec = cache_spec(model.backbone, pp, EngineChoice(ORT), prefix_split=sp.at, map_shape=list(sp.shape))
    store = engine_store(opts)
    exported = store is not None and engine_path(spec, store).is_file()  # e.g. by a --cache-prefix run
    if distributed and opts.engine == "auto":  # an ONNX Runtime session per process: cores fought over
        choice = EngineChoice("torch", note="torchrun: every process on PyTorch")
    else:
        choice = choose_engine(opts.engine, device, passes, compile=opts.compile, exported=exported)
    stats = {"prefix_split": sp.at, "frozen_engine": {"name": choice.name, "note": choice.note}}
    fast = torch_prefix(sp, pp, device, compile=opts.compile)
    prefix = fast
    if choice.name == ORT:
        source = EngineSource(choice, sp.prefix, pp, device, key=spec, store=store)
        prefix = _OrtPrefix(source, fast, stats)
    logs.info(f"finetune: the frozen prefix up to {sp.at} runs without autograd on {choice.name} "
              f"({choice.note})")  # fmt: skip
    return LiveSetup(LivePrefix(model, sp, prefix), stats)


def random_in_training(module: nn.Module) -> bool:
    """Whether `module` holds layers that act at random in training mode (dropout, stochastic
    depth), which the whole model applied to the frozen blocks and the eval-mode fast path would not."""
    for m in module.modules():
        name = type(m).__name__
        p = getattr(m, "p", None) if "Dropout" in name or name == "StochasticDepth" else None
        p = getattr(m, "drop_prob", None) if name == "DropPath" else p
        if p:
            return True
    return False


def torch_prefix(sp: PrefixSplit, pp: Preprocess, device: torch.device, *, compile: bool = False):
    """The prefix on PyTorch's fast path (BN folded, channels-last), on the device, without autograd."""
    net = Normalized(inference_model(sp.prefix, device, compile=compile), pp).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # not inference_mode: the suffix's autograd saves these maps
            return net(x.to(device))

    return run


class _OrtPrefix:
    """The prefix on ONNX Runtime (checked against PyTorch on the first batch); PyTorch's fast path
    where ONNX Runtime turns out unable, unless it was asked for by name."""

    def __init__(self, source: EngineSource, fallback, stats: dict):
        self.source, self.fallback, self.stats = source, fallback, stats
        self.failed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.fallback(x)
        x = x.cpu().contiguous()  # ONNX Runtime reads plain NCHW arrays
        try:
            engine = self.source.get(x)
        except EngineUnavailable as e:
            torch_choice = fall_back(e, self.source.choice)
            self.failed = True
            self.stats["frozen_engine"] = {"name": torch_choice.name, "note": torch_choice.note}
            return self.fallback(x)
        self.stats["frozen_engine"] = engine.record
        return torch.from_numpy(engine.run(x))
