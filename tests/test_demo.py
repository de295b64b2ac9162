"""`embedrl demo`: the end-to-end run (slow, tiny step counts) and its stage bookkeeping."""
from __future__ import annotations

import json
import math

import pytest

from embedrl_jax.errors import UserError
from embedrl_jax.toy.demo import QUICK, VARIANTS, _Stage


def test_a_stage_is_reused_only_with_the_same_settings(tmp_path):
    st = _Stage(tmp_path, "rl", {"steps": 3})
    assert not st.done
    st.finish(1.5)
    assert _Stage(tmp_path, "rl", {"steps": 3}).done and _Stage(tmp_path, "rl", {"steps": 3}).seconds() == 1.5
    with pytest.raises(UserError, match=r"rl was made with other settings"):
        _Stage(tmp_path, "rl", {"steps": 4}).done


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun_reuses_every_stage(tmp_path):
    from embedrl_jax.cli import main

    w = tmp_path / "w"
    assert main(["demo", "--workdir", str(w), "--quick"]) == 0
    res = json.loads((w / "results.json").read_text())
    tasks = next(o for o in QUICK if o.startswith("tasks=")).split("=", 1)[1].split(",")
    assert sorted(res["tasks"]) == sorted(tasks)
    assert set(res["scores"]) == {n for n, _ in VARIANTS}
    for scores in res["scores"].values():
        assert set(scores) == set(tasks) | {"All"}
        assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in scores.values())
    assert res["rl_reward"] and all(math.isfinite(r) for r in res["rl_reward"])
    table = (w / "results.md").read_text()
    assert all(t in table for t in tasks) and "EG-RL T-CoT" in table
    for png in res["plots"]:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for stage in ("embedder", "coldstart", "rl"):  # HF exports
        assert (w / stage / "export" / "config.json").exists()
        assert list((w / stage / "export").glob("*.safetensors"))
    for variant in ("coldstart", "rl"):  # T-CoTs written for both sides of every task
        for t in tasks:
            assert (w / f"eval_{variant}" / "tcot" / t / "query.jsonl").exists()
    stamps = {p: p.stat().st_mtime_ns for p in w.glob("*/stage.json")}
    assert len(stamps) == 7
    assert main(["demo", "--workdir", str(w), "--quick"]) == 0
    assert {p: p.stat().st_mtime_ns for p in w.glob("*/stage.json")} == stamps
    assert json.loads((w / "results.json").read_text())["scores"] == res["scores"]
