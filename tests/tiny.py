"""Test-side name for the offline tiny-model builders (they live in the package for `embedrl selfcheck`)."""
from embedrl_jax.testing import *  # noqa: F401,F403
from embedrl_jax.testing import IMAGE_ID, VIDEO_ID, VSTART, VEND, VOCAB  # noqa: F401
