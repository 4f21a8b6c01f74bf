"""Learning-rate schedules on top of a learned lr.

A torch scheduler writes the lr of each param group. Schedulers that compute the new lr from the
current one (StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, LinearLR, MultiplicativeLR,
ReduceLROnPlateau, ...) then scale the learned lr directly: nothing else is needed. Schedulers
that compute it from their initial values (LambdaLR, OneCycleLR, CyclicLR,
CosineAnnealingWarmRestarts, SequentialLR around them) would overwrite the learned value at
every step; :func:`scale_schedule` makes them scale it instead.
"""

from __future__ import annotations

import torch

__all__ = ["scale_schedule", "ScaledSchedule"]


def scale_schedule(scheduler) -> "ScaledSchedule":
    """Make ``scheduler`` scale the learned lr instead of overwriting it.

    The scheduler runs on a shadow copy of each group's lr; the optimizer's lr becomes
    ``schedule value x multiplier``, where the multiplier starts at 1 and absorbs what the hyper
    level learns between scheduler steps (``lr / schedule value``; kept unchanged while the
    schedule is at 0). Without a hyper level, the lrs are exactly the scheduler's.

    >>> opt = hg.AdamW(model.parameters(), lr=1e-3, hyper=hg.SGD(lr=1e-5))
    >>> sched = hg.scale_schedule(torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=1000,
    ...                                                               cycle_momentum=False))
    """
    return ScaledSchedule(scheduler)


class ScaledSchedule:
    """See :func:`scale_schedule`. Forwards everything else to the wrapped scheduler."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer
        # the scheduler's own values (its constructor has already written the first ones)
        self._shadow = [float(g["lr"]) for g in self.optimizer.param_groups]
        self._mult = [1.0] * len(self._shadow)

    def step(self, *args, **kwargs):
        groups = self.optimizer.param_groups
        learned = [g["lr"] for g in groups]
        for i, g in enumerate(groups):  # what the hyper level did since the last step
            if self._shadow[i] > 0:
                self._mult[i] = float(learned[i]) / self._shadow[i]
            g["lr"] = self._shadow[i]
        try:
            self.scheduler.step(*args, **kwargs)
        finally:
            for i, g in enumerate(groups):
                self._shadow[i] = float(g["lr"])
                value = self._shadow[i] * self._mult[i]
                if isinstance(learned[i], torch.Tensor):
                    learned[i].fill_(value)  # in place: the optimizer takes it in at its next step
                    g["lr"] = learned[i]
                else:
                    g["lr"] = value

    def get_last_lr(self):
        """The optimizer's lrs (schedule x multiplier) as last set."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"scheduler": self.scheduler.state_dict(), "shadow": list(self._shadow), "mult": list(self._mult)}

    def load_state_dict(self, state_dict):
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self._shadow = list(state_dict["shadow"])
        self._mult = list(state_dict["mult"])

    def __getattr__(self, name):
        return getattr(self.scheduler, name)
