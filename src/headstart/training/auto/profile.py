"""What the planner measures before it plans: the data (counts, image sizes) and this machine's speed
for each kind of work a candidate does (decoding, backbone forward, training steps)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from headstart.core import logs
from headstart.core.device import autocast_for, available_cores, configure_threads, pick_device
from headstart.core.timing import images_per_second
from headstart.data.images import load_image
from headstart.data.layout import DataSplit
from headstart.data.loading import default_workers
from headstart.data.transforms import Preprocess, eval_transform
from headstart.features.engine import MIN_IMAGES_FOR_ORT, ORT, choose_engine, export_frozen, ort_session
from headstart.features.live_prefix import LivePrefix, torch_prefix
from headstart.features.prefix import split_model
from headstart.models.backbones import create_backbone
from headstart.models.fastpath import inference_model
from headstart.models.freezing import train_everything, unfreeze_last
from headstart.models.heads import HeadSpec
from headstart.models.transfer import TransferModel

REFERENCE = 224  # rates are measured at this input size and scaled by pixels for others
TIMING = Preprocess(REFERENCE, (0.5,) * 3, (0.5,) * 3)  # what rates are timed with: mean/std change no speed


@dataclass
class DataProfile:
    """The training data as the planner sees it."""

    num_train: int
    num_val: int
    classes: int
    smallest_class: int
    short_side: int  # median shorter side of a sample of the images, in pixels

    @classmethod
    def of(cls, split: DataSplit, *, sample: int = 200) -> DataProfile:
        """Counts from the split; image sizes from the headers of up to `sample` files (no decoding)."""
        sides = []
        step = max(1, len(split.train) // sample)
        for path, _ in split.train[::step][:sample]:
            try:
                with Image.open(path) as im:
                    sides.append(min(im.size))
            except Exception:  # noqa: BLE001 - an unreadable file is the doctor's business, not the plan's
                continue
        counts = list(split.counts("train").values())
        return cls(
            len(split.train),
            len(split.val),
            len(split.classes),
            min(counts),
            int(statistics.median(sides)) if sides else REFERENCE,
        )


@dataclass
class Speed:
    """Images per second on this machine, at REFERENCE px unless a key says otherwise."""

    device: str
    threads: int
    workers: int
    decode: float  # images/s that the loader processes together decode and transform
    forward: dict[str, float] = field(default_factory=dict)  # backbone -> inference img/s
    suffix_train: dict[int, float] = field(default_factory=dict)  # unfrozen groups -> img/s on cached maps
    # the other backbones auto fine-tunes on cached maps (long budgets) -> their img/s there
    larger_suffix: dict[str, float] = field(default_factory=dict)
    image_train: dict[int, float] = field(default_factory=dict)  # unfrozen groups -> img/s on images
    full_train: float = 0.0  # img/s on images with every layer training (0: not measured)
    # actual / predicted seconds of the pilots of each kind (candidates.learn): what micro-benchmarks
    # miss (loader processes competing with the model for 2 cores, say), applied to later predictions
    correction: dict[str, float] = field(default_factory=dict)
    observed: dict[str, tuple] = field(default_factory=dict, repr=False)  # kind -> (actual, predicted) sums
    extracted: dict[str, set] = field(default_factory=dict, repr=False)  # cache key -> image paths in it
    seconds: float = 0.0  # what measuring cost
    # the frozen engine auto picks for large sets (features/engine.py): its forward img/s per
    # backbone and what one export of a frozen part costs; empty where it is PyTorch
    engine: str = "torch"
    engine_forward: dict[str, float] = field(default_factory=dict)
    export_seconds: float = 0.0
    # the search runs one frozen pass for the pilots that share it (auto/shared_pass.py): priced once
    shared_pass: bool = False

    def to_dict(self) -> dict:
        """Plain-JSON form (without the paths of what the search cached)."""
        return {k: v for k, v in asdict(self).items() if k not in ("extracted", "observed")}


def seconds_per_rate(budget_seconds: float, images: int) -> float:
    """How long to time each rate: 0.6 s on short budgets and small data, up to 2 s from 12
    minutes on. On the 2-core box, three 0.6-s readings of one rate differed by up to 1.85x,
    three 2-s readings by up to 1.16x (docs/auto.md): a misread rate prices candidates in or out
    of a long plan. Below MIN_IMAGES_FOR_ORT images runs are short (about 2 minutes on the ant/bee
    photos), and 10-20 s more would be a tenth of that."""
    if images < MIN_IMAGES_FOR_ORT:
        return 0.6
    return min(2.0, max(0.6, budget_seconds / 360))


def measure(
    split: DataSplit,
    backbones: list[str],
    *,
    device: str = "auto",
    groups=(1, 2, 3),
    image_groups=(1, 2, 3),
    full: bool = True,
    larger_groups: int = 0,
    min_seconds: float = 0.6,
    weights: str | None = None,
    frozen_engine: str = "auto",
) -> Speed:
    """Time decoding real images and the backbone's forward and training steps (random weights:
    speed does not depend on their values), and the frozen engine large extractions will use:
    training on cached maps with each of `groups` unfrozen, on images with each of `image_groups`,
    with every layer where `full` (what prices full fine-tuning), and on cached maps with
    `larger_groups` unfrozen for each backbone after the first (0: not measured)."""
    t0 = time.perf_counter()
    dev = pick_device(device)
    threads = configure_threads()
    workers = default_workers()
    speed = Speed(str(dev), threads, workers, _decode_rate(split, workers))
    x = torch.randn(16, 3, REFERENCE, REFERENCE, device=dev).contiguous(memory_format=torch.channels_last)
    for name in backbones:
        net = inference_model(create_backbone(name, weights="none"), dev)

        def infer(net=net):
            with torch.inference_mode(), autocast_for(dev):
                net(x)

        speed.forward[name] = images_per_second(infer, len(x), min_seconds=min_seconds, device=dev)
    for g in groups:
        speed.suffix_train[g], on_images = _train_rates(
            backbones[0], g, x, dev, min_seconds, weights, on_images=g in image_groups
        )
        if g in image_groups:
            speed.image_train[g] = on_images
    if full:
        speed.full_train = _train_rates(backbones[0], None, x, dev, min_seconds, weights)[1]
    for name in backbones[1:] if larger_groups else []:
        rate = _train_rates(name, larger_groups, x, dev, min_seconds, None, on_images=False)
        speed.larger_suffix[name] = rate[0]
    if choose_engine(frozen_engine, dev, len(split.train) + len(split.val)).name == ORT:
        _engine_rates(speed, backbones, min_seconds)
    speed.seconds = time.perf_counter() - t0
    logs.info(
        f"auto: measured in {speed.seconds:.1f}s: decode {speed.decode:.0f} img/s ({workers} workers), "
        "forward "
        + ", ".join(f"{k} {v:.0f}" for k, v in speed.forward.items())
        + " img/s; train on cached maps "
        + ", ".join(f"{g} groups {v:.0f}" for g, v in speed.suffix_train.items())
        + " img/s; on images "
        + ", ".join(f"{g} groups {v:.0f}" for g, v in speed.image_train.items())
        + (f", all layers {speed.full_train:.0f}" if speed.full_train else "")
        + "".join(f"; {b}, {larger_groups} groups on maps {v:.0f}" for b, v in speed.larger_suffix.items())
        + f" img/s (at {REFERENCE} px)"
        + (
            f"; frozen work on ONNX Runtime {speed.engine_forward[backbones[0]]:.0f} img/s, "
            f"export {speed.export_seconds:.1f}s"
            if speed.engine == ORT
            else ""
        )
    )
    return speed


def _engine_rates(speed: Speed, backbones: list[str], min_seconds: float) -> None:
    """ONNX Runtime's forward img/s (the first backbone measured, the others scaled like PyTorch's)
    and the seconds of one export; PyTorch stays the engine where ONNX Runtime fails here."""
    import tempfile

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, REFERENCE, REFERENCE), dtype=torch.uint8, generator=gen).numpy()
    try:
        with tempfile.TemporaryDirectory(prefix="headstart-auto-engine-") as tmp:
            t = time.perf_counter()
            backbone = create_backbone(backbones[0], weights="none")
            path = export_frozen(backbone, TIMING, key={}, folder=Path(tmp))
            speed.export_seconds = time.perf_counter() - t
            session = ort_session(path)
            run = lambda: session.run(None, {"image": x})  # noqa: E731
            rate = images_per_second(run, len(x), min_seconds=min_seconds, device=torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - the runs fall back to PyTorch the same way
        logs.info(f"auto: ONNX Runtime could not be measured ({type(e).__name__}: {e}); pricing PyTorch")
        return
    speed.engine = ORT
    speed.engine_forward = {b: rate * speed.forward[b] / speed.forward[backbones[0]] for b in backbones}


def _decode_rate(split: DataSplit, workers: int, n: int = 24) -> float:
    """Images/s one process decodes and transforms (real files, as training reads them), times the
    processes that decode in parallel."""
    tf = eval_transform(TIMING)
    items = split.train[:: max(1, len(split.train) // n)][:n]
    t, done = time.perf_counter(), 0
    for path, _ in items:
        try:
            tf(load_image(path, draft=TIMING.resize_size))
            done += 1
        except Exception:  # noqa: BLE001 - unreadable files are counted by training, not here
            continue
    per_process = done / max(time.perf_counter() - t, 1e-6)
    return per_process * max(1, min(workers, available_cores()))


def _train_rates(
    backbone: str,
    groups: int | None,
    x: torch.Tensor,
    dev: torch.device,
    min_seconds: float,
    weights: str | None,
    *,
    on_images: bool = True,
) -> tuple[float, float]:
    """Training img/s with `groups` unfrozen: on cached prefix maps, and on whole images (0 unless
    `on_images`; a weights file, where the run names one, builds the architecture it fits). groups
    None: every layer trains, on images only (the first rate is then 0)."""
    w = "none" if weights is None or weights.lower() == "none" else weights
    model = TransferModel.build(create_backbone(backbone, weights=w), HeadSpec(), ["a", "b"])
    if groups is None:
        train_everything(model)
    else:
        unfreeze_last(model, groups)
    model.to(dev, memory_format=torch.channels_last).train()
    y = torch.randint(0, 2, (len(x),), device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(net, inp):
        with autocast_for(dev, training=True):
            loss = torch.nn.functional.cross_entropy(net(inp), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if groups is None:
        return 0.0, images_per_second(lambda: step(model, x), len(x), min_seconds=min_seconds, device=dev)
    sp = split_model(model, input_size=REFERENCE)
    # on images the frozen prefix runs on the fast path each step: time that very net
    live = LivePrefix(model, sp, torch_prefix(sp, TIMING, dev))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, tuple(x.shape), dtype=torch.uint8, generator=gen).to(dev)
    maps = live.maps(images)
    timed = lambda f: images_per_second(f, len(x), min_seconds=min_seconds, device=dev)  # noqa: E731
    on_maps = timed(lambda: step(sp.suffix, maps))
    return on_maps, timed(lambda: step(live, images)) if on_images else 0.0
