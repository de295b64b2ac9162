"""The three trainers' readers on the official data layouts: media under separate roots (global and
per file), JSON arrays and JSONL, MMEB-train and LLaVA-Hound records; bad records named or counted."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from embedrl_jax.config import apply_overrides
from embedrl_jax.data.records import RecordError, read_pairs
from embedrl_jax.data.sft import SFTDataConfig, load_sft_samples
from embedrl_jax.prompts import load_prompts, reasoner_prompt
from embedrl_jax.rl.config import RLDataConfig
from embedrl_jax.train.embedder import DataConfig, read_data_file
from embedrl_jax.data.records import read_rl_files



def _cot(answer: str) -> str:
    return '<thinking>look {"bbox_2d": [0, 0, 500, 500]}</thinking><rethink>ok</rethink><answer>' + answer + "</answer>"


def _fcot(answer: str) -> str:
    return '<thinking>see {"key_frames": [1, 2]}</thinking><rethink>ok</rethink><answer>' + answer + "</answer>"


@pytest.fixture
def layout(tmp_path):
    """Official-style tree: annotations in one folder, images and video frames under other roots."""
    ann, images, frames = tmp_path / "Embed-RL-Train", tmp_path / "MMEB-train" / "images", tmp_path / "frames"
    for sub in ("MSCOCO_i2t", "VisDial"):
        (images / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(images / "MSCOCO_i2t" / f"{i}.jpg")
    for vid in ("v0", "v1"):
        (frames / vid).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((16, 16, 3), 30 * k, np.uint8)).save(frames / vid / f"{k:03d}.jpg")
    ann.mkdir()
    mmeb = [{"qry": "<|image_1|>\nFind a caption for the image.", "qry_image_path": f"MSCOCO_i2t/{i}.jpg",
             "pos_text": f"caption {i}", "pos_image_path": "", "query_cot": _cot(f"q{i}"),
             "pos_cot": _cot(f"p{i}") if i != 1 else ""} for i in range(3)]
    (ann / "MSCOCO_i2t.json").write_text(json.dumps(mmeb))  # a JSON array, as released
    hound = [
        {"qry": {"conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a dog runs"}],
                 "video": []},
         "pos": {"conversations": [{"from": "human", "value": "<video>"}], "video": [f"v0/{k:03d}.jpg" for k in range(3)]},
         "query_cot": _cot("dog"), "pos_cot": _fcot("runs"), "dataset_name": "llavahound_video_retrieval_1"},
        {"qry": {"conversations": [{"from": "human", "value": "<video>\nDescribe the video."}],
                 "video": [f"v1/{k:03d}.jpg" for k in range(3)]},
         "pos": {"conversations": [{"from": "gpt", "value": "a cat sleeps"}]},
         "query_cot": _fcot("cat"), "pos_cot": "", "dataset_name": "llavahound_caption_retrieval_1"},
    ]
    (ann / "llavahound_mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hound))  # JSONL
    return {"ann": ann, "images": images, "frames": frames, "mmeb": ann / "MSCOCO_i2t.json",
            "hound": ann / "llavahound_mix.jsonl", "rows": mmeb, "hound_rows": hound}


def test_without_roots_relative_paths_resolve_against_the_file_folder(layout):
    """Today's behaviour is the default: with no root the paths are looked up next to the file."""
    with pytest.raises(RecordError, match=r"MSCOCO_i2t\.json: record 0: field 'qry_image_path': image file not found") as e:
        read_data_file(layout["mmeb"], DataConfig(), video=False)
    assert e.value.reason == "missing_image" and e.value.index == 0
    with pytest.raises(RecordError, match=r"llavahound_mix\.jsonl: record 0: field 'pos\.video\[0\]'"):
        read_pairs(layout["hound"])


def test_embedder_reader_global_and_per_file_roots(layout):
    images, frames = layout["images"], layout["frames"]
    recs, rep = read_data_file(layout["mmeb"], DataConfig(image_root=str(images)), video=False)
    assert rep.kept == 3 and recs[2].query["images"] == [str(images / "MSCOCO_i2t" / "2.jpg")]
    assert recs[0].query["text"] == "Find a caption for the image." and recs[0].positive["text"] == "caption 0"
    # per file, keyed by dataset name, wins over a wrong global root
    cfg = apply_overrides(DataConfig(), ["image_root=/nonexistent",
                                         f"image_roots={json.dumps({'MSCOCO_i2t': str(images)})}"])
    assert read_data_file(layout["mmeb"], cfg, video=False)[1].kept == 3
    hrecs, hrep = read_data_file(layout["hound"], DataConfig(frames_root=str(frames)), video=True)
    assert hrep.kept == 2 and all(r.is_video for r in hrecs)
    assert hrecs[0].query == {"text": "a dog runs", "tcot": _cot("dog")}
    assert hrecs[0].positive["video"] == [str(frames / "v0" / f"{k:03d}.jpg") for k in range(3)]
    assert hrecs[1].query["text"] == "Describe the video." and hrecs[1].positive["text"] == "a cat sleeps"
    # the per-file frames root is keyed by the path as written, too
    cfg = DataConfig(frames_roots={str(layout["hound"]): str(frames)})
    assert read_data_file(layout["hound"], cfg, video=True)[1].kept == 2


def test_rl_reader_reads_both_formats_under_roots(layout):
    cfg = RLDataConfig(files=(str(layout["mmeb"]), str(layout["hound"])), image_root=str(layout["images"]),
                       frames_root=str(layout["frames"]))
    sources, names, skipped = read_rl_files(cfg)
    assert names == ["MSCOCO_i2t", "llavahound_mix"] and [len(s) for s in sources] == [3, 2]
    assert not any(r.is_video for r in sources[0]) and all(r.is_video for r in sources[1])
    assert sources[1][1].query["video"][0] == str(layout["frames"] / "v1" / "000.jpg")
    assert skipped == {"MSCOCO_i2t": 0, "llavahound_mix": 0}
    # a bad record stops with file, index and field, or is counted with skip_bad
    rows = layout["rows"] + [{"qry": 3, "pos_text": "x"}]
    layout["mmeb"].write_text(json.dumps(rows))
    with pytest.raises(RecordError, match=r"MSCOCO_i2t\.json: record 3: field 'qry': expected a string"):
        read_rl_files(cfg)
    _, _, skipped = read_rl_files(RLDataConfig(**{**cfg.__dict__, "skip_bad": True}))
    assert skipped["MSCOCO_i2t"] == 1


def test_sft_reader_json_array_jsonl_mmeb_and_llavahound(layout):
    prompts = load_prompts()
    cfg = SFTDataConfig(files=(str(layout["mmeb"]), str(layout["hound"])), image_root=str(layout["images"]),
                        frames_root=str(layout["frames"]))
    samples, report = load_sft_samples(cfg)
    # MMEB: 3 query CoTs + 2 positive CoTs (record 1 has none); Hound: 2 query + 1 positive
    assert report.samples == len(samples) == 8 and report.no_tcot == 2 and report.lines == 5
    first = samples[0]
    assert first.prompt["images"] == [str(layout["images"] / "MSCOCO_i2t" / "0.jpg")]
    assert first.completion == _cot("q0") and "MSCOCO_i2t.json: record 0 (query)" in first.source
    video = [s for s in samples if "llavahound_mix.jsonl" in s.source]
    assert [s.source.rsplit(": ", 1)[1] for s in video] == ["line 1 (query)", "line 1 (positive)", "line 2 (query)"]
    # a text query whose positive is a video gets the video-retrieval prompt; frames under the frames root
    assert video[0].prompt == reasoner_prompt({"text": "a dog runs"}, "query", prompts, retrieves_video=True)
    assert video[1].prompt["video"][0] == str(layout["frames"] / "v0" / "000.jpg")
    assert video[2].prompt["video"] == [str(layout["frames"] / "v1" / f"{k:03d}.jpg") for k in range(3)]
    # plain prompt/completion samples in a JSON array resolve their images against the root too
    plain = layout["ann"] / "plain.json"
    plain.write_text(json.dumps([{"prompt": "p", "completion": "c", "images": ["MSCOCO_i2t/1.jpg"]}]))
    s, _ = load_sft_samples(SFTDataConfig(files=(str(plain),), image_root=str(layout["images"])))
    assert s[0].prompt["images"] == [str(layout["images"] / "MSCOCO_i2t" / "1.jpg")]


def test_sft_reader_names_or_counts_bad_records(layout):
    bad = layout["ann"] / "bad.json"
    hound_no_frames_root = layout["hound_rows"][0]
    bad.write_text(json.dumps([layout["rows"][0], {"qry": {"conversations": "oops"}, "dataset_name": "llavahound_qa_1"}, hound_no_frames_root, 7]))
    cfg = SFTDataConfig(files=(str(bad),), image_root=str(layout["images"]))
    with pytest.raises(RecordError, match=r"bad\.json: record 1: field 'qry\.conversations'"):
        load_sft_samples(cfg)
    samples, report = load_sft_samples(SFTDataConfig(**{**cfg.__dict__, "skip_bad": True}))
    assert report.skipped == {"bad_field": 1, "missing_image": 1, "bad_record": 1}
    assert len(samples) == 2 and all("record 0" in s.source for s in samples)
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 2: not valid JSON"):
        (layout["ann"] / "bad.jsonl").write_text(json.dumps(layout["rows"][0]) + "\n{oops\n")
        load_sft_samples(SFTDataConfig(files=(str(layout["ann"] / "bad.jsonl"),), image_root=str(layout["images"])))
