"""Real-size presets: abstract shapes only, parameter counts equal transformers' on the meta device."""
import json
from pathlib import Path

import jax
import pytest
import torch

from embedrl_jax.models.qwen3_vl.config import load_preset
from embedrl_jax.models.qwen3_vl.model import init_params, model_def

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "models"


def _hf_count(name):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(**json.loads((PRESETS / f"{name}.json").read_text()))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,billions",
    [("qwen3_vl_2b_instruct", 2.13), ("qwen3_vl_4b_instruct", 4.44), ("qwen3_vl_8b_instruct", 8.77)],
)
def test_parameter_count_matches_transformers(name, billions):
    mdef = model_def(load_preset(name))
    shapes = jax.eval_shape(lambda k: init_params(mdef, k), jax.random.key(0))
    ours = sum(x.size for x in jax.tree.leaves(shapes))
    assert ours == _hf_count(name)
    assert abs(ours / 1e9 - billions) < 0.05  # the sizes the model cards report


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="qwen3_vl_2b_instruct"):
        load_preset("qwen3_vl_3b")
