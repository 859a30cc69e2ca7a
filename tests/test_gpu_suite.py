"""The GPU-suite glue (the suite itself needs a GPU; its pieces are tested here)."""

import pytest
import torch

from effdl.bench.gpu_suite import gpu_slug, main


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("Tesla T4", "t4"),
    ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA L4", "l4"), ("Weird Accelerator 9000", "weird-accelerator-9000"),
])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_suite_refuses_without_cuda(capsys):
    assert main(json_dir="/nonexistent") == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
