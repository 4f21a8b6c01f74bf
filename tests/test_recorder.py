"""hg.Recorder (every level's hyperparameters and hyper-gradients per step, to JSONL/CSV and
TensorBoard) and hg.plot_trajectories."""

import json
import math

import pytest
import torch

import hypergrad as hg
from helpers import MLP, batch, loss_at
from parameterized import MADA


def three_levels(model):
    return hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4, momentum=0.5, hyper=hg.SGD(lr=1e-7)))


def run(model, opt, rec, steps, expected=None):
    """Train, logging the loss before each step; returns what the optimizer reported after each."""
    seen = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss = loss_at(model, t)
        loss.backward()
        rec.log(loss=loss, epoch=1)
        opt.step()
        row = {"loss": loss.item()}
        for k, lvl in enumerate(opt.levels, 1):
            for n, v in lvl.hyperparameters().items():
                row[f"level{k}.{n}"] = float(v)
            if lvl.hyper is not None:
                for n, g in lvl.hypergradients().items():
                    if g is not None:
                        row[f"level{k}.{n}.hypergrad"] = float(g)
        seen.append(row)
    return seen


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_rows_hold_every_level_at_every_step(tmp_path, suffix):
    model = MLP()
    opt = three_levels(model)
    path = tmp_path / f"hyper.{suffix}"
    with hg.Recorder(opt, path) as rec:
        seen = run(model, opt, rec, 6)
        rec.write(val_loss=torch.tensor(0.5, dtype=torch.float64))
    rows = hg.read_log(path)
    assert rows == rec.rows
    train, evals = rows[:6], rows[6:]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert evals == [{"step": 6, "val_loss": 0.5}]
    for r, s in zip(train, seen):
        assert r["epoch"] == 1
        for k, v in s.items():  # the values after that step, bit for bit (float64 parameters)
            assert r[k] == v, k
        assert {"level2.lr", "level3.lr"} <= set(r)
        assert r["steps_skipped"] == 0 and r["level1.hyper_steps_skipped"] == 0
    assert "level1.lr.hypergrad" not in train[0]  # no hyper-gradient before the second step
    assert {"level1.lr.hypergrad", "level1.beta2.hypergrad"} <= set(train[1])
    assert "level2.lr.hypergrad" not in train[1] and "level2.lr.hypergrad" in train[2]
    assert train[-1]["level1.lr"] != train[0]["level1.lr"]


def test_jsonl_is_written_as_it_goes(tmp_path):
    """A crashed run keeps the rows of the steps it took."""
    model = MLP()
    opt = three_levels(model)
    rec = hg.Recorder(opt, tmp_path / "h.jsonl")
    run(model, opt, rec, 3)
    lines = (tmp_path / "h.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    rec.close()


def test_every_and_close(tmp_path):
    model = MLP()
    opt = three_levels(model)
    rec = hg.Recorder(opt, every=2, hypergradients=False)
    run(model, opt, rec, 5)
    assert [r["step"] for r in rec.rows] == [2, 4]
    assert not any(k.endswith(".hypergrad") for r in rec.rows for k in r)
    rec.close()
    run(model, opt, rec, 2)  # the hook is gone
    assert len(rec.rows) == 2


def test_disabled_records_nothing(tmp_path):
    model = MLP()
    opt = three_levels(model)
    rec = hg.Recorder(opt, tmp_path / "h.jsonl", enabled=False)
    run(model, opt, rec, 2)
    rec.write(val_loss=1.0)
    rec.close()
    assert rec.rows == [] and not (tmp_path / "h.jsonl").exists()


def test_param_groups_are_tagged_and_hyper_groups_named():
    model = MLP()
    opt = MADA([{"params": [model.w1, model.w2]}, {"params": [model.b1, model.b2], "weight_decay": 0.0}],
               lr=1e-2, weight_decay=0.1, hyper=hg.SGD(lr=0.1, per_name={"beta1": 5e-4, "beta2": 5e-4}))
    rec = hg.Recorder(opt)
    run(model, opt, rec, 3)
    r = rec.rows[-1]
    assert r["level1.weight_decay"] == pytest.approx(0.1) and r["level1.weight_decay[g1]"] == 0.0
    assert r["level1.gamma"] == float(opt.hyperparameters(0)["gamma"])
    assert r["level1.gamma[g1]"] == float(opt.hyperparameters(1)["gamma"])
    assert r["level2.lr[beta1]"] == pytest.approx(5e-4) and r["level2.lr[beta3+c+rho+gamma]"] == pytest.approx(0.1)
    rec_first = hg.Recorder(opt, groups="first")
    run(model, opt, rec_first, 1)
    assert not any("[g1]" in k for k in rec_first.rows[0])


@pytest.mark.parametrize("scope", ["tensor", "element"])
def test_many_valued_scopes_give_mean_min_max(scope):
    model = MLP()
    opt = hg.SGD(model.parameters(), lr=1e-2, momentum=0.9, hyper=hg.SGD(lr=1e-3), scope=scope)
    rec = hg.Recorder(opt)
    run_ = [None]
    for t in range(1, 4):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()
        run_[0] = opt.hyperparameters()["lr"]
    values = torch.cat([v.reshape(-1) for v in run_[0]])
    r = rec.rows[-1]
    assert r["level1.lr.mean"] == pytest.approx(float(values.mean()), rel=1e-12)
    assert r["level1.lr.min"] == float(values.min()) and r["level1.lr.max"] == float(values.max())
    assert r["level1.lr.min"] < r["level1.lr.max"]  # they did learn apart
    assert "level1.lr.hypergrad.mean" in r


def test_torch_optimizer_and_wrapped_optimizer():
    model = MLP()
    base = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    rec = hg.Recorder(base)
    run_plain(model, base, 2)
    assert rec.rows[-1]["level1.lr"] == 1e-3 and rec.rows[-1]["level1.beta2"] == 0.9
    model = MLP()
    opt = hg.wrap(torch.optim.SGD(model.parameters(), lr=1e-2), hyper=hg.SGD(lr=1e-3))
    rec = hg.Recorder(opt)
    run_plain(model, opt, 3)
    assert [r["step"] for r in rec.rows] == [1, 2, 3]
    assert rec.rows[-1]["level1.lr"] == float(opt.hyperparameters()["lr"]) != 1e-2
    assert rec.rows[-1]["level1.lr.hypergrad"] == float(opt.hypergradients()["lr"])


def run_plain(model, opt, steps):
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()


def test_skipped_steps_are_visible():
    model = MLP()
    opt = three_levels(model)
    rec = hg.Recorder(opt)
    run_plain(model, opt, 2)
    opt.zero_grad()
    loss_at(model, 3).backward()
    model.w1.grad[0, 0] = math.inf
    opt.step()
    assert [r["steps_skipped"] for r in rec.rows] == [0, 0, 1]


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def flush(self):
        pass


def test_tensorboard_writer_gets_every_number():
    model = MLP()
    opt = three_levels(model)
    w = FakeWriter()
    rec = hg.Recorder(opt, tensorboard=w)
    run(model, opt, rec, 3)
    rec.write(val_loss=0.25, note="text is not a scalar")
    rec.close()
    assert ("level2.lr", rec.rows[2]["level2.lr"], 3) in w.calls
    assert ("loss", rec.rows[0]["loss"], 1) in w.calls and ("val_loss", 0.25, 3) in w.calls
    assert not any(tag in ("step", "note") for tag, _, _ in w.calls)


def test_tensorboard_directory(tmp_path):
    pytest.importorskip("tensorboard")
    model = MLP()
    opt = three_levels(model)
    rec = hg.Recorder(opt, tensorboard=str(tmp_path / "tb"))
    run(model, opt, rec, 2)
    rec.close()
    assert any((tmp_path / "tb").iterdir())


def test_bad_arguments():
    opt = three_levels(MLP())
    with pytest.raises(ValueError, match="every must be a positive integer"):
        hg.Recorder(opt, every=0)
    with pytest.raises(ValueError, match=r"path must end in .jsonl or .csv"):
        hg.Recorder(opt, "log.txt")
    with pytest.raises(ValueError, match="groups must be"):
        hg.Recorder(opt, groups="some")
    with pytest.raises(TypeError, match="tensorboard must be a SummaryWriter"):
        hg.Recorder(opt, tensorboard=3)
    with pytest.raises(TypeError, match="register_step_post_hook"):
        hg.Recorder(object())
    rec = hg.Recorder(opt)
    rec.log(x=torch.ones(2))
    with pytest.raises(ValueError, match="'x' has 2 elements"):
        run_plain(MLP(), opt, 1)


def test_plot_trajectories(tmp_path):
    pytest.importorskip("matplotlib")
    model = MLP()
    opt = three_levels(model)
    with hg.Recorder(opt, tmp_path / "h.jsonl") as rec:
        run(model, opt, rec, 5)
    fig = hg.plot_trajectories(tmp_path / "h.jsonl", tmp_path / "h.png", hypergradients=True)
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert "level1.lr" in titles and "level1.lr.hypergrad" in titles and "level2.lr" in titles
    assert "level3.lr" not in titles  # unchanged values are left out
    assert "level1.eps" not in titles
    assert (tmp_path / "h.png").stat().st_size > 1000
    fig = hg.plot_trajectories(rec.rows, keys=["level1.beta1"])
    assert [ax.get_title() for ax in fig.axes] == ["level1.beta1"]
    with pytest.raises(ValueError, match="no row has 'level9.lr'"):
        hg.plot_trajectories(rec.rows, keys=["level9.lr"])
    with pytest.raises(ValueError, match="no rows with hyperparameters"):
        hg.plot_trajectories([{"step": 1, "loss": 1.0}])
