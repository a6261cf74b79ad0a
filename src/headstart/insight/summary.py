"""`headstart summary`: a torchinfo table with trainable/frozen per layer, and totals."""

from __future__ import annotations

from headstart.models.backbones import create_backbone
from headstart.models.freezing import compact_names, count_params
from headstart.models.heads import HeadSpec
from headstart.models.transfer import TransferModel
from headstart.training.options import TrainConfig
from headstart.training.strategies import get_strategy


def summarize(
    backbone: str,
    *,
    strategy: str | None = None,
    unfreeze: int = 2,
    patterns: tuple[str, ...] = (),
    weights: str | None = None,
    num_classes: int = 2,
    depth: int = 3,
) -> str:
    """The table for a bare backbone, or for backbone + head after freezing for `strategy`."""
    from torchinfo import summary

    plugin = get_strategy(strategy) if strategy is not None else None
    bb = create_backbone(backbone, weights=weights if plugin is None or plugin.pretrained else "none")
    size = bb.config.input_size
    lines = [
        f"backbone {bb.config.name} ({bb.config.source}: {bb.config.arch}), weights: {bb.config.weights}",
        f"input {size}x{size}, mean {bb.config.mean}, std {bb.config.std}, "
        f"{bb.config.interpolation}, crop {bb.config.crop_pct:.3f}; features {bb.feature_dim}",
    ]
    groups = bb.block_groups()
    lines.append(
        f"{len(groups)} block groups for --unfreeze N (last first): "
        + ", ".join(_group_label(g) for g in reversed(groups))
    )
    if strategy is None:
        module = bb
    else:
        model = TransferModel.build(bb, HeadSpec(), [f"class{i}" for i in range(num_classes)])
        unfrozen = plugin.freeze(model, TrainConfig(unfreeze=unfreeze, unfreeze_patterns=tuple(patterns)))
        lines.append(f"strategy {strategy}: unfrozen backbone modules: {compact_names(unfrozen) or 'none'}")
        module = model
    stats = summary(
        module,
        input_size=(1, 3, size, size),
        col_names=("output_size", "num_params", "trainable"),
        depth=depth,
        row_settings=("var_names",),
        verbose=0,
        device="cpu",
    )
    trainable, frozen = count_params(module)
    lines += [
        str(stats),
        f"trainable params: {trainable:,}   frozen params: {frozen:,}   total: {trainable + frozen:,}",
    ]
    return "\n".join(lines)


def _group_label(names: list[str]) -> str:
    first = names[0].removeprefix("body.")
    head = first.split(".")[0] + ("." + first.split(".")[1] if first.startswith("blocks") else "")
    return head if len(names) == 1 else f"{head}(+{len(names) - 1})"
