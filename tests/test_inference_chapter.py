"""The inference chapter's measurements (effdl.inference.experiments), its paged gather and
greedy rule, and its benchmark rows."""

from __future__ import annotations

import pytest
import torch

from effdl import lm
from effdl.inference import experiments as ex
from effdl.inference.paged import gather_kv
from effdl.inference.speculative import greedy_accept


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(seed=0, **kw) -> lm.ByteLM:
    torch.manual_seed(seed)
    c = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_len=96) | kw
    return lm.ByteLM(lm.LMConfig(**c)).eval()


# ------------------------------------------------------------------------------ KV memory
def test_kv_per_token_matches_the_models_own_cache():
    for kw in (dict(n_kv_head=2), dict(n_kv_head=4), dict(n_kv_head=1, n_layer=3)):
        m = _model(**kw)
        c = m.config
        per_token = ex.kv_per_token(c.n_layer, c.n_head, c.n_kv_head, c.d_model, bytes_per=4)
        assert per_token * c.max_len == m.new_cache(1).nbytes()
        assert per_token == lm.kv_bytes_per_token(c, torch.float32)


def test_kv_table_known_figures():
    rows = {r["model"]: r for r in ex.kv_table(_model())}
    # Llama-2-7B: 32 layers x 32 KV heads x 128 x 2 (K, V) x 2 bytes = 0.5 MiB per token
    assert rows["Llama-2-7B (fp16)"]["kv_per_token"] == 2**19
    assert rows["Llama-2-7B (fp16)"]["GiB per 4096 tokens"] == 2.0
    # GQA with 8 of 32 heads: a quarter
    assert rows["Llama-3-8B (fp16)"]["kv_per_token"] * 4 == rows["Llama-3-8B (fp16)"]["without_gqa"]
    assert rows["Llama-2-70B (fp16)"]["kv_per_token"] == 2 * 80 * 8 * 128 * 2


def test_kinetics_crossover_is_where_the_two_byte_counts_meet():
    full = {m: c for m, c in ex.REAL_CONFIGS.items() if not c.get("window")}
    for batch in (1, 7, 32):
        for r in ex.kinetics([1024, 65536], batch=batch, configs=full):
            at = ex.decode_token_cost(ex.REAL_CONFIGS[r["model"]], r["crossover"], batch)
            assert at["kv_bytes"] == pytest.approx(at["param_bytes"], rel=1e-9)
            assert (r["kv_share"] > 0.5) == (r["context"] > r["crossover"])
    one = {r["model"]: r["crossover"] for r in ex.kinetics([1024], batch=1, configs=full)}
    many = {r["model"]: r["crossover"] for r in ex.kinetics([1024], batch=32, configs=full)}
    assert all(many[m] == pytest.approx(one[m] / 32) for m in one)


def test_a_sliding_window_caps_the_cache():
    mistral = {"Mistral-7B": ex.REAL_CONFIGS["Mistral-7B"]}
    rows = ex.kinetics([4096, 65536], batch=1, configs=mistral)
    assert rows[0]["kv_bytes"] == rows[1]["kv_bytes"] and rows[0]["crossover"] == float("inf")
    # at batch 32 the capped cache still overtakes the weights, below the window
    r32 = ex.kinetics([4096], batch=32, configs=mistral)[0]
    assert r32["crossover"] < 4096 and r32["kv_share"] > 0.5


def test_decode_flops_formula_matches_pytorchs_counter():
    """2 FLOPs per weight-matrix entry plus 4 * keys * layers * heads * head_dim."""
    for kw in (dict(), dict(n_kv_head=4), dict(n_layer=3, n_head=2, n_kv_head=1)):
        m = _model(**kw)
        c = m.config
        N = sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2 and "embed" not in n)
        for ctx in (5, 37):
            keys = ctx + 1
            want = 2 * N + 4 * keys * c.n_layer * c.n_head * c.head_dim
            assert ex.counted_step_flops(m, ctx) == want


# ------------------------------------------------------------------------------ serving
def test_calibrate_recovers_a_line():
    costs = [{"tokens": t, "ms": 3.0 + 0.25 * t} for t in (1, 4, 16, 64, 200)]
    t_fixed, t_tok = ex.calibrate(costs)
    assert t_fixed == pytest.approx(3e-3) and t_tok == pytest.approx(2.5e-4)


def test_serving_rows_equal_memory_and_both_schedulers():
    c = _model(max_len=128).config
    rows = ex.serving_rows(c, 40, 200.0, (4, 8), 16, 1e-3, 1e-5, seeds=(0, 1))
    assert len(rows) == 2 * 2 * 3
    assert {r["method"] for r in rows} == {"static", "continuous", "continuous, 4x sequences"}
    for r in rows:
        assert 0 <= r["kv_waste"] < 1 and r["tokens_per_s"] > 0
    trace = ex.trace_for(c, 500, 10.0)
    assert max(r.prompt_len + r.output_len for r in trace) <= c.max_len


# ------------------------------------------------------------------------------ paged gather
def test_gather_kv_follows_the_table_and_cuts_the_last_block():
    pool = torch.arange(5 * 4 * 2, dtype=torch.float64).view(5, 4, 2)
    got = gather_kv(pool, [3, 0, 4], 9)
    want = torch.cat([pool[3], pool[0], pool[4][:1]])
    assert torch.equal(got, want)
    assert gather_kv(pool, [], 0).shape == (0, 2)
    with pytest.raises(ValueError, match="length must lie in"):
        gather_kv(pool, [1, 2], 9)


def test_gather_kv_agrees_with_the_allocators_lookup():
    from effdl.inference import BlockAllocator

    alloc = BlockAllocator(num_blocks=12, block_size=4)
    a, b = alloc.sequence(), alloc.sequence()
    for n in (3, 2, 5, 1, 4):          # interleaved growth: the two tables interleave
        a.append(n)
        b.append(n + 1)
    pool = torch.randn(12, 4, 3)
    rows = gather_kv(pool, a.block_table, a.used_slots)
    for t in range(a.used_slots):
        blk, off = a.logical_to_physical(t)
        assert torch.equal(rows[t], pool[blk, off])


# ------------------------------------------------------------------------------ greedy rule
@pytest.mark.parametrize("drafted, best, want", [
    ([5, 7, 9], [5, 7, 9, 2], (3, 2)),       # all kept: a bonus token
    ([5, 7, 9], [5, 1, 9, 2], (1, 1)),       # a later match after a miss does not count
    ([5, 7, 9], [4, 7, 9, 2], (0, 4)),
    ([], [3], (0, 3)),
])
def test_greedy_accept(drafted, best, want):
    got = greedy_accept(torch.tensor(drafted, dtype=torch.long), torch.tensor(best))
    assert got == want


# ------------------------------------------------------------------------------ the sweeps
def test_generation_sweep_rows():
    m = _model(max_len=160)
    rows = ex.generation_sweep(m, (16, 150), prompt=8, repeat=1)
    assert [r["method"] for r in rows] == ["naive", "kv_cache"] * 2
    assert all(set(ex.ROW_FIELDS) <= set(r) for r in rows)
    long = {r["method"]: r for r in rows if r["total"] == 150}
    assert long["kv_cache"]["gen_len"] == 150 - 8 and long["kv_cache"]["speedup"] > 0


def test_speculative_rows_check_the_output():
    t, d = _model(0), _model(1, n_layer=1)
    prompts = ex.prompts_of(6, 2)
    rows = ex.speculative_rows(t, d, prompts, 10, (1, 3), repeat=1, c=0.5)
    assert [r.get("k") for r in rows] == [0, 1, 3]
    assert all(0 <= r["acceptance"] <= 1 and 0 <= r["alpha"] <= 1 for r in rows[1:])
    for r in rows[1:]:
        assert r["predicted"] == pytest.approx(ex.predicted_speedup(r["alpha"], r["k"], 0.5))


def test_predicted_speedup_is_leviathans_formula():
    # alpha = 0: one token per round, k draft calls on top
    assert ex.predicted_speedup(0.0, 3, 0.25) == pytest.approx(1 / 1.75)
    # alpha = 1: k + 1 tokens per round
    assert ex.predicted_speedup(1.0, 4, 0.1) == pytest.approx(5 / 1.4)
    # their Table/Figure regime: alpha 0.8, k 3, c 0.05 -> (1 - .8^4) / (.2 * 1.15)
    assert ex.predicted_speedup(0.8, 3, 0.05) == pytest.approx((1 - 0.8**4) / (0.2 * 1.15))


def test_alpha_counts_rejections_not_unchecked_guesses():
    from effdl.inference.speculative import SpecStats

    # two rounds of k = 4: all kept; one kept then a rejection (3 guesses never checked)
    st = SpecStats(proposed=8, accepted=5, rejected=1)
    assert st.acceptance_rate == pytest.approx(5 / 8)
    assert st.alpha == pytest.approx(5 / 6)


def test_prompt_of_is_real_text_and_deterministic():
    a, b = ex.prompt_of(40, seed=3), ex.prompt_of(40, seed=3)
    assert torch.equal(a, b) and a.shape == (1, 40) and a.dtype == torch.int64
    assert not torch.equal(a, ex.prompt_of(40, seed=4))
    assert lm.decode(a[0]).isprintable() or "\n" in lm.decode(a[0])


def test_a_method_that_changes_the_output_is_refused():
    m = _model(0)
    prompts = ex.prompts_of(5, 2)

    def wrong(p, k):                      # greedy output with its last token changed
        ids = lm.generate(m, p, 6)
        ids[0, -1] = (ids[0, -1] + 1) % 256
        return ids, None

    with pytest.raises(AssertionError, match="changed the output"):
        ex._verified_timings(m, prompts, 6, (1,), 1, wrong, "a guesser")
