"""Device requirements: a request's `device` becomes the routing columns workers are matched against."""

from __future__ import annotations

from service.fleet import device_requirement, glob_to_like, like_to_glob
from service.schemas import DeviceSpec


def test_a_device_naming_nothing_is_no_requirement() -> None:
    assert device_requirement(DeviceSpec()) is None
    assert device_requirement(DeviceSpec(count=8)) is None  # the count alone says nothing about the kind


def test_a_named_device_becomes_a_lower_case_like_pattern_and_a_minimum() -> None:
    spec = DeviceSpec(type="cuda", name="NVIDIA H100*", memory_bytes=80 * 2**30, allow_extrapolation=True)
    assert device_requirement(spec) == {
        "device_type": "cuda",
        "device_name_like": "nvidia h100%",
        "device_memory_bytes": 80 * 2**30,
        "allow_extrapolation": True,
    }


def test_like_wildcards_in_a_name_are_literal_and_the_pattern_reads_back() -> None:
    assert glob_to_like("A100_40%GB?") == "a100\\_40\\%gb_"
    assert like_to_glob(glob_to_like("A100_40%GB?")) == "a100_40%gb?"
