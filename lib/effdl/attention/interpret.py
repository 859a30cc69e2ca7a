"""Run the Triton kernels on the CPU under ``TRITON_INTERPRET=1``, in a child process.

Triton decides at import time whether kernels are compiled or interpreted, and this process may
already have imported it (the device report does), so the interpreter runs in a fresh Python.
:func:`run_interpreted` sends it a list of cases and gets back one row per case with the kernel's
error against an fp64 reference next to the plain same-dtype implementation's error (the 2x rule).

    python -m effdl.attention.interpret '[{"kind": "prefill", "N": 77, "d": 40}]'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

#: The child's environment.  The interpreter runs the grid one program at a time; fixing every
#: thread pool at one thread and poisoning glibc's heap (``MALLOC_PERTURB_``: fresh and freed
#: blocks are filled with a byte pattern) make a run reproducible to the bit and turn a read of
#: uninitialised memory into a failure on every run instead of a rare one.
CHILD_ENV = {"TRITON_INTERPRET": "1", "MALLOC_PERTURB_": "165", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def run_interpreted(cases: list[dict], timeout: float = 900) -> list[dict]:
    """Evaluate ``cases`` with the Triton interpreter in a subprocess; see :func:`_run_case` for keys."""
    env = {**os.environ, **CHILD_ENV}
    proc = subprocess.run([sys.executable, "-m", "effdl.attention.interpret", json.dumps(cases)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the Triton interpreter run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _digest(*tensors) -> str:
    """A hash of the results' bytes: two runs of one case must agree to the bit."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_case(case: dict) -> dict:
    """Keys: kind ("prefill" | "grad" | "decode"), N (queries), Nk (keys, default N), d,
    dtype ("float32" | "float16"), causal, batch, heads, kv_heads (decode: grouped K/V, default
    heads), splits (decode), blocks (prefill tile shape; grad: the backward's (outer, inner) tiles),
    block_n (decode tile).

    A grad row also has ``grad_errs`` / ``grad_errs_pt`` (dq, dk, dv), ``backward`` (the path
    ``backward_path`` chooses for this d) and ``wired`` (autograd's gradients are, to the bit, those
    of calling the Triton backward directly: autograd did take the Triton path)."""
    import torch

    from effdl.accuracy import within_baseline
    from effdl.attention.decode import decode_attention
    from effdl.attention.triton_kernels import triton_attention
    from effdl.reference import naive_attention

    kind, N, d = case["kind"], case["N"], case["d"]
    nk = case.get("Nk", N)
    dt = getattr(torch, case.get("dtype", "float32"))
    causal = case.get("causal", kind == "decode")
    B, H = case.get("batch", 1), case.get("heads", 2)
    h_kv = case.get("kv_heads", H)
    g = torch.Generator().manual_seed(case.get("seed", 0))
    q = torch.randn(B, H, N, d, generator=g).to(dt)
    k = torch.randn(B, h_kv, nk, d, generator=g).to(dt)
    v = torch.randn(B, h_kv, nk, d, generator=g).to(dt)
    # grouped K/V: the references read K/V head h // (H // H_kv) through an expanded copy
    ke, ve = (t.repeat_interleave(H // h_kv, dim=1) for t in (k, v))
    ref = naive_attention(q.double(), ke.double(), ve.double(), causal=causal)
    pt = naive_attention(q, ke, ve, causal=causal)
    t0 = time.perf_counter()
    row = {**case}
    if kind == "prefill" and "blocks" in case:
        from effdl.attention.triton_kernels import attention_forward

        out, _ = attention_forward(q, k, v, causal=causal, blocks=tuple(case["blocks"]))
    elif kind == "prefill":
        out = triton_attention(q, k, v, causal=causal)
    elif kind == "decode" and "block_n" in case:
        from effdl.attention.triton_kernels import triton_decode

        out = triton_decode(q, k, v, case.get("splits", 3), causal=causal, block_n=case["block_n"])
    elif kind == "decode":
        out = decode_attention(q, k, v, num_splits=case.get("splits", 3), backend="triton", causal=causal)
    elif kind == "grad":
        from effdl.attention.triton_kernels import attention_backward, attention_forward, backward_path

        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        do = torch.randn(B, H, N, d, generator=g).to(dt)
        g_ref = torch.autograd.grad(naive_attention(qd, kd, vd, causal=causal), (qd, kd, vd), do.double())
        g_pt = torch.autograd.grad(naive_attention(qr, kr, vr, causal=causal), (qr, kr, vr), do)
        blocks = tuple(case["blocks"]) if "blocks" in case else None
        if blocks is None:                  # through autograd, as a user calls it
            g_tr = torch.autograd.grad(triton_attention(qr, kr, vr, causal=causal), (qr, kr, vr), do)
        out, lse = attention_forward(q, k, v, causal=causal)
        g_direct = attention_backward(q, k, v, out, lse, do, causal=causal, blocks=blocks)
        if blocks is not None:              # a tile shape only the direct call can choose
            g_tr = g_direct
        rules = [within_baseline(a, b, c, factor=3) for a, b, c in zip(g_tr, g_pt, g_ref)]   # dq, dk, dv
        row.update(err=max(r.err for r in rules), err_pt=max(r.err_pt for r in rules), passed=all(rules),
                   grad_errs=[r.err for r in rules], grad_errs_pt=[r.err_pt for r in rules],
                   backward=backward_path(d), wired=_digest(*g_tr) == _digest(*g_direct),
                   digest=_digest(*g_tr), seconds=time.perf_counter() - t0)
        return row
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    rule = within_baseline(out, pt, ref, factor=2)
    row.update(err=rule.err, err_pt=rule.err_pt, passed=rule.passed, digest=_digest(out),
               seconds=time.perf_counter() - t0)
    return row


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (run_interpreted does) before running this module", file=sys.stderr)
        return 2
    cases = json.loads((argv or sys.argv[1:])[0])
    rows = [_run_case(c) for c in cases]
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
