"""The training loop: read `fit` top to bottom.

per epoch: train (forward, loss, backward, step; a checkpoint every --checkpoint-every steps and on
SIGTERM / Ctrl-C) -> validate -> a metrics.csv row -> keep the best weights -> checkpoint -> stop
early if asked. `--resume` restores a checkpoint and continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset

from headstart.core import logs
from headstart.core.device import autocast_for, to_device
from headstart.core.distributed import all_sum, shard
from headstart.core.errors import TrainingDiverged
from headstart.core.files import CHECKPOINT, METRICS
from headstart.core.metrics import balanced_accuracy, confusion_counts
from headstart.data.layout import Skipped
from headstart.data.loading import SlicedBatches, make_loader, worker_death
from headstart.models.freezing import frozen_tensor_names
from headstart.models.tta import mean_over_views
from headstart.training.checkpoint import (
    ResumableSampler,
    StopRequest,
    interrupted,
    load_checkpoint,
    never_loaded_failures,
    rng_state,
    save_checkpoint,
    set_rng_state,
    worker_died,
)
from headstart.training.mixing import mix_batch
from headstart.training.optim import build_optimizer, build_scheduler, reschedule
from headstart.training.rundir import MetricsLog
from headstart.training.setup import Run, check_bad_fraction
from headstart.training.strategies.base import Fitted, Inputs


def fit(run: Run, inputs: Inputs) -> Fitted:
    """Train `inputs.net` for cfg.epochs on inputs.train, validating on inputs.val after each epoch."""
    cfg, dist = run.cfg, run.dist
    train_loader, sampler, val_loader = loaders(run, inputs)
    net = inputs.net
    if dist.enabled:
        net = DistributedDataParallel(
            net, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    optimizer = build_optimizer(run.model, cfg, one_lr=run.strategy.one_lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(train_loader))
    state = LoopState(run, net, optimizer, scheduler, inputs.identity, steps_per_epoch=len(train_loader))
    if run.resume and (run.out / CHECKPOINT).is_file():
        state.restore()
    started = time.perf_counter()
    # signals stop cleanly after a step; under torchrun the launcher handles them
    with (
        MetricsLog(run.out / METRICS, state.metrics, enabled=dist.is_main) as metrics,
        StopRequest() if not dist.enabled else contextlib.nullcontext() as stop,
    ):
        for epoch in itertools.count(state.epoch):  # to the last epoch, which a budget may move
            if epoch > state.last_epoch:
                break
            t0 = time.perf_counter()
            totals = state.totals if epoch == state.epoch and state.totals else new_totals()
            start_epoch(sampler, inputs, epoch, totals["batches"] * cfg.batch_size)
            try:
                tr = train_epoch(net, train_loader, state, epoch, totals, stop)
                t_val = time.perf_counter()
                va = validate(net, val_loader, run, state.bad_files)
            except OutOfTime:
                run.out_of_time = True
                break
            except RuntimeError as e:  # a loader worker died: keep the position, say what to do
                if (why := worker_death(e)) is None:
                    raise
                state.save(epoch, totals)
                raise worker_died(why, run, inputs) from e
            if state.end_epoch(epoch, tr, va, totals["lr"], (t0, t_val), metrics):
                break
            if stop:
                raise interrupted(stop.signal, run, epoch + 1, 0, len(train_loader))
    if inputs.decodes_images and train_loader.drop_last and isinstance(sampler, ResumableSampler):
        state.bad_files.update(
            never_loaded_failures(sampler, cfg.batch_size, len(metrics.rows), run.split.train)
        )
    best = state.best
    return Fitted(
        metrics.rows,
        best["epoch"],
        best["val_acc"],
        best["val_loss"],
        best["state"],
        time.perf_counter() - started,
        state.bad_files,
        state.resumes,
        val_confusion=best.get("confusion"),  # checkpoints of older versions lack it
        epochs_trained=round(state.trained(), 4),
    )


def train_epoch(net: nn.Module, loader, state: LoopState, epoch: int, totals: dict, stop) -> dict:
    """One pass over the training loader, continuing `totals` (a resumed epoch starts mid-way).

    Checkpoints every --checkpoint-every steps, and on a stop request before raising RunInterrupted.
    """
    run, cfg = state.run, state.run.cfg
    per_epoch = len(loader)
    every = cfg.checkpoint_every if not run.dist.enabled else None  # torchrun: epoch checkpoints only
    totals["lr"] = state.optimizer.param_groups[0]["lr"] if not totals["batches"] else totals["lr"]
    n_files = len(run.split.train) + len(run.split.val)
    net.train()
    for batch in logs.progress(loader, desc=f"epoch {epoch}/{state.last_epoch}", unit="batch"):
        totals["batches"] += 1
        state.bad_files.update({run.split.train[i][0]: why for i, why in batch.failed})
        if batch.x is not None:
            loss, logits, y = train_step(net, batch, run, state.optimizer, state.scheduler)
            add_batch(totals, loss, logits, y, run.head_spec.kind)
        if len(state.bad_files) > cfg.max_bad_fraction * n_files:
            check_bad_fraction(skipped(state.bad_files), run.split, cfg.max_bad_fraction, so_far=True)
        if stop or (every and ((epoch - 1) * per_epoch + totals["batches"]) % every == 0):
            state.save(epoch, totals)
        if state.cut_short(epoch, totals["batches"]):  # a budget's last epoch, cut to the time left
            break
        budgeted = run.deadline is not None and state.best["epoch"] > 0
        if stop and not budgeted:
            raise interrupted(stop.signal, run, epoch, totals["batches"], per_epoch)
        # under a budget (auto) Ctrl-C ends training like the deadline does: the kept epoch is the model
        if budgeted and (stop or time.monotonic() > run.deadline):
            why = f"{stop.signal} received" if stop else "the time is up"
            logs.info(f"budget: {why} in epoch {epoch}; the kept epoch ({state.best['epoch']}) is the model")
            raise OutOfTime
    return epoch_result(totals, run)


# a budget's last epoch may be cut to the time left, if at least this share of it fits: a sliver
# would cost a whole validation for a few steps
PART_EPOCH = 0.25


class OutOfTime(Exception):
    """The budget's deadline passed mid-epoch (after at least one whole epoch): training ends."""


class LoopState:
    """Where the loop is and what it keeps: position, best weights, metrics, failed files; saved in
    checkpoint.pt after every epoch (and every --checkpoint-every steps) and restored by --resume."""

    def __init__(self, run: Run, net: nn.Module, optimizer, scheduler, identity: str | None, *,
                 steps_per_epoch: int = 1):  # fmt: skip
        self.run, self.net, self.optimizer, self.scheduler, self.identity = (
            run,
            net,
            optimizer,
            scheduler,
            identity,
        )
        self.epoch, self.totals, self.resumes = 1, None, 0
        self.last_epoch = run.cfg.epochs  # fewer or more where a budget's deadline says so
        self.last_batches: int | None = None  # the last epoch trains only these (the budget's time left)
        self.steps_per_epoch = steps_per_epoch  # the whole epoch's batches, whatever a resume skips
        self.metrics: list[dict] = []
        self.bad_files: dict[str, str] = {}
        self.best = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}

    def keep_best(self, epoch: int, va: dict) -> bool:
        """Keep the trained tensors if this epoch beats the best (val accuracy, then loss; balanced
        accuracy first with --class-weights balanced), or every epoch's with --keep-epoch last (the
        model is then chosen without the validation split)."""
        last = self.run.cfg.keep_epoch == "last"
        if not last and self._rank(va["acc"], va["loss"], va.get("confusion")) <= self._rank(
            self.best["val_acc"], self.best["val_loss"], self.best.get("confusion")
        ):
            return False
        self.best.update(
            val_acc=va["acc"],
            val_loss=va["loss"],
            epoch=epoch,
            state=trainable_state(self.run.model),
            confusion=va.get("confusion"),
        )
        return True

    def _rank(self, acc: float, loss: float, confusion) -> tuple:
        """What "best" compares: where the user weights the classes alike, every class's recall
        counts alike (balanced accuracy) before plain accuracy."""
        plain = (acc, -loss)
        if self.run.cfg.class_weights != "balanced":
            return plain
        return (balanced_accuracy(confusion) if confusion is not None else acc, *plain)

    def end_epoch(self, epoch: int, tr: dict, va: dict, lr: float, started: tuple[float, float],
                  metrics: MetricsLog) -> bool:  # fmt: skip
        """The epoch's row, the best weights, the checkpoint; True when training ends here (early stop,
        or another epoch would overrun the budget). `started`: when its training and its validation began."""
        run, cfg = self.run, self.run.cfg
        check_bad_fraction(skipped(self.bad_files), run.split, cfg.max_bad_fraction)
        now = time.perf_counter()
        seconds = now - started[0]
        metrics.add({"epoch": epoch, "train_loss": round(tr["loss"], 6), "train_acc": round(tr["acc"], 6),
                     "val_loss": round(va["loss"], 6), "val_acc": round(va["acc"], 6), "lr": lr,
                     "seconds": round(seconds, 3)})  # fmt: skip
        improved = self.keep_best(epoch, va)
        mark = "  *" if improved else ""
        logs.info(f"epoch {epoch:>3}/{self.last_epoch}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                  f"val loss {va['loss']:.4f} acc {va['acc']:.4f}  {seconds:.1f}s{mark}")  # fmt: skip
        stop_early = bool(cfg.patience and epoch - self.best["epoch"] >= cfg.patience)
        self.fit_budget(epoch, seconds, now - started[1])
        done = stop_early or epoch >= self.last_epoch
        self.save(self.last_epoch + 1 if done else epoch + 1, None)
        if stop_early:
            logs.info(f"early stop: no val improvement for {cfg.patience} epochs")
        elif done and run.out_of_time:
            logs.info(
                f"budget: stopping after epoch {epoch}; the kept epoch ({self.best['epoch']}) is the model"
            )
        return done

    def fit_budget(self, epoch: int, seconds: float, val_seconds: float = 0.0) -> None:
        """Under a budget, count the epochs that still fit before the deadline at this epoch's pace
        (`seconds`, `val_seconds` of it validating), and the share of one more that fits with its
        validation (at least PART_EPOCH). Fewer than planned: training ends after them. More, after
        the first epoch (the time model is an estimate): up to the plan's most. Either way the
        cosine schedule decays from where it stands to 0 by the new end."""
        run = self.run
        if run.deadline is None:
            return
        # 10 % slack: the epochs of a 60-minute CIFAR-10 run grew from 428 s to 522 s
        pace, left = max(1.1 * seconds, 1e-9), max(0.0, run.deadline - time.monotonic())
        whole = int(left // pace)
        part = (left - whole * pace - 1.1 * val_seconds) / max(1.1 * (seconds - val_seconds), 1e-9)
        fit = epoch + whole + (part if part >= PART_EPOCH else 0.0)
        if fit < self.planned_end() - 1e-9:
            run.out_of_time = True
        elif epoch == 1 and self.resumes == 0 and min(fit, run.most_epochs or 0) > self.planned_end():
            fit = min(fit, run.most_epochs)
        else:
            return
        self.last_epoch = math.ceil(fit - 1e-9)
        batches = round((fit - math.floor(fit + 1e-9)) * self.steps_per_epoch)
        self.last_batches = batches if 0 < batches < self.steps_per_epoch else None
        if self.last_epoch > epoch:
            end = self.planned_end()
            reschedule(self.scheduler, end)
            cut = f" ({self.last_batches} of its {self.steps_per_epoch} batches)" if self.last_batches else ""
            logs.info(f"budget: {end - epoch:.2f} more epoch(s) fit at this pace; training ends after epoch "
                      f"{self.last_epoch}{cut}, the learning rate decaying to 0 by then")  # fmt: skip

    def planned_end(self) -> float:
        """Where training ends, in epochs: the last epoch, or the share of it the budget leaves."""
        if self.last_batches:
            return self.last_epoch - 1 + self.last_batches / self.steps_per_epoch
        return float(self.last_epoch)

    def trained(self) -> float:
        """Epochs trained so far: the last one as its share of batches where the budget cut it short."""
        done = bool(self.metrics) and self.metrics[-1]["epoch"] == self.last_epoch
        return self.planned_end() if done else float(len(self.metrics))

    def cut_short(self, epoch: int, batches: int) -> bool:
        """True after the last of the batches a budget leaves to the last epoch."""
        return epoch == self.last_epoch and bool(self.last_batches) and batches >= self.last_batches

    def save(self, epoch: int, totals: dict | None) -> None:
        """Write checkpoint.pt (rank 0): continue at `epoch`, with `totals` of a part-done epoch."""
        if not self.run.dist.is_main:
            return
        save_checkpoint(
            self.run.out / CHECKPOINT,
            {
                "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng": rng_state(),
                "epoch": epoch,
                "totals": totals,
                "best": self.best,
                "metrics": self.metrics,
                "bad_files": self.bad_files,
                "feature_id": self.identity,
                "resumes": self.resumes,
                "last_epoch": self.last_epoch,
                "last_batches": self.last_batches,
            },
        )

    def restore(self) -> None:
        """Weights, optimizer, scheduler, RNG states and position back from checkpoint.pt."""
        path = self.run.out / CHECKPOINT
        ck = load_checkpoint(path)
        self.net.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None and ck["scheduler"] is not None:
            self.scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        if ck.get("feature_id") != self.identity:
            logs.warning(
                "warning: the features computed now differ from those of the interrupted run "
                "(other machine, thread count or library version?); the resumed run continues but "
                "will not be bit-identical to an uninterrupted one."
            )
        self.epoch, self.totals, self.resumes, self.best = (
            ck["epoch"],
            ck["totals"],
            ck["resumes"] + 1,
            ck["best"],
        )
        self.metrics[:] = ck["metrics"]
        self.last_epoch = ck.get("last_epoch", self.run.cfg.epochs)  # older checkpoints lack it
        self.last_batches = ck.get("last_batches")
        self.bad_files.update(ck["bad_files"])
        logs.info(
            f"resumed from {path} at epoch {ck['epoch']}, batch {(ck['totals'] or {}).get('batches', 0)}"
        )


# ----------------------------------------------------------------------------- pieces of the loop


def loaders(run: Run, inputs: Inputs):
    """Train loader (shuffled by (seed, epoch); under torchrun a DistributedSampler share), its
    sampler, and the val loader (under torchrun a strided share; sums are all-reduced)."""
    cfg, dist = run.cfg, run.dist
    pin = run.device.type == "cuda"
    sampler = (
        DistributedSampler(inputs.train, seed=cfg.seed)
        if dist.enabled
        else ResumableSampler(len(inputs.train), seed=cfg.seed)
    )
    per_rank = len(inputs.train) // dist.world
    drop_last = per_rank > cfg.batch_size
    val_rows = shard(list(range(len(inputs.val))), dist)
    if hasattr(inputs.train, "take"):  # cached features or maps: read whole batches, no DataLoader
        train = SlicedBatches(inputs.train, sampler, batch_size=cfg.batch_size, drop_last=drop_last)
        return train, sampler, SlicedBatches(inputs.val, val_rows, batch_size=max(cfg.batch_size, 64))
    train = make_loader(
        inputs.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        sampler=sampler,
        num_workers=inputs.workers,
        seed=cfg.seed,
        pin_memory=pin,
        drop_last=drop_last,
    )
    val = make_loader(
        Subset(inputs.val, val_rows),
        batch_size=max(cfg.batch_size, 64),
        shuffle=False,
        num_workers=inputs.workers,
        pin_memory=pin,
    )
    return train, sampler, val


def start_epoch(sampler, inputs: Inputs, epoch: int, start: int) -> None:
    """Point the sampler (and per-epoch views or augmentation) at `epoch`, from position `start`."""
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch, start=start)
    else:
        sampler.set_epoch(epoch)
    inputs.train.epoch = epoch


def train_step(net: nn.Module, batch, run: Run, optimizer, scheduler) -> tuple[torch.Tensor, ...]:
    """Forward, loss, backward, optimizer and scheduler step; stops on a non-finite loss. Returns
    the loss, the logits and the labels to score them on (with mixup or CutMix, the larger part's)."""
    x, y = to_device(batch.x, run.device), to_device(batch.y, run.device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    aug, lam = run.cfg.augment, 1.0
    if (aug.mixup > 0 or aug.cutmix > 0) and len(x) > 1:
        x, perm, lam = mix_batch(x, aug.mixup, aug.cutmix)
    with autocast_for(run.device, training=True):
        logits = net(x)
        loss = run.loss_fn(logits, y)
        if lam < 1:  # each label's loss in its share of the mix
            loss = lam * loss + (1 - lam) * run.loss_fn(logits, y[perm])
    if not torch.isfinite(loss):
        files = [run.split.train[i][0] for i in batch.index.tolist()]
        raise TrainingDiverged(
            f"The loss became {loss.item()} at this batch; training stopped before it could reach the "
            f"saved model. Files in the batch: {', '.join(files[:8])}{' …' if len(files) > 8 else ''}. "
            "Lower --lr, or check these images."
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    try:
        optimizer.step()
    except RuntimeError as e:  # e.g. Adam's step size overflows float32 at --lr 1e38
        if "overflow" not in str(e):
            raise
        raise TrainingDiverged(
            f"The optimizer step overflowed ({e}); the learning rate {optimizer.param_groups[0]['lr']:g} "
            "is far too large. Lower --lr."
        ) from e
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), logits.detach(), y if lam >= 0.5 else y[perm]


@torch.inference_mode()
def validate(net: nn.Module, loader, run: Run, bad: dict[str, str]) -> dict:
    """Mean loss, accuracy and confusion matrix over the val loader (all ranks summed); failed files
    go into `bad`."""
    net.eval()
    totals = new_totals()
    k = len(run.split.classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    for batch in logs.progress(loader, desc="val", unit="batch"):
        bad.update({run.split.val[i][0]: why for i, why in batch.failed})
        if batch.x is None:
            continue
        x, y = to_device(batch.x, run.device), to_device(batch.y, run.device)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(run.device):
            logits = mean_over_views(net, x)  # stacked TTA views [B, V, ...]: their mean
            loss = run.loss_fn(logits, y)
        add_batch(totals, loss, logits, y, run.head_spec.kind)
        pred = predict_labels(logits, run.head_spec.kind)
        confusion += confusion_counts(y.cpu().numpy(), pred.cpu().numpy(), k)
    summed = np.asarray(all_sum(confusion.ravel().tolist(), run.dist, run.device), dtype=np.int64)
    return epoch_result(totals, run) | {"confusion": summed.reshape(k, k).tolist()}


def new_totals() -> dict:
    """Running sums of one epoch (saved in checkpoints so a resumed epoch averages the same)."""
    return {"batches": 0, "loss_sum": 0.0, "correct": 0, "seen": 0}


def add_batch(t: dict, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, head_kind: str) -> None:
    """Add one batch's loss and correct predictions to the running sums."""
    n = y.numel()
    t["loss_sum"] += loss.item() * n
    t["correct"] += (predict_labels(logits, head_kind) == y.to(logits.device)).sum().item()
    t["seen"] += n


def epoch_result(t: dict, run: Run) -> dict:
    """Mean loss and accuracy of the running sums, summed across torchrun processes."""
    loss_sum, correct, seen = all_sum([t["loss_sum"], t["correct"], t["seen"]], run.dist, run.device)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "n": int(seen)}


def predict_labels(logits: torch.Tensor, head_kind: str) -> torch.Tensor:
    """Predicted class indices from head outputs."""
    if head_kind == "binary":
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(dim=1)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the tensors that can change: trainable params and non-frozen BN buffers."""
    _, names = frozen_tensor_names(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: tensors[n].detach().clone() for n in names}


def skipped(bad: dict[str, str]) -> list[Skipped]:
    """Failed files as Skipped entries."""
    return [Skipped(p, r) for p, r in bad.items()]


@torch.inference_mode()
def logits_of(net: nn.Module, inputs: Inputs, run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits and labels of the whole val set (one process, in order), e.g. for calibration."""
    net.eval()
    loader = make_loader(
        inputs.val, batch_size=max(run.cfg.batch_size, 64), shuffle=False, num_workers=inputs.workers
    )
    zs, ys = [], []
    for batch in loader:
        if batch.x is None:
            continue
        x = to_device(batch.x, run.device)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(run.device):
            zs.append(mean_over_views(net, x).float().cpu().reshape(len(batch.y), -1))
        ys.append(batch.y)
    width = 1 if run.head_spec.kind == "binary" else len(run.split.classes)
    logits = torch.cat(zs).double().numpy() if zs else np.zeros((0, width))
    return logits, (torch.cat(ys).numpy() if ys else np.zeros(0, dtype=np.int64))
