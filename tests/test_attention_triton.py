"""The Triton kernels under TRITON_INTERPRET=1 on the CPU (in a child process), at tiny sizes.

The interpreter decides at import, so the cases run in a fresh Python; each returns the kernel's
error vs an fp64 reference and the plain same-dtype implementation's (flash-attn's 2x rule, 3x
for gradients).  bf16 is excluded: the interpreter's bf16 is broken.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from effdl.attention.interpret import run_interpreted  # noqa: E402

pytestmark = pytest.mark.interpreter

CASES = (
    [dict(kind="prefill", N=N, d=d, dtype=dt, causal=c)
     for N, d in [(1, 16), (77, 40), (130, 64)] for dt in ("float32", "float16") for c in (False, True)]
    + [dict(kind="prefill", N=5, Nk=70, d=24, causal=True), dict(kind="prefill", N=70, Nk=5, d=24, causal=True),
       dict(kind="prefill", N=33, d=96, dtype="float16", batch=2, heads=1)]
    + [dict(kind="grad", N=33, d=24, dtype=dt, causal=True) for dt in ("float32", "float16")]
    # the autotuner's tile shapes on the GPU, with irregular N and d, causal and rectangular
    + [dict(kind="prefill", N=N, Nk=nk, d=d, dtype="float16", causal=c, blocks=b)
       for b in [(64, 64), (128, 64), (128, 128), (64, 32)]
       for N, nk, d, c in [(130, 130, 40, True), (200, 77, 64, True), (77, 300, 24, True), (129, 129, 16, False)]]
    + [dict(kind="decode", N=nq, Nk=L, d=80, dtype="float16", splits=s, block_n=bn)
       for nq, L, s, bn in [(1, 1000, 3, 64), (2, 4099, 5, 128), (1, 700, 2, 256)]]
    + [dict(kind="decode", N=nq, Nk=L, d=d, dtype=dt, splits=s)
       for nq, L, d, dt, s in [(1, 1, 16, "float32", 1), (1, 300, 40, "float32", 4), (3, 130, 64, "float16", 3),
                               (1, 513, 128, "float16", 7), (2, 77, 24, "float32", 100)]]
)


#: run again at the end, after every other case has churned the child's heap: same bits expected
REPEATED = [i for i, c in enumerate(CASES) if c["kind"] == "grad"] + [0, 6]


@pytest.fixture(scope="module")
def results():
    return run_interpreted(CASES + [CASES[i] for i in REPEATED])


@pytest.mark.parametrize("i", range(len(CASES)))
def test_interpreted_kernel_2x_rule(results, i):
    row = results[i]
    assert row["passed"], f"{row}: error {row['err']:.3g} vs plain {row['err_pt']:.3g}"


def test_interpreter_runs_reproduce_to_the_bit(results):
    """A once-seen 180x error in the fp32 gradient case never reproduced in 1000+ runs; a repeat in
    the same child (poisoned heap, one thread: see CHILD_ENV) must give identical bits."""
    again = results[len(CASES):]
    for i, row in zip(REPEATED, again):
        assert row["digest"] == results[i]["digest"], f"case {i} ({CASES[i]}) changed between two runs"


def test_interpreter_rejects_bf16():
    import os
    import subprocess
    import sys

    code = ("import torch, effdl.attention as a\n"
            "q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)\n"
            "try:\n    a.triton_attention(q, q, q)\nexcept TypeError as e:\n    print(json.dumps(str(e)))\n")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert "bf16" in out.stdout, out.stderr[-2000:]
