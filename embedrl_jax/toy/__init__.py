"""Toy bases and the toy EG-RL set-up, built offline and without torch.

`toy.base` builds a tiny random Qwen3-VL (HF directory with a trained BPE tokenizer and an image
processor); `toy.reasoner` composes the EG-RL toy run's toy Embedder and SFT cold start from the
ordinary trainers. Submodules are imported explicitly (the trainers import `toy.base`).
"""
