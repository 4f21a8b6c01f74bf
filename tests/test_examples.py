"""Smoke tests of examples/cifar10.py and examples/gpt2.py: a few steps on tiny data in every data
format that works offline, checking the JSONL log (finite losses, hyperparameters that moved)."""

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch

import hypergrad as hg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
SHAKESPEARE = os.path.join(SHARED, "tinyshakespeare.txt")
BPE = os.path.join(SHARED, "gpt2", "gpt2.tiktoken")

sys.path.insert(0, EXAMPLES)
import cifar10  # noqa: E402
import common  # noqa: E402
import gpt2  # noqa: E402


def env():
    # one thread per process: the tests must stay light
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def read_log(out):
    path = os.path.join(out, "log.jsonl")
    assert os.path.exists(path)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "loss" in r]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    return rows, train


def assert_moved(train, *keys):
    for k in keys:
        assert any(r[k] != train[0][k] for r in train), f"{k} never changed: {train[0][k]}"


def assert_plots(out):
    pytest.importorskip("matplotlib")
    for name in ("loss.png", "hyperparameters.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


# ------------------------------------------------------------------------------------ both

@pytest.mark.parametrize("script", ["cifar10.py", "gpt2.py"])
def test_help(script):
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--help"], capture_output=True,
                       text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--optimizer" in r.stdout and "--levels" in r.stdout and "--hyper-lr" in r.stdout


@pytest.mark.parametrize("name", common.OPTIMIZERS)
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_build_optimizer(name, levels):
    import argparse
    ap = argparse.ArgumentParser()
    common.add_optimizer_args(ap)
    args = ap.parse_args(["--optimizer", name, "--levels", str(levels)])
    model = torch.nn.Linear(3, 2)
    opt = common.build_optimizer(list(model.parameters()), args)
    hyper = name.startswith("hyper") or name == "mada"
    assert len(getattr(opt, "levels", [opt])) == (levels if hyper else 1)
    with hg.Recorder(opt, groups="first") as rec:
        hp = rec.snapshot()  # what the examples log
    assert "level1.lr" in hp and all(isinstance(v, (int, float)) for v in hp.values())
    if hyper and levels >= 2:
        assert any(k.startswith("level2.lr[") for k in hp)
        assert set(common.learned_names(opt)) >= {"level1.beta1" if name != "hyper-sgdm" else "level1.momentum"}


# ------------------------------------------------------------------------------------ CIFAR-10

def fake_pickles(root, n=8, seed=0):
    """The official python release's layout and format, with n random images per file."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def fake_image_folder(root, n_train=2, n_test=1):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in cifar10.CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i:04d}.jpg", quality=75)
    return root


def test_cifar10_pickle_loader(tmp_path):
    root = fake_pickles(tmp_path / "data")
    xtr, ytr, xte, yte = cifar10.load_cifar10(str(root), str(tmp_path / "out"))
    assert xtr.shape == (40, 3, 32, 32) and xtr.dtype == np.uint8 and ytr.shape == (40,)
    assert xte.shape == (8, 3, 32, 32) and yte.shape == (8,)
    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        b = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(xtr[8:16].reshape(8, -1), b[b"data"])  # channel-major rows
    # --data-dir may also name cifar-10-batches-py itself
    assert cifar10.load_cifar10(str(root / "cifar-10-batches-py"), str(tmp_path))[0].shape == xtr.shape


def test_cifar10_pickle_cnn5_mada(tmp_path):
    root, out = fake_pickles(tmp_path / "data"), tmp_path / "out"
    cifar10.main(["--data-dir", str(root), "--model", "cnn5", "--optimizer", "mada", "--epochs", "2",
                  "--batch-size", "16", "--out", str(out)])
    rows, train = read_log(out)
    assert len(train) == 6  # 40 images, batches of 16: 3 steps per epoch
    assert [r["epoch"] for r in rows if "test_acc" in r] == [1, 2]
    assert all(0 <= r["test_acc"] <= 1 and math.isfinite(r["test_loss"]) for r in rows if "test_acc" in r)
    assert_moved(train, "level1.beta1", "level1.beta2", "level1.gamma")
    assert train[0]["level1.lr"] == train[-1]["level1.lr"]  # MADA learns its coefficients, not lr
    assert_plots(out)


def test_cifar10_image_folder_resnet9_three_levels(tmp_path):
    root, out = fake_image_folder(tmp_path / "jpg"), tmp_path / "out"
    cifar10.main(["--data-dir", str(root), "--model", "resnet9", "--optimizer", "hyper-sgdm", "--levels", "3",
                  "--lr", "0.01", "--hyper-lr", "1e-4", "--epochs", "1", "--batch-size", "5", "--out", str(out),
                  "--compile", "off"])  # 60 tensors: half a minute of compilation for four steps
    _, train = read_log(out)
    assert len(train) == 4
    assert_moved(train, "level1.lr", "level1.momentum", "level2.lr[lr]")
    assert "level3.lr" in train[0]
    # decoded once, cached next to the data, classes interleaved so that --subset is balanced
    cache = root / "cifar10-uint8.npz"
    assert cache.exists()
    z = np.load(cache)
    assert z["x_train"].shape == (20, 3, 32, 32) and z["x_test"].shape == (10, 3, 32, 32)
    assert z["y_train"].tolist() == list(range(10)) * 2
    shutil.rmtree(root / "train")  # the cache alone is enough now
    assert cifar10.load_cifar10(str(root), str(out))[1].tolist() == list(range(10)) * 2


def test_cifar10_subset(tmp_path):
    root, out = fake_pickles(tmp_path / "data", n=40), tmp_path / "out"
    rows = cifar10.main(["--data-dir", str(root), "--model", "cnn5", "--optimizer", "adamw", "--subset", "24",
                         "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    assert len([r for r in rows if "loss" in r]) == 3


def test_cifar10_download_failure_is_clear(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(cifar10.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        cifar10.main(["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "no CIFAR-10 found" in str(e.value) and "no network in this test" in str(e.value)


def test_augment_is_a_padded_crop_or_its_mirror():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(8 * 3 * 32 * 32, dtype=torch.float32).view(8, 3, 32, 32) + 1
    y = cifar10.augment(x, gen)
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(8):
        windows = [xp[b, :, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(y[b], w) or torch.equal(y[b], w.flip(2)) for w in windows)


# ------------------------------------------------------------------------------------ GPT-2

TINY = ["--config", "tiny", "--batch-size", "4", "--eval-every", "2", "--eval-iters", "2"]


def test_gpt2_shakespeare_char(tmp_path):
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} is absent")
    out = tmp_path / "out"
    gpt2.main(TINY + ["--data", "shakespeare-char", "--data-dir", SHARED, "--optimizer", "mada", "--steps", "3",
                      "--out", str(out)])
    rows, train = read_log(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    assert_moved(train, "level1.beta1", "level1.beta2")
    assert_plots(out)


def test_gpt2_shakespeare_bpe(tmp_path):
    if not (os.path.exists(SHAKESPEARE) and os.path.exists(BPE)):
        pytest.skip(f"{SHAKESPEARE} or {BPE} is absent")
    pytest.importorskip("tiktoken")
    out = tmp_path / "out"
    gpt2.main(TINY + ["--data", "shakespeare-bpe", "--data-dir", SHARED, "--bpe-file", BPE,
                      "--optimizer", "hyperadam", "--steps", "3", "--out", str(out)])
    _, train = read_log(out)
    assert 9 < train[0]["loss"] < 12  # ~ log(50304) at initialization: GPT-2's vocabulary
    assert_moved(train, "level1.beta1")


def write_memmap(d, vocab=50257, seed=0):
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", 20_000), ("val", 2_000)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(d / f"{split}.bin")
    return d


def test_gpt2_memmap_grad_accum_three_levels(tmp_path):
    d, out = write_memmap(tmp_path / "owt"), tmp_path / "out"
    gpt2.main(TINY + ["--data", "memmap", "--data-dir", str(d), "--optimizer", "hyper-adam", "--levels", "3",
                      "--grad-accum", "2", "--weight-decay", "0.1", "--steps", "3", "--out", str(out)])
    _, train = read_log(out)
    assert_moved(train, "level1.lr", "level1.beta1", "level2.lr[lr]")
    assert train[0]["level1.weight_decay"] == pytest.approx(0.1)
    with open(out / "config.json") as f:
        assert json.load(f)["model"]["vocab_size"] == 50304


def test_gpt2_memmap_meta_vocab(tmp_path):
    d, out = write_memmap(tmp_path / "chars", vocab=65), tmp_path / "out"
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65}, f)
    rows = gpt2.main(TINY + ["--data", "memmap", "--data-dir", str(d), "--optimizer", "adam", "--steps", "2",
                             "--out", str(out)])
    assert rows[0]["loss"] == pytest.approx(math.log(65), abs=0.3)


def test_gpt2_torchrun_ddp(tmp_path):
    d, out = write_memmap(tmp_path / "owt", vocab=65), tmp_path / "out"
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65}, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(EXAMPLES, "gpt2.py")] + TINY + [
        "--data", "memmap", "--data-dir", str(d), "--optimizer", "hyper-adam", "--steps", "3", "--grad-accum", "2",
        "--out", str(out), "--compile", "off"]  # two ranks compiling kernels on two cores: slow, tested elsewhere
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows, train = read_log(out)
    assert len(train) == 3  # rank 0 alone writes the log
    assert_moved(train, "level1.lr")
    with open(out / "config.json") as f:
        assert json.load(f)["world_size"] == 2
