"""The T4 time estimate that sizes every chapter's gpu profile (effdl.estimate)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from effdl import chapters
from effdl.estimate import T4, TIMINGS, Work, calibration, chapter_minutes, describe, seconds
from effdl.results import results_dir

MINUTES_ON_A_T4 = 10       # what a Colab student is promised per chapter


@pytest.mark.parametrize("chapter", chapters.names())
def test_gpu_profile_fits_a_colab_t4(chapter):
    minutes = chapter_minutes(chapter, "gpu", T4)
    assert minutes <= MINUTES_ON_A_T4, (
        f"{chapter}: the gpu profile is estimated at {minutes:.1f} min on a T4 "
        f"({calibration(chapter)[1]}); shrink effdl.{chapter}.sizes.SIZES['gpu']")
    assert f"about {max(1, round(minutes))} min" in describe(chapter)


@pytest.mark.parametrize("chapter", chapters.names())
def test_model_is_calibrated_by_a_recorded_build_and_not_far_off(chapter):
    factor, why = calibration(chapter)
    assert not why.startswith("uncalibrated"), why
    # the model counts only the dominant work; if the build took 5x longer than it says, it has
    # missed something big and the GPU estimate cannot be trusted either
    assert 1.0 <= factor <= 5.0, why


def test_recorded_build_covers_every_chapter_with_the_machines_peaks():
    doc = json.loads((results_dir() / TIMINGS).read_text())
    assert set(doc["meta"]["machine"]) == {"fp32_gflops", "gbs", "launch_us"}
    assert {r["notebook"] for r in doc["results"] if r["status"] == "ok"} >= set(chapters.names())


@pytest.mark.parametrize("chapter", chapters.names())
def test_model_grows_with_the_sizes(chapter):
    S = chapters.module(chapter, "sizes").SIZES["gpu"]
    work = chapters.module(chapter, "sizes").work
    bigger = replace(S, repeat=2 * S.repeat + 1) if hasattr(S, "repeat") else replace(S, seeds=S.seeds * 2)
    assert seconds(work(bigger)) > seconds(work(S))


def test_seconds_adds_the_roofline_terms():
    w = Work(flops32=T4.fp32_tflops * 1e12, bytes=T4.gbs * 1e9, ops=1e6)
    assert seconds(w, T4, efficiency=1.0) == pytest.approx(2 + 1e6 * T4.launch_us * 1e-6)
    assert seconds(2 * w, T4) == pytest.approx(2 * seconds(w, T4))
    with pytest.raises(ValueError, match="efficiency"):
        seconds(w, T4, efficiency=0)
