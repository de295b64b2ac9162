"""The 78 MMEB-V2 tasks: key, modality, meta-task, row parser and candidate pool (mmeb_eval.md §1).

The order is ``modality2dataset`` of report_score_v2.py; the two ``-page`` keys become
``-page-fixed`` in the aggregate file (:func:`aggregate_key`).
"""
from __future__ import annotations

import dataclasses
from ..errors import UserError

__all__ = ["TaskSpec", "TASKS", "MODALITIES", "META_TASKS", "tasks_for", "aggregate_key"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    modality: str          # image | video | visdoc
    meta: str              # I-CLS, I-QA, I-RET, I-GD, V-CLS, V-QA, V-RET, V-MRET, VDRv1, VDRv2, VR, OOD
    parser: str            # image: cls | qa | i2t | t2i | i2i_vg; video: cls | qa | ret | mret; visdoc: beir
    pool: str              # local | global
    frames_group: str = ""  # video: video_cls | video_ret | video_mret | video_qa


def _image(names, meta, parser):
    return [TaskSpec(n, "image", meta, parser, "local") for n in names]


_I_RET_PARSER = {"VisDial": "t2i", "CIRR": "i2i_vg", "VisualNews_t2i": "t2i", "VisualNews_i2t": "i2t",
                 "MSCOCO_t2i": "t2i", "MSCOCO_i2t": "i2t", "NIGHTS": "i2i_vg", "WebQA": "t2i",
                 "FashionIQ": "i2i_vg", "Wiki-SS-NQ": "t2i", "OVEN": "i2i_vg", "EDIS": "t2i"}

_TASKS: list[TaskSpec] = (
    _image(["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
            "ImageNet-R", "ObjectNet", "Country211"], "I-CLS", "cls")
    + _image(["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz",
              "GQA", "TextVQA"], "I-QA", "qa")
    + [TaskSpec(n, "image", "I-RET", p, "local") for n, p in _I_RET_PARSER.items()]
    + _image(["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"], "I-GD", "i2i_vg")
    + [TaskSpec(n, "video", "V-CLS", "cls", "local" if n == "SmthSmthV2" else "global", "video_cls")
       for n in ("K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast")]
    + [TaskSpec(n, "video", "V-QA", "qa", "local", "video_qa")
       for n in ("MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA")]
    + [TaskSpec(n, "video", "V-RET", "ret", "global", "video_ret")
       for n in ("DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2")]
    + [TaskSpec(n, "video", "V-MRET", "mret", "local", "video_mret")
       for n in ("QVHighlight", "Charades-STA", "MomentSeeker")]
    + [TaskSpec(f"ViDoRe_{n}", "visdoc", "VDRv1", "beir", "global")
       for n in ("arxivqa", "docvqa", "infovqa", "tabfquad", "tatdqa", "shiftproject",
                 "syntheticDocQA_artificial_intelligence", "syntheticDocQA_energy",
                 "syntheticDocQA_government_reports", "syntheticDocQA_healthcare_industry")]
    + [TaskSpec(n, "visdoc", "VDRv2", "beir", "global")
       for n in ("ViDoRe_esg_reports_human_labeled_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
                 "ViDoRe_economics_reports_v2_multilingual", "ViDoRe_esg_reports_v2_multilingual")]
    + [TaskSpec(f"VisRAG_{n}", "visdoc", "VR", "beir", "global")
       for n in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")]
    + [TaskSpec(n, "visdoc", "OOD", "beir", "global")
       for n in ("ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc")]
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}
MODALITIES = ("image", "video", "visdoc")
META_TASKS: dict[str, tuple[str, ...]] = {}
for _t in _TASKS:
    META_TASKS.setdefault(_t.meta, ())
    META_TASKS[_t.meta] += (_t.name,)
assert len(TASKS) == 78 and [sum(t.modality == m for t in _TASKS) for m in MODALITIES] == [36, 18, 24]


def aggregate_key(name: str) -> str:
    """The task's key in the aggregate JSON (report_score_v2.py renames the page tasks)."""
    return name + "-fixed" if name.endswith("-page") else name


def tasks_for(selection: str | None) -> list[TaskSpec]:
    """`None`/"all", a modality, a meta-task or a comma-separated list of task keys -> specs."""
    if not selection or selection == "all":
        return list(_TASKS)
    out: list[TaskSpec] = []
    for part in selection.split(","):
        part = part.strip()
        if part in MODALITIES:
            out += [t for t in _TASKS if t.modality == part]
        elif part in META_TASKS:
            out += [TASKS[n] for n in META_TASKS[part]]
        elif part in TASKS:
            out.append(TASKS[part])
        elif part.endswith("-fixed") and part[: -len("-fixed")] in TASKS:
            out.append(TASKS[part[: -len("-fixed")]])
        else:
            raise UserError(f"unknown task {part!r} (a task key, a modality {MODALITIES} or a meta-task "
                             f"{tuple(META_TASKS)})")
    seen: set[str] = set()
    return [t for t in out if not (t.name in seen or seen.add(t.name))]
