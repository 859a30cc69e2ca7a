"""Exercise checks of the chapter "Fitting in memory"."""

from __future__ import annotations

import torch

from effdl.checks import assert_close, exercise_check, observe, require, same

__all__ = ["check_step_bytes", "check_nf4_round_trip", "check_lora_forward",
           "check_ladder_mix", "check_prefetch_schedule"]

#: the library functions that answer each check: refused as answers, and held back in the
#: student version of the notebook until after the check (see effdl.student)
REVEALS = {
    "check_step_bytes": ["effdl.memory.accounting.training_step_memory"],
    "check_nf4_round_trip": ["effdl.memory.quant.nf4_blockwise",
                             "effdl.memory.quant.quantize",
                             "effdl.memory.quant.QuantizedTensor.dequantize"],
    "check_lora_forward": ["effdl.memory.lora.LoRALinear.forward"],
    "check_ladder_mix": ["effdl.memory.qst.QSTModel.forward"],
    "check_prefetch_schedule": ["effdl.memory.offload.OffloadExecutor.run"],
}


# ------------------------------------------------------------------ bytes of a training step
def _step_cases() -> list[tuple[str, int, int, int]]:
    """(what, n_params, n_trainable, activation_bytes), from the library's own accounting of
    ByteLM: LoRA and QST first (frozen weights tell the mistakes apart), then full training,
    then a few hand-made counts."""
    from effdl.lm.model import LMConfig
    from effdl.memory.accounting import activation_bytes, param_counts, training_step_memory

    cases = []
    configs = [(LMConfig(n_layer=2, n_head=2, d_model=64, n_kv_head=1), 3, 37),
               (LMConfig(), 8, 256)]
    for method in ("lora", "qst", "full"):
        for c, batch, seq in configs:
            m = training_step_memory(c, batch, seq, method)
            n_trainable = m.gradients // 4
            total = param_counts(c)["total"]
            # adapters and the side network are weights too, stored beside the frozen base
            n_params = total + (n_trainable if method != "full" else 0)
            acts = activation_bytes(c, batch, seq, method)
            if 4 * n_params + 12 * n_trainable + acts != m.total:       # the library moved
                raise RuntimeError(f"effdl.memory.accounting no longer matches the "
                                   f"exercise's formula for method {method!r}")
            what = (f"ByteLM {c.n_layer} layers, d_model {c.d_model}, {method}, "
                    f"batch {batch} × {seq} tokens")
            cases.append((what, n_params, n_trainable, acts))
    cases += [("hand-made counts", 1000, 10, 7), ("nothing trainable", 500, 0, 0),
              ("one parameter", 1, 1, 3)]
    return cases


@exercise_check(student="step_bytes")
def check_step_bytes(step_bytes) -> None:
    """``step_bytes(n_params, n_trainable, activation_bytes) -> int``: one fp32 AdamW step."""
    for what, P, T, A in _step_cases():
        got = step_bytes(P, T, A)
        want = 4 * P + 4 * T + 8 * T + A
        known = [(4 * P + 4 * T + 4 * T + A,
                  "AdamW keeps two moments per trainable parameter (m and v): 8 bytes, not 4"),
                 (4 * P + 4 * P + 8 * T + A,
                  "a frozen weight gets no gradient: gradients are 4 bytes per trainable "
                  "parameter only"),
                 (4 * P + 4 * P + 8 * P + A,
                  "gradients and optimizer states exist for trainable parameters only"),
                 (4 * P + 12 * T,
                  "add the activations autograd keeps for backward"),
                 (4 * T + 12 * T + A,
                  "every weight is stored, frozen or not: 4 bytes per parameter"),
                 (P + T + 2 * T + A,
                  "count bytes: an fp32 number is 4 bytes"),
                 (4 * P + 16 * T + A,
                  "n_params already counts the trained weights: each of them adds 12 bytes "
                  "(its gradient and two moments), not 16"),
                 (4 * P + 8 * T + A,
                  "a trainable parameter has a gradient (4 bytes) and two moments (8 bytes)")]
        hint = next((h for wrong, h in known if got == wrong and wrong != want), "")
        ok = isinstance(got, (int, float)) and not isinstance(got, bool) and got == want
        require(ok, f"{what}: n_params={P}, n_trainable={T}, activation_bytes={A}: expected "
                    f"{want} bytes, got {got!r}" + (f" — {hint}" if hint else ""))


# ------------------------------------------------------------------ NF4, one block
def _nf4_blocks() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, generator=g)
    uniform = torch.rand(37, generator=g) * 2 - 1
    heavy = torch.randn(100, generator=g) ** 3                     # a few large values
    spiky = torch.randn(23, generator=g) * 0.01
    spiky[5] = -3.0                                                # the absmax is negative
    zeros = torch.zeros(16)
    zeros_and_more = torch.randn(19, generator=g)
    zeros_and_more[::3] = 0.0                                       # exact zeros survive
    return [("a block of 64 normal values", normal),
            ("a block of 37 uniform values", uniform),
            ("a heavy-tailed block of 100 values", heavy),
            ("a block of 23 values whose largest magnitude is negative", spiky),
            ("a block of 19 values, some exactly 0", zeros_and_more),
            ("a block of one value", torch.tensor([-0.7])),
            ("an all-zero block of 16 values", zeros)]


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return levels[(x[:, None] - levels[None, :]).abs().argmin(1)]


def _nf4_reference(w: torch.Tensor) -> torch.Tensor:
    from effdl.memory.quant import NF4_LEVELS, nf4_blockwise

    codes, absmax = nf4_blockwise(w, block=w.numel())
    return NF4_LEVELS[codes.long()] * absmax[0]


def _nf4_hint(got: torch.Tensor, w: torch.Tensor) -> str:
    from effdl.memory.quant import NF4_LEVELS

    a = w.abs().max()
    s = a if a > 0 else torch.tensor(1.0)
    x = w / s
    uniform16 = torch.linspace(-1, 1, 16)
    floor = NF4_LEVELS[(torch.bucketize(x, NF4_LEVELS, right=True) - 1).clamp(0, 15)]
    ceil = NF4_LEVELS[torch.bucketize(x, NF4_LEVELS).clamp(0, 15)]
    to_zero = torch.where(x >= 0, floor, ceil)
    mean_abs, std = w.abs().mean(), w.std() if w.numel() > 1 else w.abs().mean()
    known = [
        (torch.round(x * 7) / 7 * s,
         "these are int4's 15 evenly spaced levels (round(7·w / scale) / 7): NF4 rounds to the "
         "16 levels of NF4_LEVELS, closer together near 0 where normal weights crowd"),
        (_nearest(x, uniform16) * s,
         "this is a uniform grid of 16 levels: NF4's levels are NF4_LEVELS, quantiles of a "
         "normal distribution, not evenly spaced"),
        (_nearest(w, NF4_LEVELS), "divide the block by its absmax before rounding: the levels "
         "lie in [-1, 1], the weights do not"),
        (_nearest(w, NF4_LEVELS) * s, "divide the block by its absmax before rounding: the "
         "levels lie in [-1, 1], the weights do not"),
        (_nearest(w / w.max(), NF4_LEVELS) * w.max(),
         "the absmax is max|w|, not max(w): a block's largest magnitude can be negative"),
        (_nearest(w / mean_abs, NF4_LEVELS) * mean_abs,
         "scale by the absmax max|w|, not the mean |w|: the largest value must map to ±1"),
        (_nearest(w / std, NF4_LEVELS) * std,
         "scale by the absmax max|w|, not the standard deviation: the largest value must map "
         "to ±1"),
        (floor * s, "round to the nearest level, not down to the level below"),
        (to_zero * s, "round to the nearest level, not towards zero"),
        (_nearest(x, NF4_LEVELS), "multiply the level back by the scale: the block's values "
         "are level · absmax"),
    ]
    return next((h for wrong, h in known if same(got, wrong, rtol=1e-5, atol=1e-6)), "")


@exercise_check(student="nf4_round_trip")
def check_nf4_round_trip(nf4_round_trip) -> None:
    """``nf4_round_trip(w) -> tensor like w``: one NF4 block quantized and dequantized."""
    from effdl.memory.quant import NF4_LEVELS

    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    for what, w in _nf4_blocks():
        want = _nf4_reference(w)
        got = nf4_round_trip(w.clone())
        require(isinstance(got, torch.Tensor),
                f"{what}: return a tensor like w, got {type(got).__name__}")
        if w.abs().max() == 0:
            require(bool(torch.isfinite(got).all()),
                    f"{what}: your result has NaN or inf — an all-zero block has absmax 0; "
                    "do not divide by it: the block decodes to zeros")
        require(got.shape == want.shape,
                f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)} (one value "
                "per weight, dequantized)")
        # a value within rounding of a midpoint between two levels may go either way
        s = w.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        tie = ((w / s)[:, None] - mids[None, :]).abs().min(1).values < 1e-5
        got_d = got.detach().double()
        got_d = torch.where(tie, want.double(), got_d)
        assert_close(got_d, want, what=what, rtol=1e-5, atol=1e-6 * float(s),
                     hint=lambda: _nf4_hint(got.detach().float(), w))


# ------------------------------------------------------------------ the LoRA forward
# (x shape, out, r, alpha): in != out first, so transposition mistakes raise or differ;
# a 3-D x, r = 1, a square W last
_LORA_CASES = [((5, 12), 7, 3, 16.0), ((2, 4, 9), 6, 1, 2.0), ((3, 20), 11, 4, 7.5),
               ((1, 3, 2, 5), 8, 2, 1.0), ((6, 10), 10, 5, 32.0)]


@exercise_check(student="lora_forward")
def check_lora_forward(lora_forward) -> None:
    """``lora_forward(x, W, A, B, alpha) -> x Wᵀ + (alpha / r) x Aᵀ Bᵀ``."""
    for i, (shape, out, r, alpha) in enumerate(_LORA_CASES):
        g = torch.Generator().manual_seed(i)
        inp = shape[-1]
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        W = torch.randn(out, inp, generator=g, dtype=torch.float64)
        A = torch.randn(r, inp, generator=g, dtype=torch.float64)
        B = torch.randn(out, r, generator=g, dtype=torch.float64)  # trained: not zero
        base, update = x @ W.T, (x @ A.T) @ B.T
        want = base + (alpha / r) * update
        what = (f"x {tuple(shape)}, W {(out, inp)}, A {(r, inp)}, B {(out, r)}, "
                f"alpha={alpha:g}")
        try:
            got = lora_forward(x.clone(), W.clone(), A.clone(), B.clone(), alpha)
        except NotImplementedError:
            raise
        except RuntimeError as exc:
            raise AssertionError(
                f"{what}: your function raised RuntimeError: {exc} — check the transposes: "
                "x (..., in) @ W.T is (..., out), x @ A.T is (..., r), then @ B.T is "
                "(..., out)") from exc

        def hint():
            known = [(base + alpha * update,
                      "scale the update by alpha / r, not alpha: r is A.shape[0]"),
                     (base + update, "scale the update by alpha / r"),
                     (base + (alpha / inp) * update,
                      "r is the rank, A.shape[0], not the input width A.shape[1]"),
                     ((alpha / r) * update, "add the frozen layer's output x Wᵀ: LoRA "
                      "learns a correction beside it"),
                     (base, "add the adapter's update (alpha / r) · x Aᵀ Bᵀ")]
            if inp == out:                  # x @ W runs only when W is square
                known.append((x @ W + (alpha / r) * update,
                              "the base term is x Wᵀ (W is (out, in)), not x W"))
            return next((h for wrong, h in known if same(got, wrong)), "")

        assert_close(got, want, what=what, rtol=1e-9, atol=1e-9, hint=hint)


# ------------------------------------------------------------------ QST's gated mix
def _mix_trial(ladder_mix, z, s_prev, gate: float) -> dict:
    """Driver (runs where the student's code lives): calls ``ladder_mix`` on a gate logit that
    requires grad and returns the output and the gradients of its weighted sum."""
    import torch

    z = z.clone().requires_grad_(True)
    s_prev = s_prev.clone().requires_grad_(True)
    g = torch.tensor(gate, dtype=z.dtype, requires_grad=True)
    out = ladder_mix(z, s_prev, g)
    if not torch.is_tensor(out):
        return {"out": out, "grads": None}
    grads = None
    if out.requires_grad and out.shape == z.shape:
        w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view(out.shape)
        grads = torch.autograd.grad((out * w).sum(), (z, s_prev, g), allow_unused=True)
    return {"out": out.detach(), "grads": grads}


# (shape of z and s_prev, gate logit): gate 0 is β = 1/2, where swapping z and s_prev
# is the only thing that shows
_MIX_CASES = [((2, 3, 4), 1.3), ((7,), -2.1), ((1, 5, 6), 0.0), ((3, 2), 4.0)]


@exercise_check(student="ladder_mix")
def check_ladder_mix(ladder_mix) -> None:
    """``ladder_mix(z, s_prev, gate) -> (1 - β) z + β s_prev`` with β = sigmoid(gate),
    differentiable in all three."""
    for i, (shape, gate) in enumerate(_MIX_CASES):
        g = torch.Generator().manual_seed(i)
        z = torch.randn(*shape, generator=g, dtype=torch.float64)
        s_prev = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5
        seen = observe(ladder_mix, _mix_trial, z, s_prev, gate)
        got = seen["out"]
        what = f"z and s_prev {tuple(shape)}, gate logit {gate:g}"
        require(got is not None, f"{what}: your function returned None (did you forget "
                                 "`return`?)")
        require(torch.is_tensor(got), f"{what}: return a tensor, got {type(got).__name__}")
        zr, sr = z.clone().requires_grad_(True), s_prev.clone().requires_grad_(True)
        gr = torch.tensor(gate, dtype=torch.float64, requires_grad=True)
        beta = torch.sigmoid(gr)
        want = (1 - beta) * zr + beta * sr
        b = float(beta.detach())

        def hint():
            known = [((1 - gate) * z + gate * s_prev, "the gate is a logit: mix with "
                      "β = sigmoid(gate), which lies in (0, 1)"),
                     ((1 - b) * s_prev + b * z, "z and s_prev are swapped: β weighs the "
                      "previous side state s_prev, 1 - β the new input z"),
                     (z + b * s_prev, "weigh z by 1 - β: the two weights add up to 1"),
                     ((1 - b) * z + s_prev, "weigh s_prev by β"),
                     (b * z + (1 - b) * s_prev, "β weighs s_prev and 1 - β weighs z, not "
                      "the other way round")]
            return next((h for wrong, h in known if same(got, wrong)), "")

        assert_close(got, want.detach(), what=what, rtol=1e-9, atol=1e-9, hint=hint)
        w = torch.linspace(-1.0, 2.0, want.numel(), dtype=want.dtype).view(want.shape)
        ref = torch.autograd.grad((want * w).sum(), (zr, sr, gr))
        grads = seen["grads"]
        require(grads is not None and grads[2] is not None,
                f"{what}: the values are right but no gradient reaches the gate — keep it in "
                "the graph: torch.sigmoid(gate), no .item(), float() or math.exp")
        for name, got_g, want_g in zip(("z", "s_prev", "gate"), grads, ref):
            require(got_g is not None, f"{what}: no gradient reaches {name}")
            assert_close(got_g, want_g, what=f"{what}: the gradient with respect to {name}",
                         rtol=1e-7, atol=1e-9,
                         hint="the values are right: was something detached?")


# ------------------------------------------------------------------ the prefetch schedule
def _recorded_schedule(L: int, k: int) -> list[list[int]]:
    """What :class:`effdl.memory.offload.OffloadExecutor` (mode "prefetch", slots empty)
    really does: for each layer, the loads it starts just before that layer computes."""
    from torch import nn

    from effdl.memory.offload import OffloadExecutor

    class Recorder(OffloadExecutor):
        def __init__(self, *args, **kw):
            self.steps: list[list[int]] = []
            self.pending: list[int] = []
            super().__init__(*args, **kw)

        def _load(self, i):
            before = self.stats["loads"]
            super()._load(i)
            if self.stats["loads"] > before:                 # a copy started
                self.pending.append(i)

        def _wait(self, slot):                               # the layer computes next
            self.steps.append(self.pending)
            self.pending = []
            super()._wait(slot)

    torch.manual_seed(0)
    layers = [nn.Linear(2, 2) for _ in range(L)]
    ex = Recorder(layers, k=k, mode="prefetch")
    try:
        ex.run(torch.zeros(1, 2))
    finally:
        ex.close()
    return ex.steps


def _schedule(L, k, ahead, reissue=False):
    issued, steps = set(), []
    for i in range(L):
        new = [j for j in range(i, min(L, i + ahead + 1)) if reissue or j not in issued]
        issued.update(new)
        steps.append(new)
    return steps


_PREFETCH_CASES = sorted({(L, k) for L in (5, 7, 1) for k in (2, 3, 1, L, L + 2)},
                         key=lambda c: (c[0] == 1, c[1] == 1, c))


@exercise_check(student="prefetch_schedule")
def check_prefetch_schedule(prefetch_schedule) -> None:
    """``prefetch_schedule(L, k) -> list of L lists``: the layers whose load starts just
    before each layer computes, with k slots, prefetching."""
    for L, k in _PREFETCH_CASES:
        want = _recorded_schedule(L, k)
        got = prefetch_schedule(L, k)
        what = f"L={L} layer{'s' * (L != 1)}, k={k} slot{'s' * (k != 1)}"
        try:
            got = [[int(j) for j in step] for step in got]
        except TypeError:
            raise AssertionError(f"{what}: return a list of {L} lists of layer indices, got "
                                 f"{got!r}") from None
        if got == want:
            continue
        kk = min(k, L)
        known = [(any(j >= L for step in got for j in step),
                  f"there is no layer {L} or beyond: stop the look-ahead at L"),
                 (k == 1, "with k = 1 there is no free slot to prefetch into: each layer is "
                  "loaded just before it runs, [[0], [1], ...]"),
                 (got == _schedule(L, kk, kk), "look k - 1 layers ahead, not k: the layer "
                  "that computes holds one of the k slots, and loading k ahead overwrites it"),
                 (got == _schedule(L, kk, kk - 1, reissue=True),
                  "list only the loads that start at that step: a layer already loaded (or "
                  "loading) stays in its slot and is not loaded again"),
                 (k >= L, "with k ≥ L every layer has its own slot: all of them are loaded "
                  "before layer 0 and nothing after"),
                 (len(got) != L, f"return one list per layer: {L} of them")]
        hint = next((h for bad, h in known if bad), "")
        require(False, f"{what}: expected {want}, got {got}" + (f" — {hint}" if hint else ""))
