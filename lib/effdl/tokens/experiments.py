"""Helpers the token-compression chapter's notebook calls: the model, the pages, and the
measurements (accuracy, latency, FLOPs per reducer and budget; the KV codec's size and error).

Rows ``{"method", "keep", "mean_tokens_kept_frac", "accuracy", "ms_batch1", "ms_batch64", "gflops"}``
(``keep_all`` is the model with no reducer at all) and ``{"method": "kv", "bits", "group",
"ratio_vs_fp16", "attn_rel_err"}``.  ``python -m effdl.bench tokens`` calls the same functions.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from effdl.measure import interleaved
from effdl.tokens import kvcache
from effdl.tokens.documents import make_documents
from effdl.tokens.reducers import REDUCERS, make
from effdl.tokens.train import evaluate
from effdl.tokens.vit import Block, TinyViT, block_flops

__all__ = ["build_model", "datasets", "method_fn", "measure_methods", "token_cost", "kv_rows",
           "tcc_summary"]


def build_model(S, seed: int = 0) -> TinyViT:
    """The chapter's ViT at the profile's sizes (random init, seeded)."""
    torch.manual_seed(seed)
    return TinyViT(image_size=S.page, crop=S.crop, patch=S.patch, dim=S.dim, depth=S.depth, heads=S.heads,
                   reduce_at=S.reduce_at)


def datasets(S, seed: int = 0):
    """``(train_images, train_labels), (test_images, test_labels, test_info)`` for the profile."""
    train_set = make_documents(S.n_train, seed, size=S.page, glyph_px=S.glyph_px, grid=S.patch)
    test_set = make_documents(S.n_test, seed + 1, size=S.page, glyph_px=S.glyph_px, grid=S.patch, return_info=True)
    return train_set, test_set


def method_fn(method: str, keep: float):
    return None if method == "keep_all" else make(method, keep=keep)


def measure_methods(model, images, labels, *, keeps, batch: int = 64, repeat: int = 5, methods=None,
                    device=None, latency: bool = True, progress: bool = True) -> list[dict]:
    """Accuracy, mean kept fraction, latency (batch 1 and ``batch``) and GFLOPs per method and budget.

    ``keep_all`` runs the model with no reducer (the naive baseline, one row).  Latency is measured
    in ``repeat`` interleaved rounds (:func:`effdl.measure.interleaved`: every configuration once
    per round), so that a change in the machine's load hits all of them alike; the median over
    rounds is reported.  Batch-1 latency is
    the mean over 4 different pages (adaptive methods keep different counts per page).  GFLOPs are
    per page, analytic (:meth:`TinyViT.flops`) at the mean kept count.
    """
    dev = torch.device(device or "cpu")
    methods = list(methods or REDUCERS)
    pairs = [(m, 1.0) for m in methods if m == "keep_all"] + [(m, k) for m in methods if m != "keep_all" for k in keeps]
    model = model.to(dev).eval()
    images, labels = images.to(dev), labels.to(dev)
    rows = []
    for method, keep in tqdm(pairs, desc="accuracy", disable=not progress, leave=False):
        ev = evaluate(model, images, labels, method_fn(method, keep))
        rows.append({"method": method, "keep": keep,
                     "mean_tokens_kept_frac": ev["kept_frac"],
                     "accuracy": ev["accuracy"],
                     "gflops": model.flops(ev["kept_frac"] * model.n_patches) / 1e9})
    if not latency:
        return rows
    singles = [images[i:i + 1] for i in range(min(4, images.shape[0]))]
    xb = images[:batch]
    calls = {}
    for i, (method, keep) in enumerate(pairs):
        fn, gen = method_fn(method, keep), torch.Generator().manual_seed(0)
        calls[i, 1] = lambda fn=fn, gen=gen: [model(p, fn, generator=gen) for p in singles]
        calls[i, 64] = lambda fn=fn, gen=gen: model(xb, fn, buckets=4, generator=gen)
    with torch.no_grad():
        res = interleaved(calls, rounds=repeat, warmup=1, device=dev)
    for i, row in enumerate(rows):
        row.update(ms_batch1=res[i, 1].median_ms / len(singles), ms_batch64=res[i, 64].median_ms,
                   batch=int(xb.shape[0]))
    return rows


def token_cost(dim: int, heads: int, depth: int, token_counts, *, batch: int = 64, repeat: int = 5,
               device=None) -> list[dict]:
    """Latency and FLOPs of ``depth`` ViT blocks against the number of tokens N (random tokens).

    FLOPs are analytic (:func:`block_flops`), with the share spent in attention (∝ N²) against
    the linear layers (∝ N).
    """
    dev = torch.device(device or "cpu")
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth)).to(dev).eval()

    def run_blocks(x):
        for b in blocks:
            x, _, _ = b(x)
        return x

    inputs = {n: torch.randn(batch, n, dim, device=dev) for n in token_counts}
    with torch.no_grad():  # interleaved rounds, as in measure_methods
        res = interleaved({n: (lambda x=x: run_blocks(x)) for n, x in inputs.items()},
                          rounds=repeat, warmup=1, device=dev)
    rows = []
    for n in token_counts:
        ms = res[n].median_ms
        flops = depth * batch * block_flops(n, dim, blocks[0].mlp_ratio)
        attn = depth * batch * 4 * n * n * dim  # QKᵀ and PV: 2·N²·d FLOPs each
        rows.append({"n_tokens": n, "batch": batch, "ms": ms, "gflops": flops / 1e9,
                     "attn_flops_frac": attn / flops, "us_per_token": 1e3 * ms / (batch * n)})
    return rows


def kv_rows(S, *, seed: int = 0, groups=(1, 8), progress: bool = True) -> list[dict]:
    """Bytes vs attention-output error of the KV codec: uniform bits, and the layer-dependent default."""
    lm = kvcache.CausalLM(dim=S.kv_dim, depth=S.kv_depth, heads=max(1, S.kv_dim // 32), seed=seed,
                          max_len=max(4096, S.kv_tokens))
    q, k, v = lm.kv_cache(kvcache.corpus_tokens(S.kv_tokens, seed))
    out = kvcache.attention_output(q, k, v)
    configs = [(b, g) for g in groups for b in S.kv_bits] + [(tuple(kvcache.layer_bits(S.kv_depth)), 8)]
    rows = []
    for bits, group in tqdm(configs, desc="kv", disable=not progress, leave=False):
        blob = kvcache.compress(k, v, bits=list(bits) if isinstance(bits, tuple) else bits, group=group)
        k2, v2 = kvcache.decompress(blob)
        rows.append({"method": "kv", "bits": "/".join(map(str, bits)) if isinstance(bits, tuple) else bits,
                     "group": group, "bytes": len(blob), "ratio_vs_fp16": kvcache.fp16_bytes(k, v) / len(blob),
                     "attn_rel_err": kvcache.relative_error(out, kvcache.attention_output(q, k2, v2)),
                     "bits_per_value": 8 * len(blob) / (k.numel() + v.numel())})
    return rows


def tcc_summary(rows) -> list[dict]:
    """TCC against the others, read off benchmark rows: one dict per comparison with its number.

    The most accurate TCC row keeping at most half of the tokens on average is compared with
    keep-all (accuracy difference, batch-64 speed-up) and with every fixed-ratio baseline's accuracy
    interpolated at the same mean kept fraction; for the KV codec, the best compression ratio among
    the settings with attention-output error ≤ 1e-2.
    """
    import numpy as np

    vit = [r for r in rows if r.get("method") not in ("kv", "blocks")]
    base = next(r for r in vit if r["method"] == "keep_all")
    cands = [r for r in vit if r["method"] == "tcc" and r["mean_tokens_kept_frac"] <= 0.5]
    if not cands:
        return [{"comparison": "TCC at <= 50% tokens", "note": "no TCC budget kept <= 50% of the tokens"}]
    t = max(cands, key=lambda r: (r["accuracy"], r["mean_tokens_kept_frac"]))
    frac = t["mean_tokens_kept_frac"]
    out = [{"comparison": "TCC accuracy - keep-all accuracy", "kept_frac": frac,
            "value": 100 * (t["accuracy"] - base["accuracy"]), "unit": "points"}]
    for m in dict.fromkeys(r["method"] for r in vit if r["method"] not in ("keep_all", "tcc")):
        pts = sorted((r["mean_tokens_kept_frac"], r["accuracy"]) for r in vit if r["method"] == m)
        acc = float(np.interp(frac, [p[0] for p in pts], [p[1] for p in pts]))
        out.append({"comparison": f"TCC accuracy - {m} accuracy, same budget", "kept_frac": frac,
                    "value": 100 * (t["accuracy"] - acc), "unit": "points"})
    if "ms_batch64" in t:
        out.append({"comparison": "keep-all time / TCC time, batch 64", "kept_frac": frac,
                    "value": base["ms_batch64"] / t["ms_batch64"], "unit": "x"})
    kv = [r for r in rows if r.get("method") == "kv"]
    ok = [r for r in kv if r["attn_rel_err"] <= 1e-2]
    if ok:
        best = max(ok, key=lambda r: r["ratio_vs_fp16"])
        out.append({"comparison": f"KV size fp16 / compressed, error <= 1e-2 (bits {best['bits']})",
                    "value": best["ratio_vs_fp16"], "unit": "x"})
    return out
