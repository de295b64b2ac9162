"""MMEB-V2 / UVRB evaluation on the toy set in the official layouts: readers, score files,
aggregate and summary, random vs informative encoders, cache reuse, bad input."""
import json
import os
import shutil

import numpy as np
import pytest
from eval_helpers import chance as _chance
from eval_helpers import informative_encode, random_encode

from embedrl_jax.eval.metrics import SCORE_KEYS
from embedrl_jax.eval.mmeb import MISSING, evaluate, summarize
from embedrl_jax.eval.readers import choose_frames, read_task
from embedrl_jax.eval.tasks import TASKS, aggregate_key
from embedrl_jax.eval.toy_set import TOY_TASKS, make_toy_eval_set
from embedrl_jax.eval.uvrb import evaluate_uvrb, read_uvrb


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_eval") / "mmeb"
    make_toy_eval_set(root, n=24)
    return str(root)


def test_readers_on_each_layout(toy):
    seen = {}
    for name in TOY_TASKS:
        data = read_task(TASKS[name], toy)
        seen[TASKS[name].modality] = True
        assert len(data.queries) == len(data.labels) > 0
        for q in data.queries:
            for p in q.get("images", []) + q.get("video", []):
                assert os.path.exists(p), p
        if data.local is not None:  # per-query lists: positive first
            for ix, lab in zip(data.local, data.labels):
                assert data.cand_names[ix[0]] == lab[0]
        else:
            assert all(set(lab) <= set(data.cand_names) for lab in data.labels)
    assert seen == {"image": True, "video": True, "visdoc": True}
    # image rules: classification text is the instruction with the marker removed, ending in "\n"
    cls = read_task(TASKS["VOC2007"], toy)
    assert cls.queries[0]["text"] == "Represent the given image for classification\n"
    assert len(cls.local[0]) == 12 and cls.queries[0]["key"].startswith("VOC2007/")
    t2i = read_task(TASKS["MSCOCO_t2i"], toy)
    assert t2i.cand_names[t2i.local[0][0]].endswith(".png") and "images" in t2i.cands[0]
    ground = read_task(TASKS["RefCOCO"], toy)
    assert ":" in ground.cand_names[0] and ground.queries[0]["text"].startswith("\nSelect")
    # video: 12 frames on disk, 8 chosen by linspace over the natural order
    vcls = read_task(TASKS["UCF101"], toy)
    frames = [os.path.basename(f) for f in vcls.queries[0]["video"]]
    assert frames == [f"frame_{i + 1}.png" for i in np.linspace(0, 11, 8).astype(int)]
    assert vcls.local is None and len(vcls.cands) == 4
    vret = read_task(TASKS["MSR-VTT"], toy)
    assert vret.local is None and len(vret.cands) == 24 and vret.labels[0] == ["video0"]
    # visdoc: graded qrels, score-0 rows dropped
    doc = read_task(TASKS["ViDoSeek-doc"], toy)
    assert sorted(doc.rel_scores[0]) == [2.0, 2.0, 3.0] and len(doc.labels[0]) == 3
    # UVRB
    q, c, cids, pos = read_uvrb(os.path.join(toy, "uvrb"), "MSRVTT")
    assert len(q) == len(pos) == 24 and len(c) == 24 and len(c[0]["video"]) == 8


def test_choose_frames_keeps_short_folders_whole(tmp_path):
    from PIL import Image

    for i in (1, 2, 10):
        Image.new("RGB", (8, 8)).save(tmp_path / f"f{i}.png")
    assert [os.path.basename(f) for f in choose_frames(str(tmp_path))] == ["f1.png", "f2.png", "f10.png"]
    assert [os.path.basename(f) for f in choose_frames(str(tmp_path), natural=False)] == ["f1.png", "f10.png", "f2.png"]


def test_harness_scores_random_near_chance_and_informative_above_on_every_layout(toy, tmp_path):
    """Metric and layout sanity on all 8 tasks (video and documents included) in seconds, with
    hand-made encoders; the trained toy Embedder itself is scored in
    test_train_embedder.py::test_toy_training_lowers_loss_and_beats_chance."""
    rand = evaluate(random_encode, toy, tmp_path / "rand", model_tag="rand")["summary"]["tasks"]
    good = evaluate(informative_encode, toy, tmp_path / "good", model_tag="good")["summary"]["tasks"]
    assert set(rand) == set(good) == set(TOY_TASKS)
    gaps_rand, gaps_good = [], []
    for name in TOY_TASKS:
        if TASKS[name].modality == "visdoc":
            continue
        chance = 100 * _chance(read_task(TASKS[name], toy))
        gaps_rand.append(rand[name] - chance)
        gaps_good.append(good[name] - chance)
        assert good[name] > chance + 10, (name, good[name], chance)
    assert abs(np.mean(gaps_rand)) < 8, gaps_rand
    assert np.mean(gaps_good) > 35, gaps_good
    assert good["ViDoSeek-doc"] > rand["ViDoSeek-doc"] + 15


def test_bundled_oracle_tcots_match_every_item(toy, tmp_path):
    out = evaluate(informative_encode, toy, tmp_path / "o", model_tag="m", tcot_dir=os.path.join(toy, "tcot"),
                   log=lambda m: None)
    for r in out["records"]:
        assert r["tcot_hits"] == {"query": r["queries"], "candidate": r["candidates"]}, r


def test_score_files_aggregate_and_summary(toy, tmp_path):
    out = tmp_path / "out"
    res = evaluate(informative_encode, toy, out, tasks="VOC2007,MSR-VTT,ViDoSeek-doc", model_tag="m",
                   metadata={"model_name": "toy"})
    obj = json.loads((out / "VOC2007_score.json").read_text())
    assert list(obj) == list(SCORE_KEYS)
    assert (out / "VOC2007_score.json").read_text().startswith('{\n    "hit@1"')  # indent=4
    pred = [json.loads(line) for line in (out / "VOC2007_pred.jsonl").read_text().splitlines()]
    assert len(pred) == obj["num_data"] == 24 and set(pred[0]) == {"prediction", "label", "rel_scores"}
    agg = json.loads((out / "aggregate.json").read_text())
    assert list(agg) == ["metadata", "metrics"] and list(agg["metrics"]) == ["image", "video", "visdoc"]
    assert [len(agg["metrics"][m]) for m in ("image", "video", "visdoc")] == [36, 18, 24]
    assert agg["metrics"]["image"]["ImageNet-1K"] == MISSING
    assert "ViDoSeek-page-fixed" in agg["metrics"]["visdoc"] and agg["metadata"]["model_name"] == "toy"
    assert all(isinstance(v, str) for v in agg["metadata"].values())
    s = res["summary"]
    tasks = s["tasks"]
    assert s["overall"]["score"] == pytest.approx(np.mean(list(tasks.values())))  # mean over tasks
    assert s["modalities"]["video"]["score"] == pytest.approx(tasks["MSR-VTT"])
    assert tasks["ViDoSeek-doc"] == pytest.approx(100 * json.loads((out / "ViDoSeek-doc_score.json").read_text())["ndcg_linear@5"])
    # summarize rebuilds the same summary from the files alone, and marks deleted tasks missing
    (out / "aggregate.json").unlink()
    again = summarize(out)["summary"]
    assert again["tasks"] == tasks
    (out / "MSR-VTT_score.json").unlink()
    agg = json.loads((out / "aggregate.json").read_text()) if summarize(out) else None
    assert agg["metrics"]["video"]["MSR-VTT"] == MISSING
    assert aggregate_key("MMLongBench-page") == "MMLongBench-page-fixed"


def test_cached_rerun_equals_fresh_and_tcot_variant_recomputes_only_what_changed(toy, tmp_path):
    calls = []

    def counting(items):
        calls.append(len(items))
        return informative_encode(items)

    out = tmp_path / "out"
    tasks = "VOC2007,MSCOCO_t2i"
    first = evaluate(counting, toy, out, tasks=tasks, model_tag="m")
    n_first = sum(calls)
    files = {f: (out / f).read_text() for f in ("VOC2007_score.json", "MSCOCO_t2i_pred.jsonl")}
    calls.clear()
    second = evaluate(counting, toy, out, tasks=tasks, model_tag="m")
    assert sum(calls) == 0 and second["summary"]["tasks"] == first["summary"]["tasks"]
    assert {f: (out / f).read_text() for f in files} == files
    fresh = evaluate(informative_encode, toy, tmp_path / "fresh", tasks=tasks, model_tag="m")
    assert fresh["summary"]["tasks"] == first["summary"]["tasks"]
    assert (tmp_path / "fresh" / "MSCOCO_t2i_pred.jsonl").read_text() == files["MSCOCO_t2i_pred.jsonl"]
    # a T-CoT variant: T-CoTs for 3 VOC2007 queries -> only those 3 items are embedded again
    data = read_task(TASKS["VOC2007"], toy)
    tdir = tmp_path / "tcot" / "VOC2007"
    tdir.mkdir(parents=True)
    rows = [{"key": q["key"], "cot": "<thinking>a shape {\"bbox_2d\": [0, 0, 500, 500]}</thinking><answer>x</answer>"}
            for q in data.queries[:3]]
    (tdir / "query.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls.clear()
    evaluate(counting, toy, out, tasks=tasks, model_tag="m", tcot_dir=tmp_path / "tcot")
    assert sum(calls) == 3 and n_first > 3


def test_bad_input_is_named(toy, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(toy, root)
    # a task folder missing its file names the task and the folder
    for f in (root / "MMEB_Test_Instruct" / "GQA").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"task GQA: no annotations file .*GQA"):
        evaluate(informative_encode, root, tmp_path / "o1", tasks="GQA")
    shutil.rmtree(root / "visdoc-tasks" / "ViDoSeek-doc" / "qrels")
    with pytest.raises(FileNotFoundError, match=r"task ViDoSeek-doc: qrels folder .*qrels"):
        evaluate(informative_encode, root, tmp_path / "o1", tasks="ViDoSeek-doc")
    # a missing query image stops with the task and row, or is counted and skipped
    os.remove(root / "image-tasks" / "VOC2007" / "q003.png")
    with pytest.raises(FileNotFoundError, match=r"task VOC2007: row 3: query image"):
        evaluate(informative_encode, root, tmp_path / "o2", tasks="VOC2007")
    evaluate(informative_encode, root, tmp_path / "o3", tasks="VOC2007", skip_missing=True)
    obj = json.loads((tmp_path / "o3" / "VOC2007_score.json").read_text())
    assert obj["num_skipped"] == 1 and obj["num_data"] == 23 and list(obj)[:26] == list(SCORE_KEYS)
    # a missing frame folder, with the skip flag, is counted the same way
    shutil.rmtree(root / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / "video5")
    evaluate(informative_encode, root, tmp_path / "o3", tasks="MSR-VTT", skip_missing=True)
    assert json.loads((tmp_path / "o3" / "MSR-VTT_score.json").read_text())["num_skipped"] == 1
    # a T-CoT cache whose keys match nothing says so
    tdir = tmp_path / "tcot" / "VOC2007"
    tdir.mkdir(parents=True)
    (tdir / "query.jsonl").write_text(json.dumps({"key": "nothing/like/this.png||", "cot": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"none of its 1 keys match the 23 query items"):
        evaluate(informative_encode, root, tmp_path / "o4", tasks="VOC2007", skip_missing=True,
                 tcot_dir=tmp_path / "tcot")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(informative_encode, root, tmp_path / "o5", tasks="NoSuchTask")


def test_uvrb_scores_and_both_averages(toy, tmp_path):
    s = evaluate_uvrb(informative_encode, os.path.join(toy, "uvrb"), tmp_path, model_tag="m", log=lambda m: None)
    obj = json.loads((tmp_path / "MSRVTT_score.json").read_text())
    assert obj["main_metric"] == "R@1" and obj["P@1"] == obj["R@1"] and obj["R@50"] == 1.0  # 24 videos < 50
    assert obj["R@1"] <= obj["R@5"] <= obj["R@10"]
    assert s["avg_datasets"] == pytest.approx(100 * obj["R@1"]) and s["datasets_present"] == 1
    assert s["abilities"]["TXT"] == s["abilities"]["CG"] == pytest.approx(100 * obj["R@1"])
    assert s["abilities"]["VIS"] is None and s["avg_abilities"] == pytest.approx(100 * obj["R@1"])
    r = evaluate_uvrb(random_encode, os.path.join(toy, "uvrb"), tmp_path / "r", model_tag="r", log=lambda m: None)
    assert r["avg_datasets"] < s["avg_datasets"]


def test_uvrb_ability_average_matches_the_gve_check():
    from embedrl_jax.eval.uvrb import ABILITIES

    assert set(ABILITIES) == {"TXT", "CMP", "VIS", "CG", "FG", "LC"} and len(ABILITIES["TXT"]) == 12
    assert np.mean([61.9, 30.4, 64.7, 55.2, 54.1, 76.4]) == pytest.approx(57.1, abs=0.05)


def test_visdoc_parquet_rows_with_page_bytes_are_written_once(toy, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    base = tmp_path / "copy" / "visdoc-tasks" / "ViDoSeek-doc"
    shutil.copytree(os.path.join(toy, "visdoc-tasks", "ViDoSeek-doc"), base)
    rows = []
    for line in (base / "corpus" / "test.jsonl").read_text().splitlines():
        cid = json.loads(line)["corpus-id"]
        png = base / "images" / f"{cid}.png"
        rows.append({"corpus-id": cid, "image": {"bytes": png.read_bytes(), "path": None}})
        png.unlink()
    (base / "corpus" / "test.jsonl").unlink()
    pq.write_table(pa.Table.from_pylist(rows), base / "corpus" / "test-00000-of-00001.parquet")
    data = read_task(TASKS["ViDoSeek-doc"], tmp_path / "copy")
    assert len(data.cands) == len(rows) and os.path.exists(data.cands[0]["images"][0])
    ref = read_task(TASKS["ViDoSeek-doc"], toy)
    assert data.labels == ref.labels and data.rel_scores == ref.rel_scores


def test_moment_retrieval_layouts(tmp_path):
    from PIL import Image

    from embedrl_jax.eval.toy_set import _jsonl

    root = tmp_path / "m"
    fr = root / "video-tasks" / "frames" / "video_mret"

    def clip(folder, n=3):
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(folder / f"{i}.jpg")

    for c in ("query", "positive_0", "negative_1", "negative_2"):
        clip(fr / "QVHighlight" / "vidA" / c)
    _jsonl(str(root / "video-annotations" / "QVHighlight" / "test.jsonl"), [{"query": "a dog runs", "video_path": "vidA.mp4"}])
    d = read_task(TASKS["QVHighlight"], root)
    assert d.labels == [["vidA/positive_0"]] and len(d.local[0]) == 3 and len(d.queries[0]["video"]) == 3
    for c in ("p1", "p2", "n1", "q"):
        clip(fr / "MomentSeeker" / c)
    _jsonl(str(root / "video-annotations" / "MomentSeeker" / "test.jsonl"),
           [{"query": "find it", "input_frames": "q.mp4", "positive_frames": [{"output_path": "p1.mp4"},
             {"output_path": "p2.mp4"}], "negative_frames": [{"output_path": "n1.mp4"}]}])
    d = read_task(TASKS["MomentSeeker"], root)
    assert d.labels == [["p1", "p2"]] and [d.cand_names[i] for i in d.local[0]] == ["p1", "p2", "n1"]
    assert len(d.queries[0]["video"]) == 3
    s, _ = __import__("embedrl_jax.eval.mmeb", fromlist=["score_task"]).score_task(
        d, np.eye(3, dtype=np.float32)[[1]], np.eye(3, dtype=np.float32))
    assert s["hit@1"] == 1.0 and s["recall@1"] == 0.5 and s["recall@5"] == 1.0  # two labels
