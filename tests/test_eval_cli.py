"""The CLI verbs end to end with a tiny random Embedder: `eval mmeb` (a random model scores near
chance on the toy set; a rerun reuses the cache), `eval summarize`, `encode` (Matryoshka, equal
to Embedder.encode) and `search`."""
import json

import numpy as np
import pytest
from tiny import save_tiny_embedder_dir

from embedrl_jax.cli import main
from embedrl_jax.eval.readers import read_task
from embedrl_jax.eval.tasks import TASKS
from embedrl_jax.eval.toy_set import make_toy_eval_set

SLOW = pytest.mark.slow  # tiny-model forwards over images and 8-frame videos: ~1.5 minutes


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_embedder")
    return save_tiny_embedder_dir(path)


@SLOW
def test_eval_mmeb_summarize_encode_search(embedder_dir, tmp_path, capsys):
    root = tmp_path / "toy"
    make_toy_eval_set(root, n=12, size=32)
    out = tmp_path / "out"
    tasks = "VOC2007,MSCOCO_i2t,UCF101,ViDoSeek-doc"
    args = ["eval", "mmeb", "--embedder", str(embedder_dir), "--data-root", str(root), "--out", str(out),
            "--tasks", tasks, "--batch-size", "8"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    chance = {}
    for name in ("VOC2007", "MSCOCO_i2t", "UCF101"):
        d = read_task(TASKS[name], root)
        chance[name] = 100 * float(np.mean([1 / len(set(ix)) for ix in d.local])) if d.local else 100 / len(d.cands)
    gap = np.mean([summary["tasks"][n] - chance[n] for n in chance])
    assert abs(gap) < 25, (summary["tasks"], chance)  # a random model: near chance
    first = (out / "VOC2007_score.json").read_text()
    log = [json.loads(x) for x in (out / "eval_log.jsonl").read_text().splitlines()]
    assert all(r["embedded"] > 0 for r in log)
    assert main(args) == 0  # rerun: everything from the cache, same files
    log = [json.loads(x) for x in (out / "eval_log.jsonl").read_text().splitlines()]
    assert all(r["embedded"] == 0 for r in log[4:]) and (out / "VOC2007_score.json").read_text() == first
    (out / "aggregate.json").unlink()
    assert main(["eval", "summarize", str(out)]) == 0
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg["metrics"]["image"]["VOC2007"]["hit@1"] == json.loads(first)["hit@1"]

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"c{i}", "text": t}) + "\n"
                             for i, t in enumerate(["a red circle", "a blue square", "a green triangle"])))
    assert main(["encode", "--embedder", str(embedder_dir), "--items", str(items), "--out", str(tmp_path / "idx"),
                 "--dim", "16"]) == 0
    vecs = np.load(tmp_path / "idx" / "embeddings.npy")
    from embedrl_jax import Embedder

    ref = Embedder.from_pretrained(embedder_dir).encode([{"text": t} for t in
                                                        ["a red circle", "a blue square", "a green triangle"]], dim=16)
    assert vecs.shape == (3, 16) and vecs.dtype == np.float32
    np.testing.assert_allclose(vecs, ref, atol=1e-5)
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "idx"), "--k", "2",
                 "--exact"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["top"][0]["id"] for r in rows] == ["c0", "c1", "c2"]  # each vector finds itself first


def test_toy_set_verb(tmp_path):
    assert main(["eval", "toy-set", str(tmp_path / "t"), "--n", "4"]) == 0
    assert json.loads((tmp_path / "t" / "toy_eval.json").read_text())["counts"]["VOC2007"] == 4
    assert main(["eval", "toy-set", str(tmp_path / "t"), "--n", "5"]) == 2  # another config: refuses


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["eval", "mmeb", "--embedder", str(tmp_path), "--data-root", str(tmp_path / "nope")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main(["eval", "summarize", str(tmp_path / "nope")]) == 2


def test_input_overrides_parse_into_an_input_config():
    from embedrl_jax.infer import input_config

    cfg = input_config(["image_min_tokens=4", "image_max_tokens=16", "num_frames=4", "max_text_tokens=none", "video_as_images=true",
                        "video_fps=1.5", "suffix=Embed:"])
    assert (cfg.image_max_tokens, cfg.num_frames, cfg.max_text_tokens, cfg.video_as_images, cfg.video_fps,
            cfg.suffix) == (16, 4, None, True, 1.5, "Embed:")
    with pytest.raises(ValueError, match="bogus"):
        input_config(["bogus=1"])
