import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Plans predict rather than calibrate the box on first use (minutes in an empty cache), for every process a test
# starts, session fixtures included; tests/test_calibration.py measures for real where it means to.
os.environ["HYBRIDINFER_NO_CALIBRATE"] = "1"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """Real-shaped sparse GGUF headers (R1 3 shards, legacy form, Q4_K_M, qwen3moe, dense llama, ...)."""
    from hybridinfer.demo.shapes import ensure_models

    d = tmp_path_factory.mktemp("shapes")
    return ensure_models(d)


@pytest.fixture(scope="session")
def models(shapes_dir):
    from hybridinfer.inspect_gguf import inspect

    return {name: inspect(path) for name, path in shapes_dir.items()}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from hybridinfer.demo.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Keep each test's writes (rules files, demo model) out of the user's cache.
    monkeypatch.setenv("HYBRIDINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYBRIDINFER_NO_CALIBRATE", "1")


def run_cli(*args, env=None, timeout=120):
    """Run the installed command the way a user does; -> CompletedProcess (text)."""
    exe = shutil.which("hybridinfer", path=str(Path(sys.executable).parent)) or "hybridinfer"
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=e)


def has_gpu() -> bool:
    from hybridinfer.probe import probe_gpus

    return bool(probe_gpus())


gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")


def verdict(plan, engine: str):
    """An engine's verdict in a plan (plan.verdicts)."""
    return next(v for v in plan.verdicts if v.engine == engine)


def reason(plan, topic: str) -> list[str]:
    """The texts of a plan's reasons on one topic."""
    return [r.text for r in plan.reasons if r.topic == topic]
