"""A GPT-2 language model (nanoGPT-like) trained with an optimizer that learns its own
hyperparameters: from a small char-level Shakespeare model to the 124M GPT-2.

Configs (--config): tiny (2 layers, 2 heads, 64 wide, block 64; smoke tests and CPU),
shakespeare-char (6/6/384, block 256, dropout 0.2, as nanoGPT's), gpt2 (12/12/768, block 1024:
the 124M GPT-2).

Data (--data):
  shakespeare-char  Tiny Shakespeare, one token per character; --data-dir holds (or receives,
                    where a network is reachable) tinyshakespeare.txt (or input.txt)
  shakespeare-bpe   the same text in GPT-2 BPE tokens (tiktoken); --bpe-file gives the ranks
                    file (gpt2.tiktoken) for use offline
  memmap            --data-dir holds train.bin and val.bin of uint16 tokens, as nanoGPT's
                    prepare.py writes them (OpenWebText), and optionally meta.pkl with vocab_size
The text data are split 90% / 10% into train / validation.

Multi-process: torchrun --standalone --nproc_per_node 8 examples/gpt2.py ... (DDP; each rank
samples its own batches; the hyperparameters stay equal on every rank because they are
learned from the all-reduced gradients).

    python examples/gpt2.py --config tiny --steps 50 --data-dir ../shared/data
    python examples/gpt2.py --config shakespeare-char --device cuda --steps 5000
    torchrun --standalone --nproc_per_node 8 examples/gpt2.py --config gpt2 --data memmap \\
        --data-dir data/openwebtext --batch-size 12 --grad-accum 5 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import sys
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import hypergrad as hg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class Config:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float
    batch_size: int  # per process and micro-step
    lr: float  # of the Adam-like optimizers
    vocab_size: int = 0  # from the data


CONFIGS = {
    "tiny": Config(2, 2, 64, 64, 0.0, batch_size=16, lr=1e-3),
    "shakespeare-char": Config(6, 6, 384, 256, 0.2, batch_size=64, lr=1e-3),
    "gpt2": Config(12, 12, 768, 1024, 0.0, batch_size=12, lr=6e-4),
}


# ------------------------------------------------------------------------------------ model

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * c.n_embd, c.n_embd), nn.Dropout(c.dropout))
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_size = c.block_size
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's init: N(0, 0.02), residual projections scaled down by depth
                residual = name.endswith(("c_proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer) if residual else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------------------------ data

def read_shakespeare(data_dir):
    for name in ("tinyshakespeare.txt", "input.txt"):
        if os.path.exists(path := os.path.join(data_dir, name)):
            with open(path, encoding="utf-8") as f:
                return f.read()
    path = os.path.join(data_dir, "tinyshakespeare.txt")
    try:
        print(f"no tinyshakespeare.txt in {data_dir}: downloading {SHAKESPEARE_URL}")
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as r:
            text = r.read().decode("utf-8")
        os.makedirs(data_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return text
    except OSError as e:
        sys.exit(f"error: no tinyshakespeare.txt (or input.txt) in --data-dir {data_dir!r} and the "
                 f"download of {SHAKESPEARE_URL} failed ({e})")


def gpt2_encoding(bpe_file):
    import tiktoken
    if bpe_file is None:
        try:
            return tiktoken.get_encoding("gpt2")  # downloads the ranks once, then caches them
        except Exception as e:  # tiktoken raises its HTTP client's errors
            sys.exit(f"error: tiktoken could not fetch the GPT-2 BPE ranks ({e}); give the file with --bpe-file")
    from tiktoken.load import load_tiktoken_bpe
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(bpe_file),
                             special_tokens={"<|endoftext|>": 50256})


def load_data(args):
    """(train tokens, val tokens, vocab size): 1-D uint16 arrays (np.memmap for --data memmap)."""
    if args.data == "memmap":
        train, val = (np.memmap(os.path.join(args.data_dir, f"{s}.bin"), dtype=np.uint16, mode="r")
                      for s in ("train", "val"))
        vocab = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT, for speed
        if os.path.exists(meta := os.path.join(args.data_dir, "meta.pkl")):
            with open(meta, "rb") as f:
                vocab = pickle.load(f)["vocab_size"]
        return train, val, vocab
    text = read_shakespeare(args.data_dir)
    if args.data == "shakespeare-char":
        chars = sorted(set(text))
        lut = {ch: i for i, ch in enumerate(chars)}
        tokens, vocab = np.array([lut[ch] for ch in text], dtype=np.uint16), len(chars)
    else:
        tokens, vocab = np.array(gpt2_encoding(args.bpe_file).encode_ordinary(text), dtype=np.uint16), 50304
    n = int(0.9 * len(tokens))
    return tokens[:n], tokens[n:], vocab


def get_batch(data, batch_size, block_size, gen, device):
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen).tolist()
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


# ------------------------------------------------------------------------------------ training

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="shakespeare-char", choices=CONFIGS)
    ap.add_argument("--data", default="shakespeare-char",
                    choices=("shakespeare-char", "shakespeare-bpe", "memmap"))
    ap.add_argument("--data-dir", default="data", help="see above (default data/)")
    ap.add_argument("--bpe-file", default=None,
                    help="GPT-2 BPE ranks file (gpt2.tiktoken) for shakespeare-bpe (default: tiktoken's own)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per process and micro-step "
                    "(default: the config's)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between validation losses")
    ap.add_argument("--eval-iters", type=int, default=20, help="batches per validation loss")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/gpt2", help="directory for log.jsonl and the plots")
    common.add_optimizer_args(ap)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    batch_size = args.batch_size or cfg.batch_size

    # torchrun sets these; a plain `python` run is one process
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    torch.manual_seed(args.seed)  # the same initial model on every rank
    gen = torch.Generator().manual_seed(args.seed + 1000 * rank)  # different batches on every rank

    train, val, vocab = load_data(args)
    cfg = Config(**{**vars(cfg), "vocab_size": vocab})
    model = GPT(cfg).to(device)
    raw_model = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    # as nanoGPT: weight decay on the matrices only, not on biases, LayerNorms
    params = list(raw_model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = common.build_optimizer(groups, args, adam_lr=cfg.lr)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    @torch.no_grad()
    def val_loss():
        raw_model.eval()
        g = torch.Generator().manual_seed(10_000 + rank)  # the same batches at every evaluation
        losses = torch.zeros(args.eval_iters, device=device)
        for i in range(args.eval_iters):
            x, y = get_batch(val, batch_size, cfg.block_size, g, device)
            with autocast:
                losses[i] = raw_model(x, y)
        raw_model.train()
        loss = losses.mean()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        return loss.item()

    # every level's hyperparameters and hyper-gradients after each step (level 1: its first
    # group), written by rank 0 only (they are the same on every rank)
    log = hg.Recorder(opt, os.path.join(args.out, "log.jsonl"), groups="first", enabled=master)
    if master:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({**vars(args), "model": vars(cfg), "world_size": world}, f, indent=1)
        print(f"GPT {args.config} ({sum(p.numel() for p in params) / 1e6:.2f}M parameters, vocab {vocab}), "
              f"{len(train):,} train / {len(val):,} val tokens, {world} process(es) x {batch_size} x "
              f"{args.grad_accum} sequences of {cfg.block_size} per step, optimizer {args.optimizer} "
              f"({len(getattr(opt, 'levels', [opt]))} level(s)) on {device}")

    t0 = time.perf_counter()
    bar = common.progress(range(1, args.steps + 1), enabled=master, desc="training")
    for step in bar:
        loss = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = get_batch(train, batch_size, cfg.block_size, gen, device)
            # all-reduce the gradients once per step, at the last micro-step
            sync = micro == args.grad_accum - 1 or world == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast:
                    micro_loss = model(x, y) / args.grad_accum
                micro_loss.backward()
            loss += micro_loss.detach()
        log.log(loss=loss, time=time.perf_counter() - t0)  # joins the row that the step writes
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_loss = log.rows[-1]["loss"] if master else None
        if step % args.eval_every == 0 or step == args.steps:
            vl = val_loss()  # every rank takes part (an all-reduce)
            log.write(val_loss=vl)
            if master:
                common.say(f"step {step}: train loss {train_loss:.4f}, val loss {vl:.4f}")
        if hasattr(bar, "set_postfix") and master:
            bar.set_postfix(loss=f"{train_loss:.3f}")
    log.close()
    if master:
        plots = common.plot(log.rows, args.out, f"GPT {args.config} on {args.data}, {args.optimizer}")
        last = [r for r in log.rows if "loss" in r][-1]
        table = {"train loss": last["loss"], "val loss": log.rows[-1]["val_loss"],
                 "seconds": time.perf_counter() - t0}
        print("\n" + common.summary(log.rows, opt, table))
        print(f"\nwrote {log.path}" + "".join(f", {p}" for p in plots))
    if world > 1:
        # DDP's reducer holds the process group: freed after it, at exit, it can deadlock (a gloo
        # thread waits for the GIL while the main thread joins it); release it first
        dist.barrier()
        model = None  # noqa: F841
        dist.destroy_process_group()
    return log.rows


if __name__ == "__main__":
    main()
