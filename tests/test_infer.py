"""Corpus inference: exact sharded top-k equals one device and numpy, FAISS equals exact search,
`encode` and `tcot generate` resume exactly after an interruption, T-CoT keys and files."""
import json

import jax
import numpy as np
import pytest
from eval_helpers import informative_encode
from tiny import image_processor, real_image, tiny_hf_model, tiny_tokenizer

from embedrl_jax import infer
from embedrl_jax.infer import (attach_tcots, encode_items_file, exact_topk, generate_tcots, load_tcots,
                               read_items, search_index, tcot_key)
from embedrl_jax.sharding import MeshConfig, make_mesh


def _ref_topk(q, c, k):
    s = q.astype(np.float64) @ c.T.astype(np.float64)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


def test_sharded_search_equals_one_device_and_numpy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 24)).astype(np.float32)
    c = rng.normal(size=(61, 24)).astype(np.float32)  # not a multiple of 8: padded rows never win
    c[40] = c[3]  # exact ties: the lower index comes first
    c[50] = c[3]
    sharded = make_mesh(MeshConfig(2, 2, 2))
    one = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    for k in (1, 10, 61, 100):  # k larger than the pool gives the whole pool, ranked
        v8, i8 = exact_topk(q, c, k, mesh=sharded, query_block=4)
        v1, i1 = exact_topk(q, c, k, mesh=one)
        vr, ir = _ref_topk(q, c, min(k, 61))
        np.testing.assert_array_equal(i8, i1)
        np.testing.assert_array_equal(i8, ir)
        np.testing.assert_allclose(v8, v1, rtol=0, atol=1e-5)
        np.testing.assert_allclose(v8, vr, rtol=0, atol=1e-4)
    tied = exact_topk(c[3:4], c, 3, mesh=sharded)[1][0]
    assert tied.tolist() == [3, 40, 50]


def _write_items(tmp_path, n=12):
    img = tmp_path / "img.png"
    real_image("astronaut", (64, 64)).save(img)
    rows = [{"id": f"t{i}", "text": f"a red circle number {i}"} for i in range(n)]
    rows[2] = {"id": "i2", "images": ["img.png"], "text": "an image"}
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_encode_resumes_exactly_and_faiss_equals_exact(tmp_path):
    items = _write_items(tmp_path, 14)
    calls = []

    def enc(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill after two finished chunks
        return informative_encode(batch)

    with pytest.raises(KeyboardInterrupt):
        encode_items_file(enc, items, tmp_path / "a", chunk=4)
    assert not (tmp_path / "a" / "embeddings.npy").exists()
    calls.clear()
    resumed = encode_items_file(lambda b: (calls.append(len(b)), informative_encode(b))[1], items, tmp_path / "a", chunk=4)
    assert calls == [4, 2]  # chunks 3 and 4 only (14 items in chunks of 4)
    fresh = encode_items_file(informative_encode, items, tmp_path / "b", chunk=4)
    np.testing.assert_array_equal(resumed, fresh)
    assert np.load(tmp_path / "a" / "embeddings.npy").dtype == np.float32
    assert [json.loads(x)["id"] for x in (tmp_path / "a" / "ids.jsonl").read_text().splitlines()][:3] == ["t0", "t1", "i2"]
    # FAISS (exact inner product) gives the exact search's ids
    pytest.importorskip("faiss")
    assert infer.build_faiss(tmp_path / "a")
    q = informative_encode([{"text": "a red circle number 3"}, {"text": "blue"}])
    vf, _, idsf = search_index(tmp_path / "a", q, 5)
    ve, _, idse = search_index(tmp_path / "a", q, 5, use_faiss=False)
    assert idsf == idse
    np.testing.assert_allclose(vf, ve, atol=1e-5)


def test_faiss_equals_exact_on_a_larger_random_pool(tmp_path):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    c = rng.normal(size=(500, 32)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    np.save(tmp_path / "embeddings.npy", c)
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"id": f"d{i}"}) + "\n" for i in range(500)))
    assert infer.build_faiss(tmp_path) and faiss is not None
    q = rng.normal(size=(20, 32)).astype(np.float32)
    vf, i_f, _ = search_index(tmp_path, q, 10)
    ve, i_e, _ = search_index(tmp_path, q, 10, use_faiss=False, mesh=make_mesh(MeshConfig(1, -1, 1)))
    np.testing.assert_array_equal(i_f, i_e)
    np.testing.assert_allclose(vf, ve, atol=1e-4)


def test_tcot_keys_and_official_files(tmp_path):
    q = {"text": "What is shown?", "image_paths": ["Task/a.png"], "images": ["/x/Task/a.png"]}
    assert tcot_key(q, "query") == "Task/a.png||What is shown?"
    assert tcot_key({"text": "a cat"}, "query") == "a cat"
    assert tcot_key({"text": "x", "images": ["p.png"]}, "candidate") == "p.png"
    assert tcot_key({"video": ["/f/vid7/1.png"]}, "candidate") == "vid7"
    assert tcot_key({"text": "t", "key": "k"}, "query") == "k"
    f = tmp_path / "official.jsonl"
    f.write_text(json.dumps({"qry_img_path": "Task/a.png", "qry_text": "What is shown?", "query_cot": "C1"}) + "\n"
                 + json.dumps({"key": "a cat", "cot": "C2"}) + "\n")
    cots = load_tcots(f)
    items, hits = attach_tcots([q, {"text": "a cat"}, {"text": "dog"}], cots, "query", source=str(f))
    assert hits == 2 and items[0]["tcot"] == "C1" and "tcot" not in items[2]
    with pytest.raises(ValueError, match="none of its 2 keys match the 1 candidate items"):
        attach_tcots([{"text": "zebra"}], cots, "candidate", source=str(f))


SHORT_PROMPTS = {"defaults": {"num_frames": 8, "fps": 2},
                 "templates": {k: "Reason: {task}" for k in
                               ("query_text", "query_image", "query_video", "query_text_video_retrieval",
                                "positive_image", "positive_text", "positive_video")}}


@pytest.fixture(scope="module")
def reasoner_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tcot_reasoner")
    tiny_hf_model(seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    image_processor(min_tokens=4, max_tokens=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reasoner(reasoner_path):
    from embedrl_jax import Reasoner

    return Reasoner.from_pretrained(reasoner_path)


@pytest.mark.slow  # ~35 s: compiles the tiny Reasoner's sampler for each prompt shape
def test_tcot_generate_resumes_exactly(reasoner, tmp_path, monkeypatch):
    _, items = read_items(_write_items(tmp_path, 7))
    items.append(dict(items[0]))  # a repeated key is generated once
    kw = dict(side="query", max_new_tokens=6, temperature=1.0, seed=5, batch_size=2, prompts=SHORT_PROMPTS,
              progress=False)
    full = generate_tcots(reasoner, items, tmp_path / "full.jsonl", **kw)
    assert len(full) == 7
    real_append = infer._append_rows
    count = {"n": 0}

    def killing_append(path, rows):
        real_append(path, rows)
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt  # killed after two chunks

    monkeypatch.setattr(infer, "_append_rows", killing_append)
    with pytest.raises(KeyboardInterrupt):
        generate_tcots(reasoner, items, tmp_path / "cut.jsonl", **kw)
    assert not (tmp_path / "cut.jsonl").exists() and (tmp_path / "cut.jsonl.partial").exists()
    monkeypatch.setattr(infer, "_append_rows", real_append)
    generated = []
    real_generate = type(reasoner).generate

    def counting_generate(self, batch, **k):
        generated.append(batch["input_ids"].shape[0])
        return real_generate(self, batch, **k)

    monkeypatch.setattr(type(reasoner), "generate", counting_generate)
    resumed = generate_tcots(reasoner, items, tmp_path / "cut.jsonl", **kw)
    assert generated == [2, 1]  # chunks 3 and 4 of [2, 2, 2, 1]
    assert resumed == full
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    assert not (tmp_path / "cut.jsonl.partial").exists()
    rows = [json.loads(x) for x in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == list(dict.fromkeys(tcot_key(it, "query") for it in items))
    assert rows[2]["key"] == "img.png||an image"


@pytest.mark.slow  # the tiny Reasoner writes T-CoTs for a small task, then the evaluation uses them
def test_eval_with_reasoner_generates_then_reuses_tcots(reasoner, tmp_path):
    from embedrl_jax.eval.mmeb import evaluate
    from embedrl_jax.eval.toy_set import make_toy_eval_set

    root = tmp_path / "toy"
    make_toy_eval_set(root, n=3, size=32)
    kw = {"max_new_tokens": 4, "batch_size": 8, "prompts": SHORT_PROMPTS}
    out = evaluate(informative_encode, root, tmp_path / "o", tasks="GQA", model_tag="m", reasoner=reasoner,
                   reasoner_kw=kw)
    rec = out["records"][0]
    assert rec["tcot_hits"] == {"query": 3, "candidate": 4}
    q = [json.loads(x) for x in (tmp_path / "o" / "tcot" / "GQA" / "query.jsonl").read_text().splitlines()]
    assert len(q) == 3 and q[0]["key"].startswith("GQA/q000.png||What color")
    again = evaluate(informative_encode, root, tmp_path / "o", tasks="GQA", model_tag="m",
                     tcot_dir=tmp_path / "o" / "tcot")
    assert again["records"][0]["embedded"] == 0 and again["summary"]["tasks"] == out["summary"]["tasks"]


@pytest.mark.slow  # the CLI verb: same file as the API call with the same settings
def test_tcot_generate_cli_equals_the_api(reasoner_path, reasoner, tmp_path):
    from embedrl_jax.cli import main

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a red circle", "a blue square", "a cat")))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(SHORT_PROMPTS))
    assert main(["tcot", "generate", "--reasoner", str(reasoner_path), "--items", str(items), "--out",
                 str(tmp_path / "cli.jsonl"), "--side", "candidate", "--max-new-tokens", "4", "--prompts", str(prompts),
                 "batch_size=2", "seed=3"]) == 0
    _, its = read_items(items)
    generate_tcots(reasoner, its, tmp_path / "api.jsonl", side="candidate", max_new_tokens=4, seed=3, batch_size=2,
                   prompts=SHORT_PROMPTS, progress=False)
    assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "api.jsonl").read_text()
    assert main(["tcot", "generate", "--reasoner", str(reasoner_path), "--items", str(items), "--out",
                 str(tmp_path / "x.jsonl"), "nosuch=1"]) == 2
