"""Qwen3-VL: config, host-side input packing, the NNX model and its HF mapping table."""
from .config import Qwen3VLConfig, load_preset
from .inputs import Buckets, bucket, pack_inputs
from .model import ModelDef, Qwen3VL, init_params, model_def

__all__ = ["Qwen3VLConfig", "load_preset", "Buckets", "bucket", "pack_inputs", "ModelDef", "Qwen3VL", "init_params", "model_def"]
