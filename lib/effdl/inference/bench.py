"""``python -m effdl.bench inference``: the chapter's measurements as rows.

Rows carry :data:`effdl.inference.experiments.ROW_FIELDS` (``None`` where a field does
not apply): the naive loop and the KV cache, TTFT/TPOT, static vs continuous batching
(simulated with this machine's measured forward costs) and their KV waste, speculative
decoding, PPD and KV prediction.
"""

from __future__ import annotations

import torch

from effdl.inference import experiments as E
from effdl.measure import cpu_thread_policy

__all__ = ["run", "gpu_suite"]


def _models(S, device):
    from effdl import lm

    target = lm.load("target", S.models, device=device, verbose=False)
    draft = lm.load("draft", S.models, device=device, verbose=False)
    return target, draft


def _serving(target, S, costs) -> list[dict]:
    t_fixed, t_tok = E.calibrate(costs)
    out = []
    for r in E.serving_rows(target.config, S.requests, S.rate, S.serve_batches, S.block,
                            t_fixed, t_tok, seeds=(0,)):
        out.append(E.row(r["method"], batch=r["batch"], tokens_per_s=r["tokens_per_s"],
                         p50_ms=r["p50_ms"], p95_ms=r["p95_ms"], kv_waste=r["kv_waste"],
                         simulated=True))
    return out


def _steps(target, S) -> tuple[list[dict], list[dict]]:
    costs = E.step_costs(target, (S.prompt, 2 * S.prompt), S.batches, S.prompt, S.repeat)
    rows = []
    for c in costs:
        if c["kind"] == "prefill":
            rows.append(E.row("prefill", batch=1, prompt_len=c["tokens"], ttft_ms=c["ms"]))
        else:
            rows.append(E.row("decode step", batch=c["batch"], prompt_len=S.prompt,
                              tpot_ms=c["ms"], tokens_per_s=c["batch"] / c["ms"] * 1e3,
                              kv_bytes=target.new_cache(c["batch"]).nbytes()))
    return costs, rows


def run(S, device: torch.device) -> list[dict]:
    """Every measurement of the chapter at sizes ``S`` (models trained on first use)."""
    with cpu_thread_policy(device, S.threads), torch.no_grad():
        target, draft = _models(S, device)
        rows = E.generation_sweep(target, S.totals, S.prompt, S.repeat)
        costs, step_rows = _steps(target, S)
        rows += step_rows + _serving(target, S, costs)
        prompts = E.prompts_of(S.prompt, S.prompts, device=device)
        c = E.draft_cost(target, draft, S.prompt, S.repeat)
        rows += E.speculative_rows(target, draft, prompts, S.gen, S.spec_ks, S.repeat,
                                   c=c)
        rows += _ppd(target, prompts, S)
        return rows + _kvpred(target, draft, S)


def _ppd(target, prompts, S) -> list[dict]:
    from effdl.inference.ppd import load_prompt_tokens

    with torch.enable_grad():                      # training on first use
        pt = load_prompt_tokens(target, m=S.ppd_m, steps=S.ppd_steps, verbose=False,
                                seq_len=min(256, target.config.max_len))
    return E.ppd_rows(target, pt, prompts, S.gen, range(1, S.ppd_m + 1), S.repeat)


def _kvpred(target, draft, S) -> list[dict]:
    from effdl.inference.kvpred import continuation_loss, load_kv_predictor
    from effdl.lm.data import load_corpus

    cont = min(32, target.config.max_len - S.kvp_prompt)
    with torch.enable_grad():                      # training on first use
        kvp = load_kv_predictor(target, draft, steps=S.kvp_steps, verbose=False,
                                prompt_len=min(128, S.kvp_prompt), cont_len=cont)
    rows = E.kvpred_rows(target, draft, kvp, S.kvp_prompt, S.repeat)
    loss = continuation_loss(target, draft, kvp, load_corpus(1_000_000),
                             prompt_len=S.kvp_prompt, cont_len=cont,
                             windows=S.kvp_windows)
    names = {"large model prefill": "base", "KV prediction": "kv_predicted",
             "draft model prefill": "aux"}
    for r in rows:
        r["bits_per_byte"] = loss[names[r["method"]]]
    return rows


def gpu_suite(device: torch.device, S) -> list[dict]:
    """The same measurements with the gpu-profile models on a GPU (trained there on first
    use: a few minutes on a datacenter GPU)."""
    return run(S, device)
