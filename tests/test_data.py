"""embedrl_jax.data: readers, array_record storage without TensorFlow, toy set, mixture sampler, grain."""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from embedrl_jax import tcot
from embedrl_jax.data import (
    MixtureSampler,
    PairRecord,
    RecordError,
    SkipReport,
    array_record_source,
    host_slice,
    load_image,
    make_toy_retrieval,
    pair_dataset,
    pair_iterator,
    read_llavahound,
    read_mmeb,
    write_array_record,
)
from embedrl_jax.data.toy import load_toy_manifest


# ------------------------------------------------------------------------------------------------
# Fixtures: real images from skimage, hand-written record files
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("media")
    (root / "imgs").mkdir()
    Image.fromarray(skimage.data.astronaut()).resize((64, 64)).save(root / "imgs" / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).resize((96, 64)).save(root / "imgs" / "coffee.png")
    Image.fromarray(skimage.data.camera()).resize((64, 64)).save(root / "imgs" / "camera.png")
    (root / "imgs" / "corrupt.png").write_bytes(b"this is not a png file at all" * 4)
    good = (root / "imgs" / "coffee.png").read_bytes()
    (root / "imgs" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "frames").mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "frames" / f"f{i}.png")
    return root


def _mmeb_rows():
    return [
        {"qry": "<|image_1|>\nFind a caption for the image.", "qry_image_path": "imgs/astronaut.png",
         "pos_text": "an astronaut", "pos_image_path": "", "neg_text": "a cup", "neg_image_path": "",
         "query_cot": "<thinking>x {\"bbox_2d\": [1, 2, 300, 400]}</thinking><rethink>y</rethink><answer>z</answer>",
         "pos_cot": ""},
        {"qry": "Find an image of coffee", "qry_image_path": "", "pos_text": "",
         "pos_image_path": "imgs/coffee.png", "query_cot": "", "pos_cot": "", "error": "timeout"},
        {"qry": "<|image_1|>", "qry_image_path": "imgs/camera.png", "pos_text": "a man with a camera",
         "pos_image_path": "imgs/camera.png"},
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_mmeb_jsonl_and_json(media):
    rows = _mmeb_rows()
    jl = _write_jsonl(media / "MSCOCO_i2t.jsonl", rows)
    js = media / "copy.json"
    js.write_text(json.dumps(rows, indent=2))
    recs, rep = read_mmeb(jl)
    recs2, _ = read_mmeb(js, dataset="MSCOCO_i2t")
    assert [r.to_dict() for r in recs] == [r.to_dict() for r in recs2]
    assert isinstance(rep, SkipReport) and rep.total == rep.kept == 3 and rep.skipped == 0
    r0, r1, r2 = recs
    img = str(media / "imgs" / "astronaut.png")
    assert r0.query == {"text": "Find a caption for the image.", "images": [img], "tcot": rows[0]["query_cot"]}
    assert r0.positive == {"text": "an astronaut"}
    assert r0.negatives == ({"text": "a cup"},)
    assert (r0.dataset, r0.key, r0.is_video) == ("MSCOCO_i2t", "MSCOCO_i2t/0", False)
    assert r1.query == {"text": "Find an image of coffee"}
    assert r1.positive == {"images": [str(media / "imgs" / "coffee.png")]} and r1.negatives == ()
    assert r2.query == {"images": [str(media / "imgs" / "camera.png")]}  # marker-only text -> image-only query
    assert r2.positive["text"] == "a man with a camera"
    # JSON round trip and hashing
    assert PairRecord.from_json(r0.to_json()) == r0
    assert len({r0, PairRecord.from_json(r0.to_json())}) == 1
    # image_root overrides the record file's folder
    sub = media / "sub"
    sub.mkdir(exist_ok=True)
    recs3, _ = read_mmeb(_write_jsonl(sub / "x.jsonl", rows), image_root=media)
    assert recs3[0].query["images"] == [img]
    no_neg, _ = read_mmeb(jl, negatives=False)
    assert no_neg[0].negatives == ()


BAD_MMEB = {
    # name: (record, reason, field, file-name fragment or None)
    "missing_image": ({"qry": "q", "qry_image_path": "imgs/nope.png", "pos_text": "p"}, "missing_image",
                      "qry_image_path", "nope.png"),
    "corrupt_image": ({"qry": "q", "pos_image_path": "imgs/corrupt.png"}, "corrupt_image", "pos_image_path",
                      "corrupt.png"),
    "empty_text": ({"qry": "  <|image_1|> ", "qry_image_path": "", "pos_text": "p"}, "missing_query", "qry", None),
    "missing_positive": ({"qry": "q", "pos_text": "   ", "pos_image_path": ""}, "missing_positive", "pos_text",
                         None),
    "bad_field": ({"qry": ["not", "a", "string"], "pos_text": "p"}, "bad_field", "qry", None),
    "missing_neg_image": ({"qry": "q", "pos_text": "p", "neg_image_path": "imgs/gone.png"}, "missing_image",
                          "neg_image_path", "gone.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_MMEB))
def test_read_mmeb_bad_records(media, case):
    bad, reason, field_name, file_part = BAD_MMEB[case]
    good = _mmeb_rows()
    rows = [good[0], good[1], bad, good[2]]
    path = _write_jsonl(media / f"bad_{case}.jsonl", rows)
    with pytest.raises(RecordError) as ei:
        read_mmeb(path)
    err = ei.value
    assert (err.index, err.field, err.reason) == (2, field_name, reason)
    msg = str(err)
    assert "record 2" in msg and repr(field_name) in msg and str(path) in msg
    if file_part:
        assert file_part in msg and err.file.endswith(file_part)
    recs, rep = read_mmeb(path, skip_bad=True)
    assert [r.key for r in recs] == [f"bad_{case}/0", f"bad_{case}/1", f"bad_{case}/3"]
    assert rep.counts == {reason: 1} and rep.total == 4 and rep.kept == 3 and rep.skipped == 1
    assert len(rep.examples) == 1 and "record 2" in rep.examples[0]


def test_read_mmeb_bad_json_and_check_modes(media):
    path = media / "broken.jsonl"
    path.write_text(json.dumps(_mmeb_rows()[0]) + "\n{not json\n\n" + json.dumps(_mmeb_rows()[1]) + "\n[1]\n")
    with pytest.raises(RecordError, match="record 1") as ei:
        read_mmeb(path)
    assert ei.value.reason == "bad_json"
    recs, rep = read_mmeb(path, skip_bad=True)
    assert len(recs) == 2 and rep.counts == {"bad_json": 1, "bad_record": 1} and rep.total == 4
    # truncated pixel data: passes the header check, fails a full decode
    trunc = _write_jsonl(media / "trunc.jsonl", [{"qry": "q", "pos_image_path": "imgs/truncated.png"}])
    assert len(read_mmeb(trunc)[0]) == 1
    with pytest.raises(RecordError, match="truncated.png") as ei:
        read_mmeb(trunc, check_images="decode")
    assert ei.value.reason == "corrupt_image" and ei.value.field == "pos_image_path"
    corrupt = _write_jsonl(media / "corrupt_exists.jsonl", [{"qry": "q", "pos_image_path": "imgs/corrupt.png"}])
    assert len(read_mmeb(corrupt, check_images="exists")[0]) == 1
    with pytest.raises(ValueError, match="check_images"):
        read_mmeb(corrupt, check_images="nope")
    # many bad records: counted per reason, examples capped
    many = _write_jsonl(media / "many.jsonl", [{"qry": "", "pos_text": "p"}] * 7 + [_mmeb_rows()[1]])
    recs, rep = read_mmeb(many, skip_bad=True)
    assert len(recs) == 1 and rep.counts == {"missing_query": 7} and len(rep.examples) == 3
    assert "skipped 7" in str(rep)


def test_load_image(media):
    im = load_image(str(media / "imgs" / "coffee.png"))
    assert im.mode == "RGB" and im.size == (96, 64)
    assert load_image(media / "imgs" / "camera.png").mode == "RGB"
    gray = load_image(np.zeros((8, 9), np.uint8))
    assert gray.mode == "RGB" and gray.size == (9, 8)
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent -> white
    assert np.asarray(load_image(rgba)).min() == 255
    assert load_image(Image.new("L", (3, 3))).mode == "RGB"
    with pytest.raises(RecordError, match="nope.png") as ei:
        load_image(str(media / "imgs" / "nope.png"))
    assert ei.value.reason == "missing_image"
    with pytest.raises(RecordError, match="corrupt.png") as ei:
        load_image(str(media / "imgs" / "corrupt.png"))
    assert ei.value.reason == "corrupt_image"
    with pytest.raises(RecordError, match="truncated.png"):
        load_image(str(media / "imgs" / "truncated.png"))
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))


def _hound_rows():
    frames = [f"f{i}.png" for i in range(4)]
    return [
        {"dataset_name": "llavahound_video_retrieval_2",
         "qry": {"conversations": [{"from": "human", "value": "<video>\nDescribe."},
                                   {"from": "gpt", "value": "a dog runs"}], "video": []},
         "pos": {"conversations": [{"from": "human", "value": "<video>"}], "video": frames},
         "query_cot": "", "pos_cot": "<thinking>a {\"key_frames\": [1, 3]}</thinking><answer>b</answer>"},
        {"dataset_name": "llavahound_caption_retrieval_1",
         "qry": {"conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                   {"from": "gpt", "value": "ignored"}], "video": frames},
         "pos": {"conversations": [{"from": "gpt", "value": "a cat sleeps"}], "video": []},
         "query_cot": "qc", "pos_cot": ""},
        {"dataset_name": "llavahound_qa_4",
         "qry": {"conversations": [{"from": "human", "value": "<video> How many dogs?"},
                                   {"from": "gpt", "value": "two"}], "video": frames[:2]},
         "pos": {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "two dogs"}]}},
    ]


def test_read_llavahound(media):
    path = media / "hound.json"
    path.write_text(json.dumps(_hound_rows()))
    recs, rep = read_llavahound(path, frames_dir=media / "frames")
    assert rep.kept == 3 and all(r.is_video for r in recs)
    fr = [str(media / "frames" / f"f{i}.png") for i in range(4)]
    vr, cap, qa = recs
    assert vr.query == {"text": "a dog runs"}  # video retrieval: the gpt turn
    assert vr.positive == {"video": fr, "tcot": _hound_rows()[0]["pos_cot"]}
    assert cap.query == {"text": "What happens?", "video": fr, "tcot": "qc"}  # caption: the human turn
    assert cap.positive == {"text": "a cat sleeps"}
    assert qa.query == {"text": "How many dogs?", "video": fr[:2]} and qa.positive == {"text": "two dogs"}
    assert (vr.dataset, vr.key) == ("hound", "hound/0")
    # task override wins over dataset_name
    row = dict(_hound_rows()[1], dataset_name="hound_misc")
    odd = media / "odd.json"
    odd.write_text(json.dumps([row]))
    with pytest.raises(RecordError, match="dataset_name"):
        read_llavahound(odd, frames_dir=media / "frames")
    forced, _ = read_llavahound(odd, frames_dir=media / "frames", task="caption")
    assert forced[0].query == cap.query and forced[0].key == "odd/0"


@pytest.mark.parametrize("case", ["missing_frame", "corrupt_frame", "unknown_task", "missing_positive",
                                  "empty_query"])
def test_read_llavahound_bad_records(media, case):
    rows = _hound_rows()
    bad = json.loads(json.dumps(rows[1]))
    if case == "missing_frame":
        bad["qry"]["video"][2] = "lost.png"
        want = ("missing_image", "qry.video[2]", "lost.png")
    elif case == "corrupt_frame":
        bad["qry"]["video"][1] = "../imgs/corrupt.png"
        want = ("corrupt_image", "qry.video[1]", "corrupt.png")
    elif case == "unknown_task":
        bad["dataset_name"] = "something_else"
        want = ("unknown_task", "dataset_name", None)
    elif case == "missing_positive":
        bad["pos"] = {"conversations": [{"from": "gpt", "value": "<video> "}], "video": []}
        want = ("missing_positive", "pos", None)
    else:
        bad["qry"] = {"conversations": [{"from": "human", "value": ""}], "video": []}
        want = ("missing_query", "qry", None)
    path = media / f"hound_{case}.json"
    path.write_text(json.dumps([rows[0], bad, rows[2]]))
    with pytest.raises(RecordError) as ei:
        read_llavahound(path, frames_dir=media / "frames")
    err = ei.value
    assert (err.reason, err.field, err.index) == (want[0], want[1], 1)
    assert "record 1" in str(err) and (want[2] is None or want[2] in str(err))
    recs, rep = read_llavahound(path, frames_dir=media / "frames", skip_bad=True)
    assert [r.key.split("/")[1] for r in recs] == ["0", "2"] and rep.counts == {want[0]: 1}


# ------------------------------------------------------------------------------------------------
# TFDS array_record without TensorFlow
# ------------------------------------------------------------------------------------------------

def test_array_record_round_trip_without_tensorflow(media, tmp_path):
    import grain

    assert importlib.util.find_spec("tensorflow") is None
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
    recs, _ = read_mmeb(_write_jsonl(media / "ar.jsonl", _mmeb_rows()))
    hound, _ = read_llavahound(_write_jsonl(media / "ar_hound.jsonl", _hound_rows()), frames_dir=media / "frames")
    path = write_array_record(recs + hound, tmp_path, "mix")
    assert os.path.isdir(path) and path.endswith(os.path.join("pair_records", "mix", "1.0.0"))
    src = array_record_source(tmp_path, "mix")
    assert len(src) == 6
    assert [src[i] for i in range(6)] == recs + hound  # order kept (shuffling disabled)
    assert src[-1] == hound[-1] and src.__getitems__([4, 0]) == [hound[1], recs[0]]
    with pytest.raises(IndexError):
        src[6]
    assert pickle.loads(pickle.dumps(src))[3] == hound[0]
    ds = grain.MapDataset.source(src)
    assert list(ds[:2]) == recs[:2]
    # one split per dataset name; existing versions are protected
    write_array_record({"MSCOCO_i2t": recs, "llavahound_qa_1": hound}, tmp_path, "split")
    assert [array_record_source(tmp_path, "split", s)[0] for s in ("MSCOCO_i2t", "llavahound_qa_1")] == \
        [recs[0], hound[0]]
    with pytest.raises(KeyError, match="available"):
        array_record_source(tmp_path, "split", "train")
    with pytest.raises(FileExistsError):
        write_array_record(recs, tmp_path, "mix")
    write_array_record(recs[:1], tmp_path, "mix", overwrite=True)
    assert len(array_record_source(tmp_path, "mix")) == 1
    with pytest.raises(TypeError, match="serialised"):
        write_array_record([PairRecord({"images": [np.zeros((2, 2, 3), np.uint8)]}, {"text": "t"})], tmp_path, "arr")
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------------------------
# Toy retrieval set
# ------------------------------------------------------------------------------------------------

def _tree_digest(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return make_toy_retrieval(root / "a", n_train=24, n_heldout=8, n_video_train=4, n_video_heldout=2, seed=3)


def test_toy_set(toy, tmp_path):
    import time

    t0 = time.perf_counter()
    again = make_toy_retrieval(tmp_path / "b", n_train=24, n_heldout=8, n_video_train=4, n_video_heldout=2, seed=3)
    assert time.perf_counter() - t0 < 10
    assert _tree_digest(toy["root"]) == _tree_digest(again["root"])  # byte-identical for a seed
    other = make_toy_retrieval(tmp_path / "c", n_train=24, n_heldout=8, n_video_train=4, n_video_heldout=2, seed=4)
    assert _tree_digest(toy["root"]) != _tree_digest(other["root"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left

    assert load_toy_manifest(toy["root"]) == toy
    ds = toy["datasets"]
    n_real = toy["counts"]["real_images"]
    assert {k: v["count"] for k, v in ds.items()} == {
        "toy_t2i_train": 24 + n_real, "toy_i2t_train": 24 + n_real, "toy_t2i_heldout": 8, "toy_i2t_heldout": 8,
        "toy_video_retrieval_train": 4, "toy_caption_retrieval_train": 4,
        "toy_video_retrieval_heldout": 2, "toy_caption_retrieval_heldout": 2}
    assert toy["counts"]["images"] == n_real + 24 + 8 + 8 * (4 + 2)  # 8 frames per clip
    captions = {}
    n_cot = 0
    for name, d in ds.items():
        reader = read_mmeb if d["format"] == "mmeb" else read_llavahound
        recs, rep = reader(d["path"], check_images="decode")
        assert len(recs) == d["count"] and rep.skipped == 0 and all(r.is_video == d["is_video"] for r in recs)
        for r in recs:
            for item in (r.query, r.positive):
                for p in item.get("images", []) + item.get("video", []):
                    w, h = Image.open(p).size
                    assert 32 <= min(w, h) and max(w, h) <= 128 and w % 32 == 0 and h % 32 == 0
                if "tcot" in item:
                    n_cot += 1
                    parsed = tcot.parse(item["tcot"])
                    assert parsed.well_formed and parsed.json_ok, item["tcot"]
                    if "images" in item:
                        assert parsed.boxes and all(0 <= v <= 1000 for b in parsed.boxes for v in b)
                    if "video" in item:
                        assert parsed.key_frames == [0, 7]
            if d["task"] == "i2t":
                captions.setdefault(d["split"], []).append(r.positive["text"])
    assert n_cot > 0
    assert len(set(captions["train"])) == len(captions["train"])
    assert not set(captions["train"]) & set(captions["heldout"])  # held-out captions are unseen
    # re-running with the same config reuses the folder; a different config refuses to clobber it
    reused = make_toy_retrieval(toy["root"], n_train=24, n_heldout=8, n_video_train=4, n_video_heldout=2, seed=3)
    assert reused == toy
    # in the same order too: it orders the training datasets, so a resumed run (or another host,
    # which reads the set process 0 built) must see the order the first run saw
    assert list(reused["datasets"]) == list(toy["datasets"])
    with pytest.raises(FileExistsError):
        make_toy_retrieval(toy["root"], n_train=5, seed=3)


# ------------------------------------------------------------------------------------------------
# Mixture sampler
# ------------------------------------------------------------------------------------------------

def _sampler(**kw):
    args = dict(sizes=(400, 1000, 200, 64, 10), weights=(1.0, 1.0, 2.0, 3.0, 50.0),
                is_video=(False, False, True, True, False), sub_batch_size=16, sub_batches_per_batch=3,
                max_video_sub_batches=1, seed=7)
    args.update(kw)
    return MixtureSampler(**args)


def test_sampler_deterministic_and_pure():
    a, b = _sampler(), _sampler()
    seq = [a.batch_indices(s) for s in range(300)]
    # b is queried out of order (a jump, then backwards): same answers as the sequential run
    for s in (299, 150, 0, 2047, 1024):
        got, want = b.batch_indices(s), (seq[s] if s < 300 else a.batch_indices(s))
        assert [d for d, _ in got] == [d for d, _ in want]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(got, want))
    c = pickle.loads(pickle.dumps(a))
    assert c == a and all(np.array_equal(x, y) for (_, x), (_, y) in zip(c.batch_indices(77), seq[77]))
    other = _sampler(seed=8)
    assert any(not np.array_equal(x, y) for s in range(5)
               for (_, x), (_, y) in zip(other.batch_indices(s), seq[s]))
    with pytest.raises(ValueError):
        a.batch_indices(-1)


def test_sampler_homogeneous_and_weights():
    s = _sampler(max_video_sub_batches=None)
    p = s.probabilities()
    # dataset 4 (10 records) cannot fill a sub-batch of 16 and is never drawn
    assert p[4] == 0 and np.isclose(p.sum(), 1)
    want = np.array([400.0, 1000.0, 400.0, 192.0, 0.0])
    assert np.allclose(p, want / want.sum())
    n = 4000
    counts = np.zeros(5)
    for step in range(n):
        for d, idx in s.batch_indices(step):
            assert idx.shape == (16,) and idx.min() >= 0 and idx.max() < s.sizes[d]
            counts[d] += 1
    freq = counts / counts.sum()
    assert np.abs(freq - p).max() < 0.02, (freq, p)
    # homogeneity through the records: each sub-batch holds one dataset's records
    sources = [[PairRecord({"text": f"{d}/{i}"}, {"text": "p"}, (), f"ds{d}", f"ds{d}/{i}", bool(s.is_video[d]))
                for i in range(n_)] for d, n_ in enumerate(s.sizes)]
    ds = pair_dataset(sources, s, num_steps=50)
    for step in range(50):
        recs = ds[step]
        assert len(recs) == 48
        for j, (d, idx) in enumerate(s.batch_indices(step)):
            chunk = recs[16 * j:16 * (j + 1)]
            assert {r.dataset for r in chunk} == {f"ds{d}"}
            assert [r.key for r in chunk] == [f"ds{d}/{i}" for i in idx]


def test_sampler_video_cap():
    heavy = dict(weights=(1.0, 1.0, 20.0, 20.0, 1.0), sub_batches_per_batch=4)
    capped, free = _sampler(**heavy), _sampler(**heavy, max_video_sub_batches=None)
    video = np.array(capped.is_video)
    n_cap = np.array([video[capped.datasets_for_step(s)].sum() for s in range(2000)])
    n_free = np.array([video[free.datasets_for_step(s)].sum() for s in range(2000)])
    assert n_cap.max() == 1 and n_cap.mean() > 0.9
    assert n_free.max() > 1  # without the cap video dominates
    assert capped.sub_batch_positions(5)[0][0] == capped.datasets_for_step(5)[0]
    with pytest.raises(ValueError, match="image dataset"):
        MixtureSampler((100, 100), (1.0, 1.0), (True, True), 10, 2, max_video_sub_batches=1)
    with pytest.raises(ValueError, match="fill a sub-batch"):
        MixtureSampler((5,), (1.0,), (False,), 10)


def test_sampler_epochs_reshuffle_and_no_duplicates():
    # single dataset: 100 records, sub-batches of 16 -> 6 per epoch, 4 records dropped per epoch
    s = MixtureSampler((100,), (1.0,), (False,), 16, 1, seed=11)
    epochs = [np.concatenate([s.batch_indices(e * 6 + r)[0][1] for r in range(6)]) for e in range(3)]
    for e, idx in enumerate(epochs):
        assert len(set(idx.tolist())) == 96  # no duplicate within an epoch
        assert [s.sub_batch_positions(e * 6 + r)[0][1:] for r in range(6)] == [(e, r) for r in range(6)]
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    perm0 = np.random.default_rng([11 + 0, 0]).permutation(100)
    assert np.array_equal(epochs[0], perm0[:96])  # epoch e walks the permutation seeded with seed + e
    # mixture: within any (dataset, epoch) no record repeats, and epochs are full before they wrap
    m = _sampler(sizes=(64, 96, 48, 80, 10), sub_batches_per_batch=2)
    seen = collections.defaultdict(list)
    for step in range(400):
        for (d, idx), (d2, epoch, r) in zip(m.batch_indices(step), m.sub_batch_positions(step)):
            assert d == d2
            seen[(d, epoch)].extend(idx.tolist())
    assert any(e >= 2 for _, e in seen)
    for (d, epoch), idx in seen.items():
        assert len(idx) == len(set(idx)), (d, epoch)
        full = max(e for dd, e in seen if dd == d)
        if epoch < full:
            assert len(idx) == (m.sizes[d] // 16) * 16


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 120), min_size=1, max_size=5), data=st.data())
def test_sampler_invariants_property(sizes, data):
    d = len(sizes)
    sbs = data.draw(st.sampled_from([1, 4, 8]))
    weights = data.draw(st.lists(st.floats(0.1, 10.0), min_size=d, max_size=d))
    is_video = data.draw(st.lists(st.booleans(), min_size=d, max_size=d))
    k = data.draw(st.integers(1, 3))
    cap = data.draw(st.sampled_from([None, 0, 1]))
    try:
        s = MixtureSampler(tuple(sizes), tuple(weights), tuple(is_video), sbs, k, cap, seed=data.draw(st.integers(0, 99)))
    except ValueError:
        return  # nothing can fill a sub-batch, or the video cap cannot be met
    seen = collections.defaultdict(set)
    for step in range(40):
        batch = s.batch_indices(step)
        assert len(batch) == k
        if cap is not None:
            assert sum(is_video[c] for c, _ in batch) <= cap
        for (c, idx), (c2, epoch, _) in zip(batch, s.sub_batch_positions(step)):
            assert c == c2 and len(idx) == sbs and sizes[c] >= sbs
            assert 0 <= idx.min() and idx.max() < sizes[c]
            assert not seen[(c, epoch)] & set(idx.tolist())
            seen[(c, epoch)].update(idx.tolist())


def test_host_slice_and_per_host_datasets():
    s = _sampler(sub_batch_size=16, sub_batches_per_batch=2)
    glob = s.batch_indices(9)
    parts = [host_slice(glob, p, 4) for p in range(4)]
    for j, (d, idx) in enumerate(glob):
        assert all(part[j][0] == d and len(part[j][1]) == 4 for part in parts)
        assert np.array_equal(np.concatenate([part[j][1] for part in parts]), idx)
    with pytest.raises(ValueError, match="divisible"):
        host_slice(glob, 0, 3)
    with pytest.raises(ValueError, match="out of range"):
        host_slice(glob, 4, 4)
    sources = [[PairRecord({"text": f"{d}/{i}"}, {"text": "p"}, (), f"ds{d}", f"ds{d}/{i}") for i in range(n)]
               for d, n in enumerate(s.sizes)]
    hosts = [pair_dataset(sources, s, process_index=p, process_count=2, num_steps=20) for p in range(2)]
    full = pair_dataset(sources, s, num_steps=20)
    assert len(full) == 20
    for step in (0, 13):
        h0, h1 = hosts[0][step], hosts[1][step]
        assert len(h0) == len(h1) == 16
        # each host holds its half of each sub-batch
        assert h0[:8] + h1[:8] + h0[8:] + h1[8:] == full[step]
    with pytest.raises(ValueError, match="divisible"):
        pair_dataset(sources, s, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="records but the sampler"):
        pair_dataset([sources[0][:5]] + sources[1:], s)


def test_iterator_state_resume_exact(toy, tmp_path):
    # real records from the toy set, stored as array_record, read back through grain
    names = ["toy_t2i_train", "toy_i2t_train", "toy_video_retrieval_train"]
    sources = []
    for n in names:
        d = toy["datasets"][n]
        recs, _ = (read_mmeb if d["format"] == "mmeb" else read_llavahound)(d["path"])
        write_array_record(recs, tmp_path, n)
        sources.append(array_record_source(tmp_path, n))
    s = MixtureSampler.from_sources(sources, (1.0, 1.0, 3.0), (False, False, True), sub_batch_size=4,
                                    sub_batches_per_batch=2, seed=5)
    ref_it = pair_iterator(sources, s)
    ref = [next(ref_it) for _ in range(8)]
    it = pair_iterator(sources, s)
    for _ in range(5):
        next(it)
    state = json.dumps(it.get_state())
    fresh = pair_iterator(sources, s)
    fresh.set_state(json.loads(state))
    assert next(fresh) == ref[5] and next(fresh) == ref[6]
    for step, batch in enumerate(ref):
        assert len(batch) == 8 and all(isinstance(r, PairRecord) for r in batch)
        ds_ids = s.datasets_for_step(step)
        assert [r.dataset for r in batch] == [names[d] for d in ds_ids for _ in range(4)]
    bounded = pair_iterator(sources, s, num_steps=3)
    assert len(list(bounded)) == 3
