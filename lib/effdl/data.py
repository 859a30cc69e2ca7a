"""Image datasets for the course, as tensors.

- ``digits`` (default, offline): scikit-learn's bundled 8×8 handwritten digits (1797 images,
  10 classes), split once into a fixed stratified train/test split. Needs no network.
- ``shapes`` (offline, procedural): :mod:`effdl.data_shapes` at :data:`SHAPES_SIZES` — 16×16
  colour images of 10 shape families, each class in several unrelated appearances (modes).
  It alone has a held-out ``val`` split (the same modes, other samples) for choosing
  hyper-parameters without looking at ``test``.
- ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: Hugging Face hub datasets through the
  ``datasets`` library (cached in ``~/.cache/huggingface`` or ``cache_dir``). Used by the ``gpu``
  profile on Colab. Offline with no cache gives a :class:`DatasetUnavailable` error that says what to do.

Every loader returns an :class:`ImageData`: ``x`` float32 ``(n, C, H, W)`` in ``[0, 1]``, ``y`` int64
``(n,)``, ``classes`` the class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["ImageData", "HubSpec", "HUB_DATASETS", "SHAPES_SIZES", "DatasetUnavailable", "load_images",
           "shape_alike", "hub_to_tensors", "class_balanced_subset"]


class ImageData(NamedTuple):
    x: torch.Tensor          # (n, C, H, W) float32 in [0, 1]
    y: torch.Tensor          # (n,) int64
    classes: list[str]


@dataclass(frozen=True)
class HubSpec:
    hub_id: str              # the dataset's id on the Hugging Face hub
    image_key: str           # column with the PIL image
    label_key: str           # column with the integer label
    channels: int
    side: int                # images are side x side
    n_classes: int


HUB_DATASETS: dict[str, HubSpec] = {
    "mnist": HubSpec("ylecun/mnist", "image", "label", 1, 28, 10),
    "fashion_mnist": HubSpec("zalando-datasets/fashion_mnist", "image", "label", 1, 28, 10),
    "cifar10": HubSpec("uoft-cs/cifar10", "img", "label", 3, 32, 10),
    "cifar100": HubSpec("uoft-cs/cifar100", "img", "fine_label", 3, 32, 100),
}


#: ``shapes`` as load_images builds it: image side, and images per class in each split
#: (why 16×16, the generator's smallest side: a ConvNet step costs ~4× less than at 32×32)
SHAPES_SIZES = {"size": 16, "train": 300, "val": 100, "test": 100}


class DatasetUnavailable(RuntimeError):
    """The dataset can't be loaded here (no network and no cached copy, or `datasets` missing)."""


def _digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # pixel values are 0..16
    idx_train, idx_test = train_test_split(
        np.arange(len(d.target)), test_size=0.3, random_state=0, stratify=d.target
    )
    idx = idx_train if split == "train" else idx_test
    return ImageData(
        x=torch.from_numpy(x[idx])[:, None],            # (n, 1, 8, 8)
        y=torch.from_numpy(d.target[idx].astype(np.int64)),
        classes=[str(c) for c in d.target_names],
    )


def hub_to_tensors(ds: Any, spec: HubSpec) -> ImageData:
    """Convert a ``datasets.Dataset`` with the hub's schema (PIL images + ClassLabel) to tensors."""
    missing = {spec.image_key, spec.label_key} - set(ds.column_names)
    if missing:
        raise ValueError(
            f"dataset {spec.hub_id} lacks column(s) {sorted(missing)}; has {ds.column_names}"
        )
    images = [np.asarray(im.convert("RGB" if spec.channels == 3 else "L"), dtype=np.uint8)
              for im in ds[spec.image_key]]
    arr = np.stack(images).astype(np.float32) / 255.0
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)  # -> (n, C, H, W)
    feature = ds.features[spec.label_key]
    classes = list(getattr(feature, "names", None) or sorted({int(v) for v in ds[spec.label_key]}))
    return ImageData(torch.from_numpy(np.ascontiguousarray(arr)),
                     torch.tensor(ds[spec.label_key], dtype=torch.int64), [str(c) for c in classes])


def shape_alike(name: str, split: str, n_per_class: int = 12) -> ImageData:
    """Random images with ``name``'s shape and classes: the gpu-shaped smoke test's stand-in.

    Under ``EFFDL_SIMULATE_GPU`` (CI without a GPU or a network) the GPU branches still see
    ``(n, C, side, side)`` tensors of the right dataset; accuracies on them mean nothing.
    """
    spec = HUB_DATASETS[name]
    print(f"simulated GPU: {name} replaced by random images of its shape ({split}); "
          "accuracies below mean nothing")
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = n_per_class * spec.n_classes
    x = torch.rand(n, spec.channels, spec.side, spec.side, generator=g)
    y = torch.arange(spec.n_classes).repeat(n_per_class)
    return ImageData(x, y, [str(c) for c in range(spec.n_classes)])


def load_images(name: str = "digits", split: str = "train", *, cache_dir: str | None = None) -> ImageData:
    """Load ``name`` (``digits`` or ``shapes`` offline, or a hub dataset) as tensors; ``split`` is
    train or test (and, for ``shapes``, val)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if name == "shapes":
        from effdl.data_shapes import shape_data

        return shape_data(SHAPES_SIZES[split], split, size=SHAPES_SIZES["size"])
    if split == "val":
        raise ValueError(f"{name!r} has no 'val' split (only 'shapes' has one); hold out part of "
                         "its train split with class_balanced_subset instead")
    if name == "digits":
        return _digits(split)
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from digits, shapes, {', '.join(HUB_DATASETS)}")
    spec = HUB_DATASETS[name]
    from effdl.device import simulated_gpu

    if simulated_gpu():
        return shape_alike(name, split)
    try:
        import datasets
    except ImportError as exc:
        raise DatasetUnavailable(
            f"loading {name} needs the `datasets` package: `pip install datasets` "
            "(or use name='digits', which works offline)"
        ) from exc
    try:
        ds = datasets.load_dataset(spec.hub_id, split=split, cache_dir=cache_dir)
    except Exception as exc:  # offline, hub down, no cache: one clear message
        raise DatasetUnavailable(
            f"could not load {name} ({spec.hub_id}) from the Hugging Face hub or its cache: {exc}. "
            "Connect to the internet once to cache it (or set HF_HOME to a cached copy), "
            "or use name='digits', which ships with scikit-learn and needs no network."
        ) from exc
    return hub_to_tensors(ds, spec)


def class_balanced_subset(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int = 0,
                          classes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random examples of each class (sorted by class), deterministic under ``seed``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"images and labels disagree: {x.shape[0]} images but {y.shape[0]} labels")
    if per_class < 1:
        raise ValueError(f"per_class must be ≥ 1, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    labels = classes if classes is not None else torch.unique(y).tolist()
    picks = []
    for c in labels:
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, fewer than per_class={per_class}")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    sel = torch.cat(picks)
    return x[sel], y[sel]
