"""Train once, then load: the shared models cached on disk.

:func:`load` trains a model on first use and saves it; later calls (any notebook, any
process) read the file back in a fraction of a second.  Where the files go, as
:mod:`effdl.data` does it (a ``cache_dir`` argument, else a cache folder in the home
directory): ``cache_dir`` if given, else ``$EFFDL_CACHE_DIR``, else
``$XDG_CACHE_HOME/effdl``, else ``~/.cache/effdl``; the models live in its ``lm/``
folder, one file per (name, profile, key), a few MB each, safe to delete.

The key is a hash of everything that decides the weights: the model and training
configs, the corpus (:attr:`effdl.lm.data.Corpus.digest`) and the source code of the
data, model and training modules.  Change any of them and the next :func:`load` trains
afresh.  A file that cannot be read, or whose content does not match its key, is
retrained and overwritten, never trusted; files are read with ``weights_only=True``
(tensors and plain values only, no pickled code).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from effdl.lm.data import load_corpus
from effdl.lm.model import ByteLM, LMConfig
from effdl.lm.profiles import sizes
from effdl.lm.train import TrainConfig, train

__all__ = ["CACHE_ENV", "NAMES", "cache_dir", "cache_key", "cache_path", "load"]

CACHE_ENV = "EFFDL_CACHE_DIR"
NAMES = ("target", "draft")
FORMAT = 1                       # bump when the file layout changes
#: the modules whose code decides the weights (this folder)
SOURCES = ("data.py", "model.py", "train.py")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of the cached models (see the module docstring)."""
    if path is None:
        path = os.environ.get(CACHE_ENV) or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effdl"
    return Path(path).expanduser() / "lm"


def _source_digest() -> str:
    """sha256 of the modules whose code decides the weights."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(Path(__file__).with_name(name).read_bytes())
    return h.hexdigest()


def cache_key(config: LMConfig, tc: TrainConfig, corpus_digest: str) -> str:
    """A hex digest of (model config, training config, corpus, library source)."""
    what = {"format": FORMAT, "config": config.as_dict(), "train": tc.as_dict(),
            "corpus": corpus_digest, "source": _source_digest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def cache_path(name: str, profile: str, key: str, directory=None) -> Path:
    return cache_dir(directory) / f"{name}-{profile}-{key[:16]}.pt"


def _read(path: Path, key: str, config: LMConfig):
    """(model, log) from ``path``, or (None, why) when it can't be trusted."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None, "its key does not match"
        if LMConfig(**doc["config"]) != config:
            return None, "its config does not match"
        with torch.random.fork_rng(devices=[]):   # the random init is overwritten:
            model = ByteLM(config)                 # leave the caller's random state be
        model.load_state_dict(doc["state_dict"])   # strict: every tensor, right shapes
        return model, doc["log"]
    except Exception as exc:   # unreadable, truncated, wrong layout: all mean "retrain"
        return None, f"it could not be read ({type(exc).__name__}: {exc})"


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(doc, tmp)
    # why write then rename: a reader (another notebook building at the same time)
    # sees the old file or the whole new one, never half of it
    os.replace(tmp, path)


def load(name: str = "target", profile: str | None = None, device=None,
         cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> ByteLM:
    """The trained ``name`` model (``"target"`` or ``"draft"``) of ``profile``, in
    eval mode.

    Trains it on first use (on ``device``, default :func:`effdl.device.live_device`)
    and caches it; later calls read the file.  The training log is ``model.train_log``
    (see :func:`effdl.lm.train.train`) and the file ``model.cache_file``.
    """
    from effdl.device import live_device
    from effdl.profile import current

    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(NAMES)}")
    profile = current(profile)
    S = sizes(profile)
    if name == "target":
        config, tc = S.target, S.target_train
    else:
        config, tc = S.draft, S.draft_train
    corpus = load_corpus(S.corpus_bytes)
    key = cache_key(config, tc, corpus.digest)
    path = cache_path(name, profile, key, cache_dir)
    device = torch.device(device) if device is not None else live_device()
    model, log = _read(path, key, config) if path.exists() else (None, "no cached file")
    if model is None:
        if verbose:
            print(f"training the {profile} {name} model ({log}); it will be cached "
                  f"in {path}")
        t0 = time.perf_counter()
        model, log = train(config, tc, corpus, device, threads=S.threads)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _write(path, {"format": FORMAT, "key": key, "name": name, "profile": profile,
                      "config": config.as_dict(), "train_config": tc.as_dict(),
                      "corpus": corpus.digest, "log": log, "state_dict": state})
        if verbose:
            print(f"trained in {time.perf_counter() - t0:.1f} s: held-out "
                  f"{log['held_out_bpb']:.3f} bits/byte "
                  f"(unigram {log['unigram_bpb']:.3f})")
    model = model.to(device).eval()
    model.train_log, model.cache_file = log, path
    return model
