"""The GPU-suite glue (the suite itself needs a GPU; its pieces are tested here)."""

import pytest
import torch

from effdl.bench.gpu_suite import gpu_slug, main, ratio_summary


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("Tesla T4", "t4"),
    ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA L4", "l4"), ("Weird Accelerator 9000", "weird-accelerator-9000"),
])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


def test_ratio_summary_matches_configs():
    rows = [{"impl": "sdpa_flash", "N": 4096, "tflops": 200.0}, {"impl": "triton", "N": 4096, "tflops": 190.0},
            {"impl": "triton", "N": 1024, "tflops": 50.0}]
    assert ratio_summary(rows, key="tflops", impl="triton", baseline="sdpa_flash", group=("N",)) == [
        {"N": 4096, "triton/sdpa_flash": 0.95}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_suite_refuses_without_cuda(capsys):
    assert main(json_dir="/nonexistent") == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
