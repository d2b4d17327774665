"""The LoRAX per-epoch LR schedule against hand-computed values (spec lorax_cddb.md 1.5)."""

from __future__ import annotations

import itertools
from functools import partial

import pytest

from genattr.engine.schedule import cosine_lr, epoch_lr, linear_scaled_lr, set_lr

EPOCHS = 50
COMMON = {"epochs": EPOCHS, "warmup_epochs": 5, "warmup_lr": 1e-4, "min_lr": 1e-5}
TASK0_LR = 6.25e-6
INCR_LR = 3.125e-5
task0 = partial(epoch_lr, base_lr=TASK0_LR, **COMMON)
incr = partial(epoch_lr, base_lr=INCR_LR, **COMMON)


def test_linear_scaling() -> None:
    assert linear_scaled_lr(1e-4, 32, 1) == pytest.approx(6.25e-6, rel=1e-12)
    assert linear_scaled_lr(5e-4, 32, 1) == pytest.approx(3.125e-5, rel=1e-12)
    assert linear_scaled_lr(1e-4, 16, 2) == pytest.approx(6.25e-6, rel=1e-12)
    with pytest.raises(ValueError):
        linear_scaled_lr(1e-4, 0, 1)


def test_task0_warmup_decreases() -> None:
    # warmup step = (6.25e-6 - 1e-4)/5 = -1.875e-5; epoch e trains at lr(max(e-1, 0))
    expected = [1e-4, 1e-4, 8.125e-5, 6.25e-5, 4.375e-5, 2.5e-5]
    assert [task0(e) for e in range(6)] == pytest.approx(expected, rel=1e-12)


def test_task0_cosine_rises_towards_min_lr() -> None:
    lrs = [task0(e) for e in range(6, EPOCHS)]
    assert all(b > a for a, b in itertools.pairwise(lrs))
    assert all(v < 1e-5 for v in lrs)
    # epoch 6 = lr(5) = 1e-5 - 1.875e-6 * (1 + cos(pi/10)) = 1e-5 - 1.875e-6 * 1.9510565
    assert task0(6) == pytest.approx(6.341769e-6, rel=1e-6)
    # epoch 16 = lr(15): cos(0.3 pi) = 0.5877853 -> 1e-5 - 1.875e-6 * 1.5877853
    assert task0(16) == pytest.approx(7.022903e-6, rel=1e-6)
    # epoch 26 = lr(25): cos(pi/2) = 0 -> 1e-5 - 1.875e-6
    assert task0(26) == pytest.approx(8.125e-6, rel=1e-9)
    # epoch 49 = lr(48): cos(0.96 pi) = -0.9921147 -> 1e-5 - 1.875e-6 * 0.0078853
    assert task0(49) == pytest.approx(9.985215e-6, rel=1e-6)


def test_incremental_tasks() -> None:
    # warmup step = (3.125e-5 - 1e-4)/5 = -1.375e-5
    expected = [1e-4, 1e-4, 8.625e-5, 7.25e-5, 5.875e-5, 4.5e-5]
    assert [incr(e) for e in range(6)] == pytest.approx(expected, rel=1e-12)
    # epoch 6 = lr(5) = 1e-5 + 1.0625e-5 * 1.9510565
    assert incr(6) == pytest.approx(3.0729975e-5, rel=1e-6)
    assert incr(26) == pytest.approx(2.0625e-5, rel=1e-9)
    lrs = [incr(e) for e in range(6, EPOCHS)]
    assert all(b < a for a, b in itertools.pairwise(lrs))
    assert lrs[-1] > 1e-5


def test_step_before_epoch_variant() -> None:
    lr = partial(task0, step_after_epoch=False)
    assert [lr(e) for e in range(5)] == pytest.approx([1e-4, 8.125e-5, 6.25e-5, 4.375e-5, 2.5e-5], rel=1e-12)
    assert lr(5) == pytest.approx(6.341769e-6, rel=1e-6)
    assert all(lr(e + 1) == task0(e + 2) for e in range(EPOCHS - 1))


def test_no_warmup() -> None:
    kw = {
        "base_lr": 1e-3,
        "epochs": 10,
        "warmup_epochs": 0,
        "warmup_lr": 1e-6,
        "min_lr": 0.0,
    }
    assert epoch_lr(0, step_after_epoch=False, **kw) == pytest.approx(1e-3)
    assert epoch_lr(0, **kw) == epoch_lr(1, **kw) == pytest.approx(1e-3)
    # lr(5) = 0.5e-3 * (1 + cos(pi/2)) = 5e-4
    assert epoch_lr(5, step_after_epoch=False, **kw) == pytest.approx(5e-4)


def test_past_the_cycle_holds_min_lr() -> None:
    assert cosine_lr(EPOCHS, base_lr=TASK0_LR, **COMMON) == 1e-5
    assert cosine_lr(EPOCHS + 7, base_lr=INCR_LR, **COMMON) == 1e-5
    with pytest.raises(ValueError):
        epoch_lr(-1, base_lr=TASK0_LR, **COMMON)


def test_set_lr() -> None:
    class Opt:
        def __init__(self) -> None:
            self.param_groups = [{"lr": 1.0}, {"lr": 2.0, "weight_decay": 0.0}]

    opt = Opt()
    set_lr(opt, 3e-5)
    assert [g["lr"] for g in opt.param_groups] == [3e-5, 3e-5]


@pytest.mark.parametrize("base_lr", [TASK0_LR, INCR_LR])
@pytest.mark.parametrize("warmup_epochs", [5, 0])
def test_matches_timm(base_lr: float, warmup_epochs: int) -> None:
    """timm 1.x still computes the old formula (k_decay=1, one cycle, no noise)."""
    torch = pytest.importorskip("torch")
    timm_sched = pytest.importorskip("timm.scheduler")
    kw = {**COMMON, "warmup_epochs": warmup_epochs}

    def make() -> tuple[torch.optim.Optimizer, object]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
        sched = timm_sched.CosineLRScheduler(
            opt,
            t_initial=EPOCHS,
            lr_min=kw["min_lr"],
            warmup_t=warmup_epochs,
            warmup_lr_init=kw["warmup_lr"],
            warmup_prefix=False,
            t_in_epochs=True,
        )
        return opt, sched

    opt, sched = make()
    for t in range(EPOCHS):
        sched.step(t)
        want = epoch_lr(t, base_lr=base_lr, step_after_epoch=False, **kw)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)

    # The original loop: train epoch e with the current LR, then scheduler.step(e).
    opt, sched = make()
    for e in range(EPOCHS):
        assert opt.param_groups[0]["lr"] == pytest.approx(epoch_lr(e, base_lr=base_lr, **kw), rel=1e-12)
        sched.step(e)
