"""launch/: the scripts parse, and every compiler flag they set is one the installed XLA / libtpu knows
(both refuse unknown flags at start-up, so a renamed flag would kill a pod's first step)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _flags(name):
    out = subprocess.run(["bash", "-c", f'unset LIBTPU_INIT_ARGS; . "{LAUNCH}/xla_flags.sh"; echo "${name}"'],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.sh")))
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_gpu_flags_are_known_to_xla():
    flags = _flags("XLA_FLAGS_GPU")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]


def test_tpu_flags_are_known_to_libtpu():
    pytest.importorskip("libtpu")
    flags = _flags("LIBTPU_INIT_ARGS")
    assert "--xla_tpu_enable_latency_hiding_scheduler=true" in flags
    code = ("from jax.experimental import topologies; "
            "print(len(topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x2').devices))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", LIBTPU_INIT_ARGS=flags, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("8"), out.stderr[-2000:]
    assert "Unknown command line flag" not in out.stderr
