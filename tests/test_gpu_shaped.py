"""Every chapter's GPU branches, run on a machine without a GPU.

``EFFDL_SIMULATE_GPU=t4`` makes the device report describe a Colab T4 (sm_75: no bf16, no Triton,
no SDPA flash backend) while tensors stay on the CPU, and turns the smoke profile *gpu-shaped*: the
gpu profile's settings (datasets, caches, thread policy) at smoke sizes.  Each notebook then takes
the branches a Colab student's run takes — the skips, the dataset, the device rule — in seconds.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from effdl import chapters
from effdl.device import capabilities, live_device, simulated_gpu
from effdl.profile import gpu_shaped, sizes

ROOT = Path(__file__).resolve().parents[1]
SHOWN_WIDTH = 88        # characters of code the site's column shows without cutting


def test_simulated_t4_is_described_and_tensors_stay_on_the_cpu(monkeypatch):
    monkeypatch.setenv("EFFDL_SIMULATE_GPU", "T4")
    caps = capabilities()
    assert (caps.device, caps.compute_capability, caps.simulated) == ("cuda", (7, 5), True)
    assert not (caps.bf16 or caps.triton_gpu or caps.sdpa_flash)
    assert live_device(caps).type == "cpu"
    monkeypatch.setenv("EFFDL_SIMULATE_GPU", "v100")
    with pytest.raises(ValueError, match="EFFDL_SIMULATE_GPU='v100'.*t4"):
        simulated_gpu()


def test_gpu_shaped_profile_takes_gpu_settings_and_smoke_sizes(monkeypatch):
    monkeypatch.setenv("EFFDL_PROFILE", "smoke")
    monkeypatch.setenv("EFFDL_SIMULATE_GPU", "t4")
    for name in chapters.names():
        table = chapters.module(name, "sizes").SIZES
        shaped = sizes(name)
        assert shaped == gpu_shaped(table["gpu"], table["smoke"])
        for field, value in vars(shaped).items():
            gpu, smoke = getattr(table["gpu"], field), getattr(table["smoke"], field)
            assert value == (gpu if gpu is None or isinstance(gpu, (str, bool)) else smoke), (name, field)
    assert sizes("distill").dataset == "cifar10"          # the GPU branch's dataset, not digits
    monkeypatch.delenv("EFFDL_SIMULATE_GPU")
    assert sizes("distill").dataset == "digits"


@pytest.mark.slow
@pytest.mark.parametrize("stem", chapters.names())
def test_chapter_runs_gpu_shaped(stem, monkeypatch):
    monkeypatch.setenv("EFFDL_PROFILE", "smoke")
    monkeypatch.setenv("EFFDL_SIMULATE_GPU", "t4")          # the kernel inherits this environment
    nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Tesla T4 (simulated" in text and "gpu-shaped" in text
    # the library code the page shows (show_source) must fit the site's code column
    shown = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "```python" in o.get("data", {}).get("text/markdown", "")]
    assert shown, "no show_source output seen"
    wide = [f"{md.splitlines()[0]} ({len(line)} chars): {line.strip()[:60]}"
            for md in shown for line in md.splitlines() if len(line) > SHOWN_WIDTH]
    assert not wide, f"{len(wide)} shown lines wider than {SHOWN_WIDTH} characters:\n" + "\n".join(wide)
