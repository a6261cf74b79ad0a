"""The learning-rate schedule under a budget (a run cut short or stretched still decays to 0) and
batch mixing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import headstart
from headstart.training import loop
from headstart.training.mixing import mix_batch
from headstart.training.optim import Cosine, reschedule

from conftest import TINY


def _scheduler(epochs: int, steps: int):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, Cosine(epochs, steps))


def _run_epochs(opt, sched, epochs: int, steps: int) -> float:
    for _ in range(epochs * steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_a_rescheduled_cosine_goes_on_from_where_it_stands_to_zero_and_survives_a_resume():
    opt, sched = _scheduler(epochs=5, steps=10)
    lr = _run_epochs(opt, sched, 2, 10)
    assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))
    reschedule(sched, 3)  # the budget: one more epoch, not three
    opt.step()
    sched.step()
    assert lr * 0.97 < opt.param_groups[0]["lr"] < lr  # no jump: one step into the faster decay
    state = sched.state_dict()
    opt2, sched2 = _scheduler(epochs=5, steps=10)
    _run_epochs(opt2, sched2, 2, 10)
    sched2.load_state_dict(state)  # a resumed run keeps the new end
    assert sched2.lr_lambdas[0].epochs == 3
    assert _run_epochs(opt2, sched2, 1, 10) == pytest.approx(0.0, abs=1e-12)
    opt, sched = _scheduler(epochs=3, steps=10)
    lr = _run_epochs(opt, sched, 1, 10)
    reschedule(sched, 6)  # more time than planned: a longer, gentler decay from the same rate
    assert [_run_epochs(opt, sched, 1, 10) for _ in range(5)][-1] == pytest.approx(0.0, abs=1e-12)
    assert sched.lr_lambdas[0](10) == pytest.approx(lr) and sched.lr_lambdas[0](11) > 0.99 * lr


def _state(monkeypatch, *, now: float, deadline: float | None, epochs: int = 5, most: int | None = None):
    opt, sched = _scheduler(epochs, 10)
    run = SimpleNamespace(deadline=deadline, out_of_time=False, cfg=SimpleNamespace(epochs=epochs),
                          most_epochs=most)  # fmt: skip
    state = loop.LoopState.__new__(loop.LoopState)
    state.run, state.scheduler, state.last_epoch, state.resumes = run, sched, epochs, 0
    state.last_batches, state.steps_per_epoch = None, 10
    monkeypatch.setattr(loop.time, "monotonic", lambda: now)
    return state, sched


def test_the_budget_ends_training_after_the_epochs_that_fit_and_decays_by_then(monkeypatch):
    # after epoch 2 of 5 at 100 s each (10 s of it validating), 240 s are left: 2 more epochs fit
    # with 10 % slack (220 s), and the 9 s after them do not pay for a quarter epoch and its validation
    state, sched = _state(monkeypatch, now=1000.0, deadline=1240.0)
    state.fit_budget(2, 100.0, 10.0)
    assert state.last_epoch == 4 and state.last_batches is None and state.run.out_of_time
    assert sched.lr_lambdas[0].epochs == 4
    # not even a quarter more fits: stop now, the schedule as it was
    state, sched = _state(monkeypatch, now=1000.0, deadline=1030.0)
    state.fit_budget(2, 100.0, 10.0)
    assert state.last_epoch == 2 and state.run.out_of_time and sched.lr_lambdas[0].epochs == 5
    state, _ = _state(monkeypatch, now=1000.0, deadline=1300.0)  # 3 x 100 s, but not with the slack
    state.fit_budget(2, 100.0, 10.0)
    assert state.last_epoch == 5 and state.last_batches == 7 and state.run.out_of_time


def test_the_time_after_the_whole_epochs_trains_part_of_one_more(monkeypatch):
    # 300 s left after epoch 2 (100 s, 10 of them validating): 2 whole epochs (220 s with the slack);
    # of the 80 s after them, 11 pay for the validation and 69 for 69 / 99 = 0.70 of an epoch's training
    state, sched = _state(monkeypatch, now=1000.0, deadline=1300.0)
    state.fit_budget(2, 100.0, 10.0)
    assert state.last_epoch == 5 and state.last_batches == 7 and state.run.out_of_time
    assert sched.lr_lambdas[0].epochs == pytest.approx(4.7)  # the decay reaches 0 at the cut
    assert state.planned_end() == pytest.approx(4.7)
    assert [state.cut_short(e, b) for e, b in ((4, 9), (5, 6), (5, 7))] == [False, False, True]
    # a first epoch that leaves time for more than planned stretches to a share of an epoch too
    state, sched = _state(monkeypatch, now=1000.0, deadline=1300.0, epochs=2, most=6)
    state.fit_budget(1, 100.0, 10.0)
    assert (state.last_epoch, state.last_batches) == (4, 7) and not state.run.out_of_time
    assert sched.lr_lambdas[0].epochs == pytest.approx(3.7)


def test_the_loop_stops_the_cut_epoch_after_its_batches(tiny_split, tmp_path, monkeypatch):
    """A budget that leaves 3 batches of epoch 2: the loop trains them and stops; the learning
    rate has decayed to 0 by then."""
    from headstart.training.run import train

    steps, lrs = [], []
    real_step = loop.train_step

    def counted(net, batch, run, optimizer, scheduler):
        steps.append(1)
        out = real_step(net, batch, run, optimizer, scheduler)
        lrs.append(optimizer.param_groups[0]["lr"])
        return out

    def cut(self, epoch, seconds, val_seconds=0.0):
        if epoch == 1:  # as if the deadline left 3 batches of epoch 2
            self.last_epoch, self.last_batches, self.run.out_of_time = 2, 3, True
            reschedule(self.scheduler, self.planned_end())

    monkeypatch.setattr(loop, "train_step", counted)
    monkeypatch.setattr(loop.LoopState, "fit_budget", cut)
    r = train(tiny_split, output=tmp_path / "run", epochs=5, backbone=TINY, weights="none",
              strategy="finetune", batch_size=4, num_workers=0, cache_dir=str(tmp_path / "c"))  # fmt: skip
    per_epoch = len(steps) - 3
    assert per_epoch > 3 and [m["epoch"] for m in r.metrics] == [1, 2]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[per_epoch] > 0
    # results.json counts the cut epoch as its share of batches
    assert r.results.epochs_run == 2 and r.results.epochs_trained == pytest.approx(
        1 + 3 / per_epoch, abs=1e-4
    )


def test_the_first_epoch_stretches_the_run_where_the_deadline_leaves_time_up_to_the_plans_most(monkeypatch):
    # planned 3, the first epoch took 100 s and 900 s are left: 8 more fit, the plan allows 6 in all
    state, sched = _state(monkeypatch, now=1000.0, deadline=1900.0, epochs=3, most=6)
    state.fit_budget(1, 100.0)
    assert state.last_epoch == 6 and not state.run.out_of_time and sched.lr_lambdas[0].epochs == 6
    state, _ = _state(monkeypatch, now=1000.0, deadline=1900.0, epochs=3, most=6)
    state.fit_budget(2, 100.0)  # only the first epoch stretches (later, the learning rate is low)
    assert state.last_epoch == 3
    state, _ = _state(monkeypatch, now=1000.0, deadline=1900.0, epochs=3)  # no most: user's epochs
    state.fit_budget(1, 100.0)
    assert state.last_epoch == 3


@pytest.mark.parametrize("deadline", [None, 1340.0, 5000.0])
def test_without_a_budget_or_with_time_enough_the_plan_stands(monkeypatch, deadline):
    state, sched = _state(monkeypatch, now=1000.0, deadline=deadline)
    state.fit_budget(2, 100.0)
    assert state.last_epoch == 5 and not state.run.out_of_time and sched.lr_lambdas[0].epochs == 5


def test_mixup_blends_each_row_with_one_other_and_cutmix_pastes_a_box():
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 2, 8, 8).contiguous()
    mixed, perm, lam = mix_batch(x, 0.2, 0.0)
    assert 0 <= lam <= 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    cut, perm, lam = mix_batch(x, 0.0, 1.0)
    own = (cut == x).float().mean(dim=(1, 2, 3))  # each row keeps `lam` of its own map
    from_other = (cut == x[perm]).float().mean(dim=(1, 2, 3))
    moved = perm != torch.arange(4)
    assert torch.allclose(own[moved], torch.full_like(own[moved], lam))
    assert torch.allclose(from_other[moved], torch.full_like(own[moved], 1 - lam))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)  # what the frozen engines take
    mixed, perm, lam = mix_batch(images, 0.2, 0.0)
    assert mixed.dtype == torch.uint8
    assert (mixed.float() - (lam * images.float() + (1 - lam) * images[perm].float())).abs().max() <= 0.5
    flat = torch.randn(4, 6)  # pooled features: mixup even where cutmix is asked
    mixed, perm, lam = mix_batch(flat, 0.0, 1.0)
    assert torch.allclose(mixed, lam * flat + (1 - lam) * flat[perm])


def test_cutmix_trains_on_cached_maps_and_scores_the_larger_parts_label(tiny_split, tmp_path, monkeypatch):
    seen = []
    real = loop.mix_batch
    monkeypatch.setattr(loop, "mix_batch", lambda *a: seen.append(a[0].shape) or real(*a))
    common = dict(backbone=TINY, weights="none", strategy="finetune", cache_prefix=True, epochs=2,
                  batch_size=8, num_workers=0, lr=0.05)  # fmt: skip
    plain = headstart.train(tiny_split, output=tmp_path / "plain", **common)
    assert not seen
    mixed = headstart.train(tiny_split, output=tmp_path / "mixed", cutmix=1.0, **common)
    assert seen and all(len(s) == 4 for s in seen)  # prefix maps [B, C, H, W] were cut and pasted
    assert [r["train_loss"] for r in mixed.metrics] != [r["train_loss"] for r in plain.metrics]
    assert all(0 <= r["train_acc"] <= 1 for r in mixed.metrics)
    assert mixed.results.frozen_tensors_changed == 0


def test_mixup_trains_fine_tuning_on_images_through_the_frozen_prefix(tiny_split, tmp_path):
    options = dict(backbone=TINY, weights="none", strategy="finetune", epochs=1, batch_size=8, num_workers=0)
    result = headstart.train(tiny_split, output=tmp_path / "run", mixup=0.4, **options)
    assert result.results.prefix_split  # the live prefix path, which takes uint8 batches
    assert result.results.frozen_tensors_changed == 0
