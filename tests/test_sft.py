"""sft-reasoner: the loss falls and greedy decoding reproduces a completion, the loss is the plain
NLL of the completion tokens, resume is exact, bad data is named or counted, the CLI verb runs."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from tiny import real_image

from embedrl_jax.data.records import RecordError
from embedrl_jax.models.qwen3_vl.inputs import Buckets
from embedrl_jax.reason.reasoner import GENERATE_INPUTS
from embedrl_jax.sharding import MeshConfig, make_mesh
from embedrl_jax.train.metrics import read_metrics
from embedrl_jax.train.sft import SFTConfig, SFTDataConfig, SFTTrainer, load_sft_samples
from embedrl_jax.train.state import OptimConfig

# every prompt carries a small image: one compiled shape for every step, vision path covered
INPUTS = dataclasses.replace(GENERATE_INPUTS, image_min_tokens=4, image_max_tokens=16)
FACTS = (("apple", "red", "astronaut"), ("sky", "blue", "coffee"), ("grass", "green", "chelsea"),
         ("snow", "white", "rocket"))
STEPS = 60


def _completion(obj, color):
    return (f'<thinking>1. The {obj} is {color}. {{"text_keywords": ["{obj}"]}}</thinking>'
            f"<rethink>Yes.</rethink><answer>{color}</answer>")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base (tokenizer trained on the samples) and 16 samples: 4 prompts x 4 copies."""
    from embedrl_jax.toy.base import build_tiny_base

    root = tmp_path_factory.mktemp("sft")
    rows = []
    for obj, color, image in FACTS:
        real_image(image, (64, 96)).save(root / f"{image}.png")
        rows += [{"prompt": f"What color is the {obj}?", "completion": _completion(obj, color),
                  "images": [f"{image}.png"]}] * 4
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_tiny_base(root / "base", seed=0, corpus=[r["prompt"] for r in rows] + [r["completion"] for r in rows],
                    vocab=512)
    return {"root": root, "model": root / "base", "data": data, "rows": rows}


def _cfg(base, **kw):
    # a constant schedule keeps the compiled update independent of `steps` (compile-cache hits);
    # two micro-batches of 4: the loss check below also checks the step-wide token mean
    kw = {"model": str(base["model"]), "data": SFTDataConfig(files=(str(base["data"]),)), "inputs": INPUTS,
          "optim": OptimConfig(lr=3e-3, schedule="constant", warmup_steps=3, weight_decay=0.0),
          "buckets": Buckets(seq_min=32), "batch_size": 8, "micro_batches": 2, "steps": STEPS, "compute_dtype": "float32",
          "checkpoint_every": 1000, "async_checkpoints": False, **kw}
    return SFTConfig(**kw)


def _single():
    return make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    trainer = SFTTrainer(_cfg(base), workdir, mesh=_single())
    trainer.run(progress=False)
    return trainer, workdir


def test_loss_falls_and_greedy_decoding_reproduces_a_completion(base, trained):
    from embedrl_jax import Reasoner

    _, workdir = trained
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "tokens", "mean_logp", "grad_norm", "step_s"} <= set(rows[0])
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), losses
    model = workdir / "export"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (model / name).exists(), name
    reasoner = Reasoner.from_pretrained(model, input_config=INPUTS)
    prompts = [{"text": f"What color is the {obj}?", "images": [str(base["root"] / f"{image}.png")]}
               for obj, _, image in FACTS]
    out = reasoner.generate(reasoner.prepare(prompts), max_new_tokens=48)
    hits = [out.texts[i][0] == _completion(obj, color) for i, (obj, color, _) in enumerate(FACTS)]
    assert any(hits), out.texts


def test_loss_is_the_token_mean_nll_of_the_completions(base, trained):
    """Step 1's loss (initial weights) against log_softmax of our plain logits on the full sequences."""
    import embedrl_jax

    trainer, workdir = trained
    first = read_metrics(workdir / "metrics.jsonl")[0]
    handle = embedrl_jax.load_hf(base["model"])
    idx = trainer.order.indices(0)
    seqs, targets, pix, grids = [], [], [], []
    for i in idx:
        sample = trainer.samples[i]
        prompt = trainer.reasoner.prepare([sample.prompt])  # one row: no padding
        comp = trainer.tokenizer(sample.completion, add_special_tokens=False)["input_ids"] + [trainer.eos_id]
        seqs.append(np.concatenate([prompt["input_ids"][0], comp]))
        targets.append((prompt["input_ids"].shape[1], np.asarray(comp)))
        pix.append(prompt["pixel_values"])
        grids.append(prompt["image_grid_thw"])
    length = max(map(len, seqs))
    ids = np.zeros((len(seqs), length), np.int64)
    mask = np.zeros_like(ids)
    for r, s in enumerate(seqs):  # right padding: causal logits of the real tokens are unchanged
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    types = (ids == handle.model_config.image_token_id).astype(np.int64) * mask
    logits = handle.logits(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                           pixel_values=np.concatenate(pix), image_grid_thw=np.concatenate(grids))
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    total = [float(logp[r, p - 1 + t, tok]) for r, (p, comp) in enumerate(targets) for t, tok in enumerate(comp)]
    assert first["tokens"] == len(total)
    assert abs(first["loss"] - (-np.mean(total))) < 1e-5, (first["loss"], -np.mean(total))


def test_resume_is_exact(base, tmp_path):
    cfg = _cfg(base, steps=4, checkpoint_every=2)  # 16 samples, 8 a step: crosses an epoch boundary
    straight = SFTTrainer(cfg, tmp_path / "a", mesh=_single())
    straight.run(progress=False, export=False)
    half = SFTTrainer(cfg, tmp_path / "b", mesh=_single())
    half.run(steps=2, progress=False, export=False)
    resumed = SFTTrainer(cfg, tmp_path / "b", mesh=_single())  # a fresh process would do the same
    resumed.run(progress=False, export=False)
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    assert sorted(straight.order.indices(0).tolist() + straight.order.indices(1).tolist()) == list(range(16))


def test_bad_lines_are_named_or_counted(tmp_path):
    from embedrl_jax.prompts import load_prompts, reasoner_prompt

    good = {"prompt": "What color is the sky?", "completion": _completion("sky", "blue")}
    mmeb = {"qry": "a red circle", "pos_text": "a circle that is red", "query_cot": _completion("circle", "red"),
            "pos_cot": ""}
    lines = [json.dumps(good), "{not json", json.dumps({"prompt": "no answer"}),
             json.dumps({"prompt": "blank", "completion": "  "}), json.dumps(mmeb),
             json.dumps({"qry": "", "pos_text": "x", "query_cot": "y"}), json.dumps(dict(mmeb, query_cot=""))]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 2: not valid JSON"):
        load_sft_samples(SFTDataConfig(files=(str(path),)))
    one = tmp_path / "one.jsonl"
    for k, reason in ((2, "field 'completion' is missing"), (3, "field 'completion' is empty"), (5, "no query")):
        one.write_text("\n".join([lines[0], lines[4], lines[k]]) + "\n")
        with pytest.raises(RecordError, match=rf"one\.jsonl: line 3: .*{reason}"):
            load_sft_samples(SFTDataConfig(files=(str(one),)))
    samples, report = load_sft_samples(SFTDataConfig(files=(str(path),), skip_bad=True))
    assert report.skipped == {"bad_json": 1, "missing_completion": 1, "empty_completion": 1, "missing_query": 1}
    assert report.skipped_total == 4 and report.no_tcot == 3 and report.lines == 7
    assert [s.completion for s in samples] == [good["completion"], mmeb["query_cot"]]
    assert samples[0].prompt == {"text": good["prompt"]} and "line 1" in samples[0].source
    assert samples[1].prompt == reasoner_prompt({"text": "a red circle"}, "query", load_prompts())
    assert "line 5 (query)" in samples[1].source


@pytest.mark.slow
def test_cli_runs_the_verb_and_exports(base, tmp_path):
    from embedrl_jax.cli import main

    data = tmp_path / "data.jsonl"  # absolute image paths, and one bad line (skipped and counted)
    lines = [dict(r, images=[str(base["root"] / r["images"][0])]) for r in base["rows"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{oops\n")
    args = ["sft-reasoner", "--config", "configs/sft_reasoner_example.json", "--workdir", str(tmp_path / "w"),
            "--steps", "2", f"model={base['model']}", "data.toy=false", f"data.files={json.dumps([str(data)])}",
            "data.skip_bad=true", 'lora={"rank": 4, "alpha": 8.0, "dropout": 0.0}']
    assert main(args) == 0
    rows = read_metrics(tmp_path / "w" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["skipped"] == 1
    assert (tmp_path / "w" / "export" / "config.json").exists()
    missing = ["sft-reasoner", "--workdir", str(tmp_path / "x"), "data.toy=false", 'data.files=["/no/such.jsonl"]']
    assert main(missing) == 2
