"""The README's main job, end to end on the tiny model: conversion both ways and parity."""
import json

import pytest

from embedrl_jax.cli import main


@pytest.mark.slow
def test_selfcheck_passes_and_writes_its_report(tmp_path):
    assert main(["selfcheck", "--workdir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "selfcheck.json").read_text())
    assert report["ok"] and report["round_trip"]["bit_identical"]
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert set(report["parity"]) == {"text", "one image", "two samples, padded", "video"}
    assert max(v["max_abs_vs_transformers"] for v in report["parity"].values()) <= 1e-4
