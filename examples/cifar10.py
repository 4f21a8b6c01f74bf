"""CIFAR-10 with ResNet-9 or a 5-layer CNN (the models of the MADA paper's table), trained with
an optimizer that learns its own hyperparameters.

Models
  resnet9  the DAWNBench ResNet-9 (Page, myrtle.ai): conv-BN-ReLU blocks 64, 128 (+ residual),
           256, 512 (+ residual), global max-pool, linear (no bias), logits x 0.125; 6.6M parameters.
  cnn5     a plain CNN with 5 weight layers, no normalization: three 3x3 conv layers
           (32, 64, 128 channels, each followed by ReLU and 2x2 max-pool) and two linear layers
           (2048 -> 256 -> 10); 0.62M parameters.

Data (--data-dir), whichever is found there:
  - the official python release: cifar-10-batches-py/ with data_batch_1..5 and test_batch;
  - an image-folder tree train/<class>/*.jpg, test/<class>/*.jpg (e.g. ../shared/data/
    cifar10-jpg.tar.gz unpacked). Decoding takes ~15 s, so the uint8 arrays are cached in
    cifar10-uint8.npz next to the data (or in --out where that is read-only). Classes are
    interleaved (image 0 of every class, then image 1, ...) so that --subset N is balanced;
  - nothing: the official release is downloaded (where a network is reachable).
Augmentation: random crop with 4-pixel zero padding and horizontal flip, on the device.

    python examples/cifar10.py --data-dir /tmp/cifar --model cnn5 --subset 2000 --epochs 1
    python examples/cifar10.py --data-dir data/cifar10 --model resnet9 --optimizer mada --epochs 20
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import sys
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import hypergrad as hg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
CACHE = "cifar10-uint8.npz"  # the decoded image-folder tree
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ------------------------------------------------------------------------------------ data

def load_cifar10(data_dir, cache_dir):
    """(x_train, y_train, x_test, y_test): uint8 (N, 3, 32, 32) and int64 (N,) numpy arrays."""
    for d in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if os.path.exists(os.path.join(d, "data_batch_1")):
            return _load_pickles(d)
    for d in (data_dir, os.path.join(data_dir, "cifar10-jpg")):
        if os.path.isdir(os.path.join(d, "train", CLASSES[0])) or os.path.exists(os.path.join(d, CACHE)):
            return _load_image_folder(d, cache_dir)
    _download(data_dir)
    return _load_pickles(os.path.join(data_dir, "cifar-10-batches-py"))


def _load_pickles(d):
    def read(name):
        with open(os.path.join(d, name), "rb") as f:
            b = pickle.load(f, encoding="bytes")
        return np.asarray(b[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(b[b"labels"], np.int64)
    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = read("test_batch")
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), xte, yte


def _load_image_folder(d, cache_dir):
    for cache in (os.path.join(d, CACHE), os.path.join(cache_dir, CACHE)):
        if os.path.exists(cache):
            z = np.load(cache)
            return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    cache = os.path.join(d if os.access(d, os.W_OK) else cache_dir, CACHE)
    from PIL import Image
    arrays = {}
    for split in ("train", "test"):
        files = [sorted(f for f in os.listdir(os.path.join(d, split, c)) if not f.startswith(".")) for c in CLASSES]
        # (rank within class, class): interleaves the classes
        order = sorted((i, c) for c, fs in enumerate(files) for i in range(len(fs)))
        x = np.empty((len(order), 3, 32, 32), np.uint8)
        for n, (i, c) in enumerate(common.progress(order, desc=f"decoding {split}")):
            with Image.open(os.path.join(d, split, CLASSES[c], files[c][i])) as im:
                x[n] = np.asarray(im.convert("RGB").resize((32, 32))).transpose(2, 0, 1)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, np.array([c for _, c in order], np.int64)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache, **arrays)
    print(f"cached the decoded images in {cache}")
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def _download(data_dir):
    path = os.path.join(data_dir, "cifar-10-python.tar.gz")
    try:
        os.makedirs(data_dir, exist_ok=True)
        if not os.path.exists(path):
            print(f"no CIFAR-10 at {data_dir}: downloading {URL}")
            with urllib.request.urlopen(URL, timeout=60) as r, open(path + ".part", "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            os.replace(path + ".part", path)
        with open(path, "rb") as f:
            if hashlib.md5(f.read()).hexdigest() != MD5:
                raise OSError(f"{path} has the wrong checksum (a partial download?); delete it")
        with tarfile.open(path) as tar:
            tar.extractall(data_dir, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except OSError as e:  # URLError, timeouts, a read-only directory
        sys.exit(f"error: no CIFAR-10 found at --data-dir {data_dir!r} and the download of {URL} failed "
                 f"({e}).\nGive --data-dir a directory holding the python release (cifar-10-batches-py/ "
                 f"with data_batch_1..5, test_batch) or an image-folder tree (train/<class>/*.jpg, "
                 f"test/<class>/*.jpg).")


def augment(x, gen):
    """Random crop with 4-pixel zero padding and random horizontal flip of a (B, C, 32, 32) batch."""
    b, c, h, w = x.shape
    dy, dx = torch.randint(0, 9, (2, b, 1), generator=gen, device=x.device)
    flip = torch.rand(b, 1, 1, 1, generator=gen, device=x.device) < 0.5
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 8)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    x = F.pad(x, (4, 4, 4, 4)).gather(2, rows).gather(3, cols)
    return torch.where(flip, x.flip(3), x)


# ------------------------------------------------------------------------------------ models

def conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class Mul(nn.Module):
    # ResNet-9 scales its logits down: the max-pooled features are large
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x * self.weight


def resnet9():
    return nn.Sequential(
        conv_bn(3, 64),
        conv_bn(64, 128), nn.MaxPool2d(2), Residual(conv_bn(128, 128), conv_bn(128, 128)),
        conv_bn(128, 256), nn.MaxPool2d(2),
        conv_bn(256, 512), nn.MaxPool2d(2), Residual(conv_bn(512, 512), conv_bn(512, 512)),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(512, 10, bias=False), Mul(0.125))


def cnn5():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))


MODELS = {"resnet9": resnet9, "cnn5": cnn5}


# ------------------------------------------------------------------------------------ training

@torch.no_grad()
def evaluate(model, x, y, normalize, batch_size, autocast):
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(y), batch_size):
        with autocast:
            out = model(normalize(x[i:i + batch_size]))
        loss += F.cross_entropy(out.float(), y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet9", choices=MODELS)
    ap.add_argument("--data-dir", default="data/cifar10", help="see above (default data/cifar10)")
    ap.add_argument("--subset", type=int, default=None,
                    help="train on the first N training images, test on the first max(N/5, 100) test images")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/cifar10", help="directory for log.jsonl and the plots")
    common.add_optimizer_args(ap)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    xtr, ytr, xte, yte = load_cifar10(args.data_dir, args.out)
    if args.subset:
        xtr, ytr = xtr[:args.subset], ytr[:args.subset]
        xte, yte = xte[:max(args.subset // 5, 100)], yte[:max(args.subset // 5, 100)]
    # the whole (uint8) data set lives on the device: no loader processes needed
    xtr, ytr, xte, yte = (torch.from_numpy(a).to(device) for a in (xtr, ytr, xte, yte))
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def normalize(x):
        return (x.float() - mean) / std

    model = MODELS[args.model]().to(device)
    opt = common.build_optimizer(list(model.parameters()), args)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    # every level's hyperparameters and hyper-gradients after each step (level 1: its first group)
    log = hg.Recorder(opt, os.path.join(args.out, "log.jsonl"), groups="first")
    print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
          f"{len(ytr)} training / {len(yte)} test images, optimizer {args.optimizer} "
          f"({len(getattr(opt, 'levels', [opt]))} level(s)) on {device}")

    step, t0 = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(ytr), generator=gen, device=device)
        batches = common.progress(range(0, len(ytr), args.batch_size), desc=f"epoch {epoch}")
        for i in batches:
            idx = perm[i:i + args.batch_size]
            with autocast:
                out = model(normalize(augment(xtr[idx], gen)))
            loss = F.cross_entropy(out.float(), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            log.log(epoch=epoch, loss=loss)  # joins the row that the step writes
            opt.step()
            step, train_loss = step + 1, log.rows[-1]["loss"]
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{train_loss:.3f}")
        test_loss, test_acc = evaluate(model, xte, yte, normalize, 2 * args.batch_size, autocast)
        log.write(epoch=epoch, test_loss=test_loss, test_acc=test_acc, time=time.perf_counter() - t0)
        print(f"epoch {epoch}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
              f"test accuracy {test_acc:.4f}, {time.perf_counter() - t0:.0f} s")
    log.close()
    plots = common.plot(log.rows, args.out, f"CIFAR-10 {args.model}, {args.optimizer}", ("test_loss",))
    table = {"test accuracy": test_acc, "test loss": test_loss, "seconds": time.perf_counter() - t0}
    print("\n" + common.summary(log.rows, opt, table))
    print(f"\nwrote {log.path}" + "".join(f", {p}" for p in plots))
    return log.rows


if __name__ == "__main__":
    main()
