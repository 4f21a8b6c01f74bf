"""Smoke tests of the benchmark scripts (slow: they compile kernels and time real steps; run with
``-m slow``): they run end to end on small sizes and write the rows docs/benchmarks.md reads.
No assertion is on a time; only that every row is there, finite and consistent."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

pytestmark = pytest.mark.slow


def run(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


STEP_ROWS = {
    "step": {"torch fused=True", "torch foreach=True", "torch foreach=False", "hyper-Adam, eager",
             "hyper-Adam, compile=True", "hyper-Adam, one_pass=True",
             "hyper-Adam, one_pass, skip_nonfinite=False", "hg.Adam (nothing learned), compile=True"},
    "stack": {"torch fused=True", "torch foreach=True", "torch foreach=False",
              "3-level stack, compile=True", "3-level stack, one_pass=True"},
    "mada": {"torch fused=True", "torch foreach=True", "torch foreach=False",
             "MADA (nothing learned), compile=True", "MADA (6 coefficients), compile=True",
             "MADA (6 coefficients), one_pass=True", "MADA (6), one_pass, skip_nonfinite=False"},
}


def test_run_step_sections(tmp_path):
    out = tmp_path / "r.json"
    run("run.py", "--only", "step", "stack", "mada", "--sizes", "1e4", "--threads", "1",
        "--repeats", "1", "--inner", "1", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu"
    for section, names in STEP_ROWS.items():
        rows = {r["name"]: r for r in data["results"] if r["section"] == section}
        assert set(rows) == names, section
        base = {r["baseline"] for r in rows.values()}
        assert len(base) == 1, section
        (base,) = base
        # the baseline is the fastest torch row, and every ratio is against it
        torch_rows = [r for r in rows.values() if r["name"].startswith("torch")]
        assert min(torch_rows, key=lambda r: r["value"])["name"] == base
        for r in rows.values():
            assert r["unit"] == "ms/step" and r["params"] == 10_000 and r["threads"] == 1
            assert math.isfinite(r["value"]) and r["value"] > 0
            assert r["ratio"] == pytest.approx(r["value"] / rows[base]["value"], rel=1e-9)


@pytest.mark.parametrize("cold", [False, True])
def test_kernels_fixed(cold):
    text = run("kernels.py", "--fixed", "--sizes", "2048", "--rounds", "1", *(["--cold"] if cold else []))
    head = [line for line in text.splitlines() if line.startswith("whole steps")]
    assert len(head) == 1 and head[0].startswith("whole steps, 2,048 parameters")
    assert ("caches emptied before each step" in head[0]) == cold
    assert ("rounds of 20)" if cold else "rounds of 100)") in head[0]
    rows = dict(re.findall(r"^  (\S.*?)\s+(\d+\.\d+)$", text, re.M))
    assert set(rows) == {"1-level one-pass, skip_nonfinite=False", "1-level one-pass", "1-level paper order",
                         "3-level one-pass", "3-level paper order", "MADA one-pass", "torch Adam fused"}
    assert all(float(v) > 0 for v in rows.values())
