"""T-CoT parsing, evidence injection and prompt templates (method ref. §4, §5)."""
import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from embedrl_jax import prompts as P
from embedrl_jax import tcot
from embedrl_jax.tcot import TCoT, crop_boxes, evidence_item, parse, select_frames

WELL_FORMED_RE = re.compile(
    r"<thinking>.*?</thinking>.*?<rethink>.*?</rethink>.*?<answer>.*?</answer>", re.DOTALL
)


def cot(json_text, thinking="Step 1: look. ", rethink="checked", answer="a red car"):
    return f"<thinking>{thinking}{json_text}</thinking>\n<rethink>{rethink}</rethink>\n<answer>{answer}</answer>"


@pytest.fixture(scope="module")
def astronaut():
    skdata = pytest.importorskip("skimage.data")
    return skdata.astronaut()  # 512 x 512 x 3 uint8


def test_module_does_not_import_jax():
    src = open(tcot.__file__, encoding="utf-8").read() + open(P.__file__, encoding="utf-8").read()
    assert not re.search(r"^\s*(import|from)\s+(jax|flax)\b", src, re.M)


# ---------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------


def test_well_formed_full():
    t = parse(cot('{"text_keywords": ["car", "red"]}'))
    assert t.well_formed and t.has_thinking and t.json_ok
    assert t.thinking == 'Step 1: look. {"text_keywords": ["car", "red"]}'
    assert t.rest == "<rethink>checked</rethink>\n<answer>a red car</answer>"
    assert t.keywords == ["car", "red"]
    assert t.evidence_json == '{"text_keywords": ["car", "red"]}'


@pytest.mark.parametrize(
    "text",
    [
        "<rethink>r</rethink><thinking>t</thinking><answer>a</answer>",  # rethink first
        "<thinking>t</thinking><answer>a</answer><rethink>r</rethink>",  # answer before rethink
        "<thinking>t</thinking><rethink>r</rethink>",  # no answer
        "<thinking>t</thinking><answer>a</answer>",  # no rethink
        "<rethink>r</rethink><answer>a</answer>",  # no thinking
        "<thinking>t<rethink>r</rethink><answer>a</answer>",  # thinking never closed
        "<thinking>t</thinking><rethink>r</rethink><answer>a",  # answer never closed
        "",
    ],
)
def test_not_well_formed(text):
    assert not parse(text).well_formed
    assert not tcot.is_well_formed(text)


def test_well_formed_tolerates_surrounding_text_and_newlines():
    text = "preamble\n<thinking>\na\nb\n</thinking>junk<rethink>\n</rethink>\n\n<answer>x\ny</answer> trailer"
    assert parse(text).well_formed


def test_first_thinking_block_is_used_non_greedy():
    text = "<thinking>one</thinking><thinking>two</thinking><rethink>r</rethink><answer>a</answer>"
    t = parse(text)
    assert t.thinking == "one"
    assert t.rest.startswith("<thinking>two</thinking>")


def test_missing_thinking_falls_back_to_whole_text():
    text = "  just an answer, no tags {\"bbox_2d\": [1, 2, 3, 4]}  "
    t = parse(text)
    assert not t.has_thinking and not t.json_ok and t.thinking == ""
    assert t.rest == text.strip()
    assert t.boxes == [] and t.evidence_json is None


# ---------------------------------------------------------------------------------------------
# JSON evidence
# ---------------------------------------------------------------------------------------------


def test_flat_box_is_wrapped():
    t = parse(cot('{"bbox_2d": [100, 200, 300, 400]}'))
    assert t.boxes == [(100.0, 200.0, 300.0, 400.0)]


def test_list_of_boxes():
    t = parse(cot('{"bbox_2d": [[0, 0, 10, 10], [500.5, 20, 600, 30]]}'))
    assert t.boxes == [(0.0, 0.0, 10.0, 10.0), (500.5, 20.0, 600.0, 30.0)]


@pytest.mark.parametrize(
    "value",
    [
        [[1, 2, 3], [10, 20, 30, 40]],
        [[1, 2, 3, 4, 5], [10, 20, 30, 40]],
        [["1", 2, 3, 4], [10, 20, 30, 40]],
        [[True, 2, 3, 4], [10, 20, 30, 40]],
        [[None, 2, 3, 4], [10, 20, 30, 40]],
        [[[1], 2, 3, 4], [10, 20, 30, 40]],
        [7, "x", [], [10, 20, 30, 40]],
    ],
)
def test_malformed_boxes_skipped(value):
    t = parse(cot(json.dumps(value).join(['{"bbox_2d": ', "}"])))
    assert t.json_ok
    assert t.boxes == [(10.0, 20.0, 30.0, 40.0)]


def test_non_finite_boxes_skipped():
    t = parse(cot('{"bbox_2d": [[NaN, 0, 10, 10], [0, 0, Infinity, 5], [1e999, 0, 1, 1], [1, 1, 2, 2]]}'))
    assert t.boxes == [(1.0, 1.0, 2.0, 2.0)]
    huge = "1" + "0" * 400
    # A 400-digit int is finite for Python but overflows float: skipped, no exception.
    assert parse(cot('{"bbox_2d": [%s, 0, 1, 1]}' % huge)).boxes == []


@pytest.mark.parametrize("value", ["[]", "[[]]", '"box"', "12", "null", "{}"])
def test_empty_or_wrong_box_values(value):
    t = parse(cot('{"bbox_2d": %s}' % value))
    assert t.boxes == []


def test_inverted_corners_are_ordered():
    t = parse(cot('{"bbox_2d": [[300, 400, 100, 200], [10, 90, 50, 20]]}'))
    assert t.boxes == [(100.0, 200.0, 300.0, 400.0), (10.0, 20.0, 50.0, 90.0)]


def test_out_of_range_values_clamped():
    t = parse(cot('{"bbox_2d": [-50, 200, 1500, 1000.5]}'))
    assert t.boxes == [(0.0, 200.0, 1000.0, 1000.0)]


def test_nested_braces_use_first_flat_object():
    # The first flat {...} is the inner object, which lacks the evidence keys.
    t = parse(cot('{"bbox_2d": [1, 2, 3, 4], "meta": {"k": 1}}'))
    assert t.evidence_json == '{"k": 1}'
    assert t.json_ok and t.boxes == []
    # Only the flat object counts, even after a nested one.
    t = parse(cot('{"a": {"b": {}}} then {"key_frames": [2]}'))
    assert t.evidence_json == "{}"
    assert t.key_frames == []


def test_json_outside_thinking_is_ignored():
    text = '<thinking>no json here</thinking><rethink>{"bbox_2d": [1,2,3,4]}</rethink><answer>a</answer>'
    t = parse(text)
    assert t.has_thinking and t.evidence_json is None and not t.json_ok and t.boxes == []


@pytest.mark.parametrize(
    "json_text",
    [
        "{'bbox_2d': [1, 2, 3, 4]}",  # python quotes
        '{"bbox_2d": [1, 2, 3, 4],}',  # trailing comma
        '{"bbox_2d": [1, 2, 3, 4]',  # unclosed
        "{not json at all}",
        "[1, 2, 3]",  # not an object
    ],
)
def test_non_json_fallback(json_text):
    text = cot(json_text)
    t = parse(text)
    assert t.well_formed and t.has_thinking and not t.json_ok and t.boxes == []
    item = evidence_item(None, text, first_image=np.zeros((100, 100, 3), np.uint8))
    assert item == {"parts": [{"type": "text", "text": text.strip()}]}


def test_deeply_nested_array_does_not_raise():
    text = cot('{"bbox_2d": ' + "[" * 100_000 + "]" * 100_000 + "}")
    t = parse(text)
    assert t.boxes == []


def test_text_keywords():
    assert parse(cot('{"text_keywords": ["a", 1, null, "b"]}')).keywords == ["a", "b"]
    assert parse(cot('{"text_keywords": "solo"}')).keywords == ["solo"]
    assert parse(cot('{"text_keywords": 3}')).keywords == []


# ---------------------------------------------------------------------------------------------
# Key frames
# ---------------------------------------------------------------------------------------------


def test_key_frames_one_based():
    assert parse(cot('{"key_frames": [1, 3, 8]}')).key_frames == [0, 2, 7]


def test_key_frames_zero_negative_duplicates_non_integers():
    t = parse(cot('{"key_frames": [3, 0, -2, 3, 1, 2.0, 2.5, "4", true, null, [5], 1, 9]}'))
    assert t.key_frames == [2, 0, 8]


def test_key_frames_single_int_and_wrong_types():
    assert parse(cot('{"key_frames": 4}')).key_frames == [3]
    assert parse(cot('{"key_frames": "1,2"}')).key_frames == []
    assert parse(cot('{"key_frames": {}}')).key_frames == []


def test_key_frames_zero_based_ablation(monkeypatch):
    text = cot('{"key_frames": [0, 1, -1, 7]}')
    assert parse(text, key_frames_one_based=False).key_frames == [0, 1, 7]
    monkeypatch.setattr(tcot, "KEY_FRAMES_ONE_BASED", False)
    assert parse(text).key_frames == [0, 1, 7]
    assert parse(text, key_frames_one_based=True).key_frames == [0, 6]


def test_select_frames_drops_out_of_range():
    frames = [f"f{i}" for i in range(8)]
    t = parse(cot('{"key_frames": [8, 9, 1, 100, 8, 0, -1]}'))
    assert t.key_frames == [7, 8, 0, 99]
    assert select_frames(frames, t.key_frames) == ["f7", "f0"]
    assert select_frames(frames, [3, 3, -1, 8, True]) == ["f3"]
    assert select_frames([], [0]) == [] and select_frames(None, [0]) == []


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------


def test_crop_pixel_mapping(astronaut):
    H, W = astronaut.shape[:2]
    (crop,) = crop_boxes(astronaut, [(100, 200, 300, 500)])
    x1, y1, x2, y2 = int(100 * W / 1000), int(200 * H / 1000), int(300 * W / 1000), int(500 * H / 1000)
    assert crop.size == (x2 - x1, y2 - y1)
    np.testing.assert_array_equal(np.asarray(crop), astronaut[y1:y2, x1:x2])
    # A PIL input gives the same crop.
    (crop2,) = crop_boxes(Image.fromarray(astronaut), [(100, 200, 300, 500)])
    np.testing.assert_array_equal(np.asarray(crop2), np.asarray(crop))


def test_crop_small_and_thin_dropped():
    img = np.random.default_rng(0).integers(0, 255, (200, 1000, 3), dtype=np.uint8)  # W=1000, H=200
    boxes = [
        (0, 0, 9, 500),  # 9 px wide -> dropped
        (0, 0, 10, 50),  # 10 x 10 px -> kept
        (0, 0, 500, 45),  # 500 x 9 px -> dropped
        (0, 0, 510, 50),  # 510 x 10 -> aspect 51 -> dropped
        (0, 0, 500, 50),  # 500 x 10 -> aspect 50 -> kept
        (0, 0, 1000, 1000),  # whole image 1000 x 200 -> kept (aspect 5)
        (300, 300, 300, 300),  # empty
        (1, 2, 3),  # malformed
    ]
    crops = crop_boxes(img, boxes)
    assert [c.size for c in crops] == [(10, 10), (500, 10), (1000, 200)]
    # Configurable thresholds.
    assert [c.size for c in crop_boxes(img, boxes, min_side=1, max_aspect=1000)][:2] == [(9, 100), (10, 10)]


def test_crop_clamps_inverted_and_out_of_range(astronaut):
    H, W = astronaut.shape[:2]
    (crop,) = crop_boxes(astronaut, [(1200, 900, -5, 800)])
    assert crop.size == (W, int(900 * H / 1000) - int(800 * H / 1000))


def test_crop_from_original_grayscale_and_single_channel():
    gray = np.arange(100 * 100, dtype=np.uint32).reshape(100, 100).astype(np.uint8)
    (c,) = crop_boxes(gray, [(0, 0, 500, 500)])
    assert c.size == (50, 50)
    (c1,) = crop_boxes(gray[..., None], [(0, 0, 500, 500)])
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c))


# ---------------------------------------------------------------------------------------------
# Evidence items
# ---------------------------------------------------------------------------------------------


def test_evidence_item_image(astronaut):
    text = cot('{"bbox_2d": [[100, 100, 400, 400], [0, 0, 5, 5]]}', answer="an astronaut")
    item = {"text": "Who is this?", "images": [astronaut]}
    out = evidence_item(item, text)
    assert out is not item and "tcot" not in item
    assert out["text"] == "Who is this?" and out["images"] is item["images"]
    parts = out["tcot"]["parts"]
    assert [p["type"] for p in parts] == ["text", "image", "text"]
    assert parts[0]["text"] == '<thinking>Step 1: look. {"bbox_2d": [[100, 100, 400, 400], [0, 0, 5, 5]]}</thinking>\n'
    assert parts[1]["budget"] == "image" and isinstance(parts[1]["image"], Image.Image)
    assert parts[1]["image"].size == (int(400 * 512 / 1000) - int(100 * 512 / 1000),) * 2
    assert parts[2]["text"] == "<rethink>checked</rethink>\n<answer>an astronaut</answer>"


def test_evidence_item_video_frames():
    frames = [np.full((64, 48, 3), i, np.uint8) for i in range(8)]
    text = cot('{"key_frames": [2, 2, 8, 9, 0]}')
    parts = evidence_item({"text": "q", "video": frames}, text)["tcot"]["parts"]
    images = [p for p in parts if p["type"] == "image"]
    assert [p["budget"] for p in images] == ["frame", "frame"]
    assert [int(np.asarray(p["image"])[0, 0, 0]) for p in images] == [1, 7]
    assert parts[0]["type"] == "text" and parts[-1]["type"] == "text"


def test_evidence_item_none_item_and_explicit_sources(astronaut):
    text = cot('{"bbox_2d": [100, 100, 400, 400]}')
    tc = evidence_item(None, text, first_image=Image.fromarray(astronaut))
    assert set(tc) == {"parts"} and [p["type"] for p in tc["parts"]] == ["text", "image", "text"]
    # Without an image, the boxes give no crops but the layout stays.
    tc = evidence_item(None, text)
    assert [p["type"] for p in tc["parts"]] == ["text", "text"]
    # A parsed TCoT is accepted too.
    assert evidence_item(None, parse(text)) == tc


def test_evidence_item_fallbacks():
    assert evidence_item(None, "") == {"parts": []}
    assert evidence_item(None, "   \n") == {"parts": []}
    assert evidence_item(None, "  plain text answer ") == {"parts": [{"type": "text", "text": "plain text answer"}]}
    no_json = cot("no evidence object")
    assert evidence_item(None, no_json)["parts"] == [{"type": "text", "text": no_json}]
    assert evidence_item({"text": "x"}, b"\xff\xfe<thinking>") == {
        "text": "x",
        "tcot": {"parts": [{"type": "text", "text": "\ufffd\ufffd<thinking>"}]},
    }
    with pytest.raises(TypeError):
        evidence_item("not an item", "text")


def test_non_utf8_bytes():
    raw = cot('{"text_keywords": ["caf\u00e9"]}').encode("utf-8") + b"\xff\xc3\x28"
    t = parse(raw)
    assert t.well_formed and t.keywords == ["caf\u00e9"]
    assert t.rest.endswith("\ufffd\ufffd(")
    assert parse(b"\x80\x81\x82").rest == "\ufffd\ufffd\ufffd"
    assert parse(None) == TCoT()


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

_EXPECTED_KEYS = {
    "query_text": "text_keywords",
    "query_image": "bbox_2d",
    "query_video": "key_frames",
    "query_text_video_retrieval": "text_keywords",
    "positive_image": "bbox_2d",
    "positive_text": "text_keywords",
    "positive_video": "key_frames",
}


def test_all_kinds_present():
    prompts = P.load_prompts()
    assert set(P.KINDS) <= set(prompts["templates"])
    assert {k: prompts["evidence_keys"][k] for k in _EXPECTED_KEYS} == _EXPECTED_KEYS


@pytest.mark.parametrize("kind", sorted(_EXPECTED_KEYS))
def test_generation_prompt_renders_with_worked_example(kind):
    text = P.render(kind, task="TASK-SLOT-VALUE")
    assert "TASK-SLOT-VALUE" in text and "{task}" not in text
    assert text.rstrip().endswith("Output:")
    other = set(_EXPECTED_KEYS.values()) - {_EXPECTED_KEYS[kind]}
    assert f'"{_EXPECTED_KEYS[kind]}"' in text and not any(f'"{k}"' in text for k in other)
    # The worked example is itself a parseable, well-formed T-CoT with the right evidence.
    t = parse(text)
    assert t.well_formed and t.json_ok
    obj = json.loads(t.evidence_json)
    assert list(obj) == [_EXPECTED_KEYS[kind]]
    if kind.endswith("image"):
        assert t.boxes and all(b != (0.0, 0.0, 1000.0, 1000.0) for b in t.boxes)
    if kind.endswith("video"):
        assert t.key_frames and all(1 <= k + 1 <= 8 for k in t.key_frames)
        assert "8 frames" in text and "2 frames per second" in text
        custom = P.render(kind, task="x", num_frames=16, fps=4)
        assert "16 frames" in custom and "4 frames per second" in custom
    else:
        assert "num_frames" not in P.slots_of(P.load_prompts()["templates"][kind])


def test_render_missing_slot_raises_keyerror_naming_slot():
    with pytest.raises(KeyError, match="task"):
        P.render("query_image")
    with pytest.raises(KeyError, match="candidates"):
        P.render("judge", query="q", reasoning="r")
    with pytest.raises(KeyError, match="no_such_kind"):
        P.render("no_such_kind", task="x")
    prompts = P.load_prompts()
    prompts["defaults"] = {}
    with pytest.raises(KeyError, match="num_frames"):
        P.render("query_video", prompts, task="x")


def test_judge_prompt():
    cands = P.format_candidates(["first reasoning", " second reasoning "])
    assert cands == "1. first reasoning\n\n2. second reasoning"
    text = P.render("judge", query="Find the dog", reasoning="a dog running", candidates=cands)
    assert "Find the dog" in text and "a dog running" in text and "2. second reasoning" in text
    assert "<thinking>" not in text and "number" in text


def test_user_override_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"templates": {"query_text": ["Line {task}", "end {extra}"]}, "defaults": {"extra": 1}}))
    prompts = P.load_prompts(path)
    assert P.render("query_text", prompts, task="T") == "Line T\nend 1"
    assert prompts["defaults"]["num_frames"] == 8  # merged over the packaged defaults
    assert "{task}" in prompts["templates"]["query_image"]
    # Literal JSON braces in templates need no escaping.
    prompts["templates"]["x"] = 'Box {"bbox_2d": [1, 2, 3, 4]} for {task} {}'
    assert P.render("x", prompts, task="t") == 'Box {"bbox_2d": [1, 2, 3, 4]} for t {}'


# ---------------------------------------------------------------------------------------------
# Property-based
# ---------------------------------------------------------------------------------------------

_TAG_LIST = ["<thinking>", "</thinking>", "<rethink>", "</rethink>", "<answer>", "</answer>"]
_FRAGMENTS = _TAG_LIST + [
    "{", "}", "[", "]", ",", ":", '"', "\n", " ", "<thinking", "thinking>", "</", "<", ">",
    '"bbox_2d"', '"key_frames"', '"text_keywords"', "NaN", "-Infinity", "1e999", "-5", "0", "1",
    "1000", "2000", "3.5", "true", "null", '"x"', "{}", "[]", "{\"bbox_2d\": [", "{\"key_frames\": [",
]

_random_soup = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=5)), max_size=40).map("".join)


@st.composite
def _mutated_tags(draw):
    """The six tags in order with fillers, then random deletions, swaps and duplications."""
    seq = list(_TAG_LIST)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "swap", "dup"]))
        i = draw(st.integers(0, len(seq) - 1)) if seq else 0
        if op == "drop" and seq:
            del seq[i]
        elif op == "swap" and len(seq) > 1:
            j = draw(st.integers(0, len(seq) - 1))
            seq[i], seq[j] = seq[j], seq[i]
        elif op == "dup" and seq:
            seq.insert(draw(st.integers(0, len(seq))), seq[i])
    fill = st.one_of(st.text(max_size=4), st.sampled_from(_FRAGMENTS))
    return "".join(draw(fill) + tag for tag in seq) + draw(fill)


tag_soup = st.one_of(_random_soup, _mutated_tags())

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=6), max_leaves=20)


@st.composite
def jsonish_cot(draw):
    key = draw(st.sampled_from(["bbox_2d", "key_frames", "text_keywords", "other"]))
    shaped = {
        "bbox_2d": st.one_of(
            st.lists(st.floats(-3000, 3000), min_size=4, max_size=4),
            st.lists(st.lists(st.one_of(st.integers(-3000, 3000), json_scalars), min_size=3, max_size=5), max_size=5),
        ),
        "key_frames": st.lists(st.one_of(st.integers(-3, 12), json_scalars), max_size=10),
        "text_keywords": st.lists(json_scalars, max_size=5),
        "other": json_values,
    }[key]
    value = draw(st.one_of(json_values, shaped, shaped))
    body = json.dumps({key: value}, allow_nan=True)
    if draw(st.booleans()):  # corrupt it
        i = draw(st.integers(0, len(body)))
        body = body[:i] + draw(st.sampled_from(["{", "}", ",", "]", "", "'"])) + body[i + 1:]
    pre = draw(st.text(max_size=10))
    tail = draw(st.sampled_from(["<rethink>r</rethink><answer>a</answer>", "<answer>a</answer>", "", "</rethink>"]))
    return f"{pre}<thinking>{draw(st.text(max_size=10))}{body}</thinking>{tail}"


def _check_invariants(text):
    t = parse(text)
    assert isinstance(t, TCoT)
    for box in t.boxes:
        assert len(box) == 4 and all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 1000 for v in box)
        assert box[0] <= box[2] and box[1] <= box[3]
    assert all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in t.key_frames)
    assert len(set(t.key_frames)) == len(t.key_frames)
    assert all(isinstance(k, str) for k in t.keywords)
    decoded = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    assert t.well_formed == bool(WELL_FORMED_RE.search(decoded))
    assert t.has_thinking == bool(re.search(r"<thinking>.*?</thinking>", decoded, re.DOTALL))
    if not t.has_thinking:
        assert t.rest == decoded.strip() and not t.json_ok
    else:
        m = re.search(r"<thinking>(.*?)</thinking>(.*)", decoded, re.DOTALL)
        assert t.thinking == m.group(1) and t.rest == m.group(2).strip()
    return t


_PROP = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROP
@given(st.text())
def test_prop_random_text(text):
    _check_invariants(text)


@_PROP
@given(st.binary())
def test_prop_random_bytes(data):
    _check_invariants(data)


@_PROP
@given(tag_soup)
def test_prop_tag_soup(text):
    _check_invariants(text)


@_PROP
@given(jsonish_cot())
def test_prop_jsonish(text):
    t = _check_invariants(text)
    # Evidence injection never raises either, with or without sources.
    img = np.zeros((40, 60, 3), np.uint8)
    frames = [np.zeros((8, 8, 3), np.uint8)] * 3
    parts = evidence_item({"text": "q", "images": [img], "video": frames}, text)["tcot"]["parts"]
    if not t.evidence_ok:
        assert parts == ([{"type": "text", "text": text.strip()}] if text.strip() else [])
    else:
        assert parts[0]["type"] == "text" and parts[0]["text"].startswith("<thinking>")
        n_img = sum(p["type"] == "image" for p in parts)
        assert n_img <= len(t.boxes) + len(t.key_frames)
        for p in parts:
            if p["type"] == "image":
                w, h = p["image"].size
                assert w >= 10 and h >= 10 or p["budget"] == "frame"


@_PROP
@given(st.lists(st.tuples(*[st.floats(-2000, 2000, allow_nan=False)] * 4), max_size=6),
       st.integers(1, 300), st.integers(1, 300))
def test_prop_crops_respect_limits(boxes, w, h):
    img = np.zeros((h, w, 3), np.uint8)
    for c in crop_boxes(img, boxes):
        cw, ch = c.size
        assert 10 <= cw <= w and 10 <= ch <= h and max(cw / ch, ch / cw) <= 50


@_PROP
@given(st.lists(st.one_of(st.integers(-5, 20), st.booleans(), st.floats(-5, 20), st.none()), max_size=12),
       st.booleans())
def test_prop_key_frames_match_reference(values, one_based):
    t = parse(cot(json.dumps({"key_frames": values})), key_frames_one_based=one_based)
    expected = []
    for v in values:
        if type(v) is int and v - one_based >= 0 and v - one_based not in expected:
            expected.append(v - one_based)
    assert t.key_frames == expected


@_PROP
@given(st.lists(st.lists(st.floats(-5000, 5000), min_size=4, max_size=4), max_size=5))
def test_prop_boxes_match_reference(boxes):
    t = parse(cot(json.dumps({"bbox_2d": boxes[0] if len(boxes) == 1 else boxes})))
    expected = []
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = (min(max(v, 0.0), 1000.0) for v in (x1, y1, x2, y2))
        expected.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    assert t.boxes == expected
