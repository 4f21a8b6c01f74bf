"""Smoke tests of examples/reproduce.py: every subcommand at a tiny budget on fake data (a few
optimizer steps per run), checking that the tables and plots are written, that every number in
them is finite, and that a second call reuses the finished runs instead of training again."""

import csv
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)
import reproduce  # noqa: E402

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """The official python release's layout with 8 random images per file (40 train, 8 test)."""
    d = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 8).tolist()}, f)
    return str(d.parent)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A stand-in for tinyshakespeare.txt: 20,000 random characters of a 30-letter alphabet."""
    d = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz ,.\n"))
    (d / "tinyshakespeare.txt").write_text("".join(rng.choice(alphabet, 20_000)))
    return str(d)


CIFAR = ["--epochs", "1", "--batch-size", "16", "--seeds", "2", "--threads", "1"]
GPT = ["--steps", "3", "--batch-size", "2", "--eval-iters", "1", "--seeds", "2", "--threads", "1"]


def numbers(x):
    """Every number in a nested JSON value."""
    if isinstance(x, bool):
        return []
    if isinstance(x, (int, float)):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [n for v in x for n in numbers(v)] if isinstance(x, list) else []


def check_outputs(out, n_runs, pngs):
    with open(out / "results.json") as f:
        results = json.load(f)
    assert len(results) == n_runs
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == n_runs
    with open(out / "summary.json") as f:
        summary = json.load(f)
    values = numbers(summary) + numbers([{k: v for k, v in r.items() if k != "argv"} for r in results])
    assert values and all(math.isfinite(v) for v in values)
    assert (out / "summary.md").read_text().startswith("|")
    for png in pngs:
        assert (out / png).stat().st_size > 0
    return results, summary


def result_times(out):
    return {p: os.path.getmtime(p) for p in sorted(out.glob("runs/*/result.json"))}


def test_help():
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "reproduce.py"), "--help"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    for cmd in ("stacking", "mada-betas", "cifar-table", "poor-init", "all"):
        assert cmd in r.stdout


def test_stacking(tmp_path):
    out = tmp_path / "stacking"  # on scikit-learn's digits (the default task)
    argv = ["stacking", "--quick", "--out", str(out), "--lrs", "1e-3,1e-2",
            "--heights", "1,3", "--optimizers", "hyper-sgdm"] + CIFAR
    reproduce.main(argv)
    results, summary = check_outputs(out, 8, ["stacking_accuracy.png", "stacking_lr_schedules.png"])
    assert {(s["optimizer"], s["height"]) for s in summary} == {("hyper-sgdm", 1), ("hyper-sgdm", 3)}
    h1 = [r for r in results if r["height"] == 1]
    assert all(r["level1.lr"] == pytest.approx(r["lr0"], rel=1e-6) for r in h1)  # height 1 learns nothing
    assert all(r["level1.lr"] != pytest.approx(r["lr0"], rel=1e-6) for r in results if r["height"] == 3)
    # a second call finds every run done and trains nothing
    before = result_times(out)
    reproduce.main(argv)
    assert result_times(out) == before


def test_stacking_resumes_an_interrupted_sweep(tmp_path, cifar_dir):
    out = tmp_path / "stacking"
    argv = ["stacking", "--task", "cifar10", "--data-dir", cifar_dir, "--out", str(out), "--lrs", "1e-3", "--heights", "2",
            "--optimizers", "hyper-sgdm"] + CIFAR
    reproduce.main(argv)
    done, lost = sorted(out.glob("runs/*/result.json"))
    lost.unlink()  # as if the process had been killed during the second run
    kept = os.path.getmtime(done)
    reproduce.main(argv)
    assert lost.exists() and os.path.getmtime(done) == kept
    # other arguments: the runs are done again
    reproduce.main(argv[:-2] + ["--hyper-lr", "1e-3"] + argv[-2:])
    assert os.path.getmtime(done) != kept


def test_mada_betas(tmp_path, text_dir):
    out = tmp_path / "betas"
    reproduce.main(["mada-betas", "--data-dir", text_dir, "--out", str(out), "--beta1s", "0.9",
                    "--beta2s", "0.8,0.95"] + GPT)
    results, summary = check_outputs(out, 12, ["mada_betas.png"])
    assert [s["optimizer"] for s in summary] == ["adamw", "hyperadam", "mada"]
    mada = [r for r in results if r["optimizer"] == "mada"]
    assert all(0.01 <= r["level1.beta1"] <= 0.99 and 0.501 <= r["level1.beta2"] <= 0.99 for r in mada)


def test_cifar_table(tmp_path, cifar_dir):
    out = tmp_path / "table"
    reproduce.main(["cifar-table", "--data-dir", cifar_dir, "--out", str(out)] + CIFAR)
    results, summary = check_outputs(out, 2 * len(reproduce.TABLE_ROWS), ["cifar_table.png"])
    assert [s["row"] for s in summary] == list(reproduce.TABLE_ROWS)
    assert all(0 <= r["test_acc"] <= 1 for r in results)
    assert "66.12 ± 0.14" in (out / "summary.md").read_text()  # the poster's MADA number beside ours


def test_poor_init(tmp_path, text_dir):
    out = tmp_path / "poor"
    reproduce.main(["poor-init", "--data-dir", text_dir, "--out", str(out), "--poor-betas", "0.9,0.6"] + GPT)
    results, summary = check_outputs(out, 12, ["poor_init.png"])
    assert {(s["optimizer"], s["init"]) for s in summary} == {
        (o, i) for o in ("adamw", "hyperadam", "mada") for i in ("good", "poor")}
    assert "MADA⁻" in (out / "summary.md").read_text()
