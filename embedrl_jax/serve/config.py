"""The server's typed config: batching limits, the shape plan compiled at start, reasoning settings.

Every field can be set with a dotted ``key=value`` on the command line (``embedrl serve ...
max_seq_len=1024 reason.max_new_tokens=256 input.image_max_tokens=512``); the named flags
(``--max-batch-tokens`` etc.) set the fields of the same name.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from ..data.inputs import InputConfig

__all__ = ["ServeConfig", "ReasonServeConfig"]


@dataclasses.dataclass(frozen=True)
class ReasonServeConfig:
    """How `reasoning: true` requests run the Reasoner (greedy by default, so a T-CoT does not
    depend on which other requests share its batch)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_prompt_tokens: int = 4096
    seq_buckets: tuple[int, ...] = ()  # prompt lengths compiled; () = powers of two from 128 to max_prompt_tokens
    max_batch_items: int = 4
    max_frames: int = 8  # images per prompt (video frames are images for the Reasoner)
    prompts: str | None = None  # JSON file merged over the packaged T-CoT prompts
    default_side: Literal["query", "positive"] = "query"

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.max_batch_items < 1 or self.max_frames < 1:
            raise ValueError("reason.max_new_tokens, reason.max_batch_items and reason.max_frames must be >= 1")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits and the static-shape plan of `embedrl serve`.

    Embed batches have shapes (B, S[, rows]): S from `seq_buckets`, B a power of `batch_growth`
    with B * S <= max_batch_tokens and B <= max_batch_items (the largest such B is always
    planned), patch rows likewise between B and B * max_frames, each row `max(image, frame)
    max tokens` merged tokens long. All of them are compiled at start (the count is printed), so
    no request compiles; an item longer than the largest S is refused. The defaults plan 55 embed
    shapes (and 48 Reasoner shapes); fewer: fewer `seq_buckets`, a smaller `max_batch_items` or
    `max_frames`; less padding: `batch_growth=2` (more shapes).
    """

    model_name: str = ""  # served model id; "" = the Embedder directory's name
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_batch_tokens: int = 8192
    max_batch_items: int = 16
    max_delay_ms: float = 5.0
    max_queue: int = 1024  # items waiting for the model; beyond it requests get 429 at once
    max_inputs: int = 256  # inputs per request; beyond it 413
    max_body_bytes: int = 64 * 2**20  # request body; beyond it 413
    max_seq_len: int = 2048
    seq_buckets: tuple[int, ...] = ()  # () = powers of two from 128 to max_seq_len (and max_seq_len)
    max_frames: int = 8  # vision segments per item: images, video frame pairs, evidence crops / key frames
    batch_growth: int = 4  # planned batch sizes and patch-row counts are powers of this (2: less padding, more shapes)
    drain_timeout_s: float = 60.0
    input: InputConfig = InputConfig()
    reason: ReasonServeConfig = ReasonServeConfig()

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_batch_items", "max_queue", "max_inputs", "max_body_bytes",
                     "max_seq_len", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.batch_growth < 2:
            raise ValueError(f"batch_growth must be >= 2, got {self.batch_growth}")
        if any(s < 1 for s in self.seq_buckets):
            raise ValueError(f"seq_buckets must be positive, got {self.seq_buckets}")
