"""Test session set-up: an 8-device CPU mesh and float32 matmuls, fixed before jax is imported."""
import os

# The suite is dominated by XLA:CPU compiles of small programs, not by running them: LLVM's -O0
# backend halves many compiles (e.g. 17 s -> 10 s for the rolled-scan test) and costs the few
# execution-bound tests ~6 %. Subprocesses the tests start inherit it through XLA_FLAGS.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

assert jax.device_count() == 8, jax.devices()

# Trainers built several times in one test (resume, sharded vs single) compile identical
# programs: a per-session persistent cache turns the repeats into loads.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE_DIR = tempfile.mkdtemp(prefix="embedrl-jax-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)  # per session: leave nothing in /tmp
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# Long in-process runs keep every compiled program of every module alive; XLA:CPU crashed once
# (a segfault while compiling) late in a full suite run. Free the compiled programs after each
# module: repeats within a module stay cached, and the persistent cache above serves the rest.
import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_module():
    yield
    jax.clear_caches()
    gc.collect()
