"""effdl.lm: the shared byte-level language model (corpus, model, KV cache, training, disk cache)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from effdl import chapters, lm
from effdl.lm import data as lm_data
from effdl.lm import store

# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second CPU thread saves nothing, and on a shared machine it makes ops
    wait at barriers for a descheduled thread (a test here once took 80x longer).  The
    conftest restores the thread count afterwards."""
    torch.set_num_threads(1)


def _model(n_kv_head: int, dtype=torch.float32, seed: int = 0, max_len: int = 64) -> lm.ByteLM:
    torch.manual_seed(seed)
    c = lm.LMConfig(n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64, max_len=max_len)
    return lm.ByteLM(c).to(dtype).eval()


def _cached_logits(model: lm.ByteLM, idx: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits at positions [prompt_len - 1, T) through prefill + one decode step per token."""
    logits, cache = model.prefill(idx[:, :prompt_len])
    out = [logits[:, -1:]]
    for t in range(prompt_len, idx.shape[1]):
        logits, cache = model.decode_step(idx[:, t:t + 1], cache)
        out.append(logits)
    return torch.cat(out, dim=1)


@pytest.fixture(scope="session")
def smoke_models(tmp_path_factory):
    """The smoke target and draft, trained once into a fresh cache folder: (folder, target, draft)."""
    folder = tmp_path_factory.mktemp("lm-cache")
    target = lm.load("target", "smoke", device="cpu", cache_dir=folder, verbose=False)
    draft = lm.load("draft", "smoke", device="cpu", cache_dir=folder, verbose=False)
    return folder, target, draft


# ------------------------------------------------------------------------------------ corpus


def test_corpus_is_deterministic_and_split_by_file():
    a, b = lm.load_corpus(262_144), lm.load_corpus(262_144)
    assert a.digest == b.digest and torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert a.train.dtype == torch.uint8 and a.train.numel() + a.held_out.numel() == 262_144
    assert a.held_out_files and not set(a.train_files) & set(a.held_out_files)
    # a file's side is decided by its path alone: a larger corpus keeps every file's side
    big = lm.load_corpus(1_048_576)
    assert big.digest != a.digest
    assert not set(a.held_out_files) & set(big.train_files)
    assert not set(a.train_files) & set(big.held_out_files)
    assert all(lm_data.split_of(f) == "held_out" for f in a.held_out_files)
    assert all(lm_data.split_of(f) == "train" for f in a.train_files)


def test_corpus_excludes_tests_and_third_party_and_hashes_content(tmp_path):
    for i in range(30):
        (tmp_path / f"mod{i}.py").write_text(f"x = {i}\n" * 40)
    for skip in ("test", "site-packages", "pkg/tests"):
        (tmp_path / skip).mkdir(parents=True, exist_ok=True)
        (tmp_path / skip / "inside.py").write_text("SECRET = 1\n")
    (tmp_path / "pkg" / "kept.py").write_text("y = 2\n")
    files = lm_data.source_files(tmp_path)
    assert "pkg/kept.py" in files and not any("inside" in f for f in files)
    c1 = lm.load_corpus(4096, held_out_fraction=0.3, root=tmp_path)
    assert b"SECRET" not in bytes(c1.train.tolist()) + bytes(c1.held_out.tolist())
    (tmp_path / c1.train_files[0]).write_text("changed = True\n")
    lm_data._read.cache_clear()          # a changed file is a new corpus (the per-process cache aside)
    assert lm.load_corpus(4096, held_out_fraction=0.3, root=tmp_path).digest != c1.digest


def test_unigram_baseline_of_uniform_bytes_is_eight_bits():
    every = torch.arange(256, dtype=torch.uint8).repeat(4)
    assert lm.unigram_bits_per_byte(every, every) == pytest.approx(8.0)


# ------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_step_logits_match_the_full_forward(n_kv_head):
    """The cached path's fp32 error against an fp64 copy is at most twice the full forward's."""
    model = _model(n_kv_head)
    ref_model = _model(n_kv_head).double()
    idx = torch.randint(0, 256, (3, 41))
    prompt_len = 7
    ref = ref_model(idx)[:, prompt_len - 1:].double()                      # (3, 35, 256)
    full_err = (model(idx)[:, prompt_len - 1:].double() - ref).abs().max()
    cached_err = (_cached_logits(model, idx, prompt_len).double() - ref).abs().max()
    floor = 1e-6 * ref.abs().max()
    assert cached_err <= 2 * full_err + floor, (cached_err, full_err)


def test_several_tokens_per_decode_step_match_the_full_forward():
    """Scoring drafted tokens (T > 1 per decode_step) sees each token's own causal prefix."""
    model = _model(2, torch.float64)
    idx = torch.randint(0, 256, (2, 30))
    _, cache = model.prefill(idx[:, :11])
    logits, cache = model.decode_step(idx[:, 11:], cache)
    torch.testing.assert_close(logits, model(idx)[:, 11:], rtol=0, atol=1e-12)
    assert cache.length == 30


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_greedy_generation_equals_naive_random_model(n_kv_head):
    model = _model(n_kv_head, torch.float64, max_len=48)
    prompt = torch.randint(0, 256, (2, 9))
    n = 48 - 9 + 1                       # fills every position of the cache
    naive = lm.generate(model, prompt, n, cached=False)
    assert naive.shape == (2, 9 + n) and torch.equal(naive[:, :9], prompt)
    assert torch.equal(lm.generate(model, prompt, n, cached=True), naive)


def test_cached_greedy_generation_equals_naive_trained_models(smoke_models):
    _, target, draft = smoke_models
    assert target.config.n_kv_head < target.config.n_head == 4      # GQA
    assert draft.config.n_kv_head == draft.config.n_head             # no grouping
    for model in (target, draft):
        n = model.config.max_len - 8
        cached = lm.generate(model, "    def ", n)
        assert torch.equal(cached, lm.generate(model, "    def ", n, cached=False))
        assert lm.decode(cached[0]).startswith("    def ")


def test_cache_is_written_in_place_never_reallocated():
    model = _model(2)
    _, cache = model.prefill(torch.randint(0, 256, (1, 5)))
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    for _ in range(10):
        _, cache = model.decode_step(torch.randint(0, 256, (1, 1)), cache)
    assert cache.length == 15 and [t.data_ptr() for t in cache.k + cache.v] == ptrs
    assert cache.k[0].shape == (1, 2, 64, 16)
    assert cache.crop(12).length == 12


def test_kv_bytes_per_token_is_what_the_cache_reserves_per_position():
    c = lm.LMConfig(n_layer=3, n_head=6, n_kv_head=2, d_model=96, max_len=40)
    assert lm.kv_bytes_per_token(c, torch.float16) == 2 * 3 * 2 * 16 * 2
    for dtype in (torch.float32, torch.bfloat16):
        cache = lm.KVCache.empty(c, batch=1, dtype=dtype)
        assert cache.nbytes() == c.max_len * lm.kv_bytes_per_token(c, dtype)


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_value_errors_that_name_the_problem():
    model = _model(2)
    with pytest.raises(ValueError, match="max_len=64"):
        lm.generate(model, torch.zeros(65, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_len=64"):
        lm.generate(model, torch.zeros(60, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="max_len=64"):
        model.prefill(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        lm.generate(model, "", 5)
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="prefill"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), model.new_cache(1))
    _, cache = model.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="one row per sequence"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        lm.generate(model, torch.tensor([3, 300]), 2)
    with pytest.raises(ValueError, match="divide n_head"):
        lm.LMConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="multiple of n_head"):
        lm.LMConfig(n_head=3, d_model=64)
    with pytest.raises(ValueError, match="even"):
        lm.LMConfig(n_head=4, d_model=36)
    with pytest.raises(ValueError, match="unknown model"):
        lm.load("huge", "smoke")
    with pytest.raises(ValueError, match="seq_len"):
        lm.train.train(lm.LMConfig(max_len=32), lm.TrainConfig(steps=1, batch=1, seq_len=64), lm.load_corpus(4096))


def test_decode_past_max_len_raises():
    model = _model(1, max_len=16)
    _, cache = model.prefill(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len=16"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)


# ------------------------------------------------------------------------------------ training


def test_bits_per_byte_of_a_uniform_model_is_eight():
    model = _model(2)
    torch.nn.init.zeros_(model.head.weight)              # every logit 0: uniform over 256 bytes
    data = torch.randint(0, 256, (300,), dtype=torch.uint8)
    assert lm.bits_per_byte(model, data, seq_len=32) == pytest.approx(8.0, abs=1e-5)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    tc = lm.TrainConfig(steps=100, batch=1, seq_len=8, lr=1e-2, warmup=10, min_lr_frac=0.1)
    lrs = [lm.train.lr_at(s, tc) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(1e-3)


def test_training_beats_the_unigram_baseline(smoke_models):
    _, target, draft = smoke_models
    for model in (target, draft):
        log = model.train_log
        assert log["held_out_bpb"] < log["unigram_bpb"] - 0.2, log
        first, last = log["train_loss"][:10], log["train_loss"][-10:]
        assert sum(last) < sum(first)
    corpus = lm.load_corpus(lm.sizes("smoke").corpus_bytes)
    assert lm.bits_per_byte(target, corpus.held_out[:16_384]) == pytest.approx(
        target.train_log["held_out_bpb"], rel=1e-4)


def test_training_is_seeded_and_leaves_the_callers_random_state_alone():
    S = lm.sizes("smoke")
    tc = replace(S.draft_train, steps=5)
    corpus = lm.load_corpus(S.corpus_bytes)
    state = torch.random.get_rng_state()
    a, _ = lm.train.train(S.draft, tc, corpus, threads=1)
    b, _ = lm.train.train(S.draft, tc, corpus, threads=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------------------------ disk cache


def test_second_load_is_fast_and_gives_identical_weights(smoke_models, capsys):
    folder, target, _ = smoke_models
    state = torch.random.get_rng_state()
    t0 = time.perf_counter()
    again = lm.load("target", "smoke", device="cpu", cache_dir=folder)
    assert time.perf_counter() - t0 < 1.0
    assert "training" not in capsys.readouterr().out
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.cache_file == target.cache_file and again.train_log == target.train_log
    mine, theirs = target.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_cache_key_covers_config_training_and_corpus():
    S = lm.sizes("smoke")
    key = store.cache_key(S.target, S.target_train, "corpus")
    assert key == store.cache_key(replace(S.target), S.target_train, "corpus")
    assert key != store.cache_key(replace(S.target, n_layer=3), S.target_train, "corpus")
    assert key != store.cache_key(replace(S.target, n_kv_head=4), S.target_train, "corpus")
    assert key != store.cache_key(S.target, replace(S.target_train, steps=101), "corpus")
    assert key != store.cache_key(S.target, S.target_train, "another corpus")
    # n_kv_head=None means n_head: the same model, the same key
    mha = lm.LMConfig(n_head=4)
    assert store.cache_key(mha, S.target_train, "c") == store.cache_key(replace(mha, n_kv_head=4), S.target_train, "c")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "mine"))
    assert lm.cache_dir() == tmp_path / "mine" / "lm"
    monkeypatch.delenv(store.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lm.cache_dir() == tmp_path / "xdg" / "effdl" / "lm"
    assert lm.cache_dir(tmp_path / "given") == tmp_path / "given" / "lm"


_UNPICKLED = []


def _mark():
    _UNPICKLED.append("ran")


class _Payload:
    """Pickled code: unpickling it (weights_only=False) would call ``_mark``."""

    def __reduce__(self):
        return (_mark, ())


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "wrong key":
        doc = torch.load(path, weights_only=True)
        torch.save({**doc, "key": "0" * 64}, path)
    elif how == "pickled code":
        doc = torch.load(path, weights_only=True)
        torch.save({**doc, "log": _Payload()}, path)


@pytest.mark.parametrize("how", ["truncated", "wrong key", "pickled code"])
def test_a_corrupt_or_mismatched_file_is_retrained(smoke_models, tmp_path, capsys, how):
    folder, _, draft = smoke_models
    path = tmp_path / "lm" / draft.cache_file.name
    path.parent.mkdir()
    shutil.copy(draft.cache_file, path)
    _corrupt(path, how)
    model = lm.load("draft", "smoke", device="cpu", cache_dir=tmp_path)
    assert "training" in capsys.readouterr().out and not _UNPICKLED
    assert model.train_log["held_out_bpb"] < model.train_log["unigram_bpb"]
    lm.load("draft", "smoke", device="cpu", cache_dir=tmp_path)  # the rewritten file is trusted
    assert "training" not in capsys.readouterr().out


def test_lm_is_a_shared_library_not_a_chapter():
    """Regression guard: a ``sizes`` module in effdl/lm would make the chapter contract treat it as a
    chapter (and demand a bench, checks, plots and a page); its table lives in ``profiles``."""
    assert not chapters.is_chapter("lm")
    assert set(lm.SIZES) == {"smoke", "cpu", "gpu"}
    for S in lm.SIZES.values():
        assert S.draft.vocab == S.target.vocab and S.draft.max_len == S.target.max_len
        assert S.target_train.seq_len <= S.target.max_len and S.draft_train.seq_len <= S.draft.max_len


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_decode_backends_agree(n_kv_head):
    """The fused default and the attention chapter's split-KV decode give the same logits, for one
    token and for several fed at once (bottom-right causal), with grouped K/V."""
    m = _model(n_kv_head, torch.float64)
    idx = torch.randint(0, 256, (2, 19))
    outs = {}
    for backend in lm.model.DECODE_BACKENDS[:2]:
        m.set_decode_backend(backend)
        _, cache = m.prefill(idx[:, :11])
        a, _ = m.decode_step(idx[:, 11:12], cache)
        b, _ = m.decode_step(idx[:, 12:], cache)
        outs[backend] = torch.cat([a, b], 1)
    m.set_decode_backend("sdpa")
    full = m(idx)[:, 11:]
    for out in outs.values():
        torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="decode backend must be one of"):
        m.set_decode_backend("flash")
