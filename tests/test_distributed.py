"""torch.distributed: two processes on this machine (gloo, loopback).

- DDP: gradients are averaged before the optimizer sees them, so the hyper-gradients (dot
  products of averaged gradients with the optimizer's own, identical, state) are identical on
  every rank without any communication: hyperparameters agree on every rank after every step,
  and with a single process that sees the combined batch.
- ZeroRedundancyOptimizer: each rank steps only its shard, so its hyper-gradients are partial
  sums: ``shard_group=`` all-reduces them; the hyperparameters then agree with the unsharded run.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hypergrad as hg  # noqa: E402
from helpers import MLP, batch  # noqa: E402
from parameterized import MADA  # noqa: E402

WORLD = 2
STEPS = 6

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


def _make(name, params, **kw):
    if name == "Adam":
        return hg.Adam(params, lr=1e-2, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-7)), **kw)
    return MADA(params, lr=1e-2, beta3=0.1, c=0.5, rho=0.5, gamma=0.5, hyper=hg.SGD(lr=1e-3), **kw)


def _flat_hypers(opt):
    vals = []
    for lvl in opt.levels:
        for gi in range(len(lvl.param_groups)):
            vals.extend(float(v) for v in lvl.hyperparameters(gi).values())
    return torch.tensor(vals, dtype=torch.float64)


def _combined(t):
    """The batch of step t, 8 rows per rank."""
    return batch(t, n=8 * WORLD)


def _single_process(name):
    model = MLP()
    opt = _make(name, model.parameters())
    out = []
    for t in range(1, STEPS + 1):
        x, y = _combined(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        out.append(_flat_hypers(opt))
    return torch.stack(out), [p.detach().clone() for p in model.parameters()]


def _worker(name, mode, path):
    """One rank (run by torch.distributed.run: ``python tests/test_distributed.py NAME MODE DIR``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        model = MLP()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        if mode == "ddp":
            opt = _make(name, ddp.parameters())
            hyper_of = opt
        else:  # ZeRO: each rank owns a shard of the parameters and their optimizer state
            from torch.distributed.optim import ZeroRedundancyOptimizer
            kw = dict(lr=1e-2, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-7)))
            if mode == "zero":
                kw["shard_group"] = True
            opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=hg.Adam, **kw)
            hyper_of = opt.optim
        hist = []
        for t in range(1, STEPS + 1):
            x, y = _combined(t)
            x, y = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]
            opt.zero_grad()
            ((ddp(x) - y) ** 2).mean().backward()
            opt.step()
            hist.append(_flat_hypers(hyper_of))
        hist = torch.stack(hist)
        gathered = [torch.zeros_like(hist) for _ in range(WORLD)]
        dist.all_gather(gathered, hist)
        if rank == 0:
            torch.save({"hist": gathered, "params": [p.detach().clone() for p in model.parameters()],
                        "shard_sizes": sum(p.numel() for g in hyper_of.param_groups for p in g["params"])},
                       os.path.join(path, "result.pt"))
        dist.barrier()
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Tearing down DDP's reducer and the process group can deadlock (a gloo thread waits for the
    # GIL to release a tensor of a finished collective while the main thread joins it): the
    # results are on disk, so leave without running destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(name, mode, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           os.path.abspath(__file__), name, mode, str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(tmp_path / "result.pt")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(*sys.argv[1:4])


@pytest.mark.parametrize("name", ["Adam", "MADA"])
def test_ddp_hyperparameters_agree_on_every_rank_and_with_one_process(name, tmp_path):
    res = _spawn(name, "ddp", tmp_path)
    h0, h1 = res["hist"]
    assert torch.equal(h0, h1), "the ranks' hyperparameters differ"
    single, params = _single_process(name)
    torch.testing.assert_close(h0, single, rtol=1e-6, atol=1e-12)
    for a, b in zip(res["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert not torch.equal(single[0], single[-1]), "nothing was learned"


def test_zero_sharded_state_all_reduces_the_hyper_gradients(tmp_path):
    res = _spawn("Adam", "zero", tmp_path)
    h0, h1 = res["hist"]
    assert 0 < res["shard_sizes"] < sum(p.numel() for p in MLP().parameters()), "rank 0 held a shard, not all"
    assert torch.equal(h0, h1)
    single, params = _single_process("Adam")
    torch.testing.assert_close(h0, single, rtol=1e-6, atol=1e-12)
    for a, b in zip(res["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_zero_without_shard_group_learns_from_partial_sums(tmp_path):
    """Why shard_group exists: without it each rank learns from its own shard's partial sums."""
    res = _spawn("Adam", "zero-unsynced", tmp_path)
    h0, h1 = res["hist"]
    assert not torch.equal(h0, h1)
