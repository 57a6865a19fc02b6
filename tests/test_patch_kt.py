"""`hybridinfer patch ktransformers` against the real legacy KTransformers source (PyPI's 0.2.1.post1 sdist) and a
fixture tree with the v0.3.1+ layout: unpatched loaders raise "ggml_type 18 not implemented", patched ones return
tensors equal to the reference; check, apply twice, revert to byte-identical files, check again."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("torch", reason="install.sh --dev installs torch (CPU build)")
from gguf import GGMLQuantizationType, GGUFWriter, quants  # noqa: E402

from conftest import ROOT, run_cli  # noqa: E402
from test_quants import blocks  # noqa: E402

SDIST = "ktransformers-0.2.1.post1.tar.gz"
SDIST_SHA256 = "079ee36fbefe1280455f6cb2d9afaf840a9fed350acecdcf94f03b113aa94199"
# Non-expert tensors in Unsloth's dynamic quants use these; the loader must dequantize them all.
IQ_TENSORS = {"blk.0.attn_q_a.weight": "IQ3_XXS", "blk.0.attn_kv_b.weight": "IQ2_XXS", "blk.0.ffn_down.weight": "IQ1_S",
              "blk.0.ffn_up.weight": "IQ1_M", "blk.0.attn_output.weight": "IQ4_NL", "blk.0.ffn_gate.weight": "IQ3_S",
              "blk.1.attn_q_a.weight": "IQ2_XS", "blk.1.attn_kv_b.weight": "IQ2_S"}


@pytest.fixture(scope="session")
def kt_sdist():
    """PyPI's ktransformers 0.2.1.post1 sdist, cached outside the checkout (verified by sha256)."""
    cache = Path(os.environ.get("HYBRIDINFER_SRC_CACHE", Path.home() / ".cache" / "hybridinfer" / "src"))
    path = cache / SDIST
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != SDIST_SHA256:
        index = httpx.get("https://pypi.org/simple/ktransformers/", timeout=60, follow_redirects=True,
                          headers={"Accept": "application/vnd.pypi.simple.v1+json"}).json()
        url = next(f["url"] for f in index["files"] if f["filename"] == SDIST)
        data = httpx.get(url, timeout=300, follow_redirects=True).content
        assert hashlib.sha256(data).hexdigest() == SDIST_SHA256, "PyPI served a different sdist"
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


@pytest.fixture(scope="session")
def iq_gguf(tmp_path_factory):
    """A small GGUF with IQ tensors (random valid blocks, finite scales) + routed experts, and the reference values."""
    d = tmp_path_factory.mktemp("iqgguf")
    path = d / "iq.gguf"
    w = GGUFWriter(str(path), "deepseek2")
    ref = {}
    for i, (name, qt) in enumerate(IQ_TENSORS.items()):
        block, size = _sizes(qt)
        rows, cols = 4, block * 2
        raw = blocks(qt, "finite", n=rows * cols // block, seed=i)
        w.add_tensor(name, raw.reshape(rows, cols // block * size), raw_dtype=GGMLQuantizationType[qt])
        with np.errstate(all="ignore"):
            ref[name] = quants.dequantize(raw.reshape(-1, size), GGMLQuantizationType[qt]).reshape(rows, cols)
    for layer, qt in (("blk.3", "IQ3_XXS"), ("blk.4", "IQ1_S")):  # routed experts: one the CPU kernel skips, one it runs
        for proj in ("gate", "up", "down"):
            _, size = _sizes(qt)
            raw = blocks(qt, "finite", n=8)
            w.add_tensor(f"{layer}.ffn_{proj}_exps.weight", raw.reshape(2, 4 * size), raw_dtype=GGMLQuantizationType[qt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    np.savez(d / "ref.npz", **ref)
    return path, d / "ref.npz"


def _sizes(qt):
    from hybridinfer.quants import TYPES

    return TYPES[qt][1], TYPES[qt][2]


def _stubs(tmp_path) -> Path:
    # KTransformersOps is KTransformers' CUDA extension: it cannot exist without CUDA, so it (only it) is stubbed.
    d = tmp_path / "stubs"
    d.mkdir(exist_ok=True)
    (d / "KTransformersOps.py").write_text('"""Stub of the CUDA extension (cannot be built without CUDA)."""\n')
    return d


def _run(tree_parent: Path, tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{_stubs(tmp_path)}{os.pathsep}{tree_parent}", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


LOAD_ALL = """
import json, sys, numpy as np, torch
{import_loader}
loader = GGUFLoader({gguf!r})
ref = np.load({ref!r})
out = {{}}
for name in ref.files:
    cpu = loader.load_gguf_tensor(name, device="cpu")
    out[name] = bool(np.array_equal(cpu.numpy().astype(np.float32).reshape(ref[name].shape), ref[name]))
# the GPU-table entry points, called the ways KTransformers calls them (data, device[, target_dtype])
from ktransformers.util.custom_gguf import GGML_DEQUANTIZE_GPU, GGML_NAMES
for tid in (16, 17, 18, 19, 20, 21, 22, 29):
    fn = GGML_DEQUANTIZE_GPU[GGML_NAMES[tid]]
    assert fn(np.zeros(0, np.uint8), "cpu").numel() == 0
    assert fn(np.zeros(0, np.uint8), "cpu", torch.bfloat16).dtype == torch.bfloat16
print(json.dumps(out))
"""


def _cli(*args):
    return run_cli("patch", "ktransformers", *args)


def _check_cycle(root: Path, tree_parent: Path, tmp_path: Path, gguf: Path, ref: Path, import_loader: str):
    before = _digest(root)
    r = _cli("--check", "--path", str(root), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["state"] == "unpatched"

    code = LOAD_ALL.format(import_loader=import_loader, gguf=str(gguf), ref=str(ref))
    r = _run(tree_parent, tmp_path, code)
    assert r.returncode != 0 and "NotImplementedError: ggml_type" in r.stderr and "not implemented" in r.stderr

    r = _cli("--apply", "--path", str(root))
    assert r.returncode == 0 and "state:  patched" in r.stdout, r.stderr
    once = _digest(root)
    r = _cli("--apply", "--path", str(root))
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert _digest(root) == once  # idempotent

    r = _run(tree_parent, tmp_path, code)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {n: True for n in IQ_TENSORS}

    r = _cli("--revert", "--path", str(root))
    assert r.returncode == 0 and "state:  unpatched" in r.stdout
    assert _digest(root) == before  # byte-identical, nothing left behind
    assert _cli("--check", "--path", str(root)).returncode == 1


def test_legacy_sdist_0_2_1(kt_sdist, iq_gguf, tmp_path):
    with tarfile.open(kt_sdist) as tf:
        tf.extractall(tmp_path, filter="data")
    tree_parent = tmp_path / "ktransformers-0.2.1.post1"
    root = tree_parent / "ktransformers"
    r = _cli("--check", "--path", str(tree_parent))
    assert "KTransformers 0.2.1.post1" in r.stdout and "v0.2 (loader in custom_gguf.py)" in r.stdout
    gguf, ref = iq_gguf
    # The legacy loader reads a directory of .gguf files.
    gdir = tmp_path / "model"
    gdir.mkdir()
    os.link(gguf, gdir / "iq.gguf")
    _check_cycle(root, tree_parent, tmp_path, gdir, ref, "from ktransformers.util.custom_gguf import GGUFLoader")


def test_v031_layout_fixture(iq_gguf, tmp_path):
    tree_parent = tmp_path / "tree"
    shutil.copytree(ROOT / "tests" / "fixtures" / "kt-v031-layout", tree_parent)
    root = tree_parent / "ktransformers"
    r = _cli("--check", "--path", str(root))
    assert "v0.3.1+ (loader in custom_loader.py)" in r.stdout
    gguf, ref = iq_gguf
    _check_cycle(root, tree_parent, tmp_path, gguf, ref, "from ktransformers.util.custom_loader import GGUFLoader")


def test_patched_cpu_expert_loader_refuses_types_its_kernel_skips(iq_gguf, tmp_path):
    tree_parent = tmp_path / "tree"
    shutil.copytree(ROOT / "tests" / "fixtures" / "kt-v031-layout", tree_parent)
    gguf, _ = iq_gguf
    code = f"""
from ktransformers.util.custom_loader import GGUFLoader
from ktransformers.operators.experts import KExpertsCPU
loader = GGUFLoader({str(gguf)!r})
ok = KExpertsCPU("blk.4", loader).load_weights()          # IQ1_S: computed by the CPU kernel
assert ok["blk.4"]["gate_type"] == 19
KExpertsCPU("blk.3", loader).load_weights()                # IQ3_XXS: not computed
"""
    r = _run(tree_parent, tmp_path, code)
    assert r.returncode == 0, "unpatched: the CPU expert loader accepts IQ3_XXS silently"
    assert _cli("--apply", "--path", str(tree_parent)).returncode == 0
    r = _run(tree_parent, tmp_path, code)
    assert r.returncode != 0
    assert "NotImplementedError: routed experts blk.3.ffn_gate_exps.weight are IQ3_XXS (ggml type 18)" in r.stderr
    assert "does not compute" in r.stderr


def test_unknown_layout_and_hand_edits_refused(tmp_path):
    tree = tmp_path / "kt" / "ktransformers"
    (tree / "util").mkdir(parents=True)
    (tree / "util" / "custom_gguf.py").write_text("GGML_TYPES = {}\n")
    r = _cli("--check", "--path", str(tree))
    assert r.returncode == 2 and "unknown KTransformers layout" in r.stderr and "GGML_NAMES" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("--check", "--path", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no KTransformers tree" in r.stderr

    fixture = tmp_path / "fx"
    shutil.copytree(ROOT / "tests" / "fixtures" / "kt-v031-layout", fixture)
    assert _cli("--apply", "--path", str(fixture)).returncode == 0
    experts = fixture / "ktransformers" / "operators" / "experts.py"
    experts.write_text(experts.read_text() + "x = 1\n")  # edited after the patch
    r = _cli("--revert", "--path", str(fixture))
    assert r.returncode == 2 and "edited after the patch" in r.stderr
    (fixture / "ktransformers" / "util" / "hybridinfer_iq.py").unlink()
    r = _cli("--apply", "--path", str(fixture))
    assert r.returncode == 2 and "partly patched" in r.stderr


def test_probe_reports_the_patch_state(tmp_path):
    tree_parent = tmp_path / "tree"
    shutil.copytree(ROOT / "tests" / "fixtures" / "kt-v031-layout", tree_parent)
    code = "from hybridinfer.engines.kt_probe import kt_patch_state; print(kt_patch_state())"
    assert "IQ patch: not applied" in _run(tree_parent, tmp_path, code).stdout
    assert _cli("--apply", "--path", str(tree_parent)).returncode == 0
    assert _run(tree_parent, tmp_path, code).stdout.strip() == "IQ patch: applied"


def test_patched_cpu_expert_loader_accepts_float_experts(tmp_path):
    """F32/F16/BF16 routed experts: llamafile's tinyblas computes them and the AMX backends need BF16, so the
    patched guard lets them through (and still refuses IQ3_XXS)."""
    path = tmp_path / "float.gguf"
    w = GGUFWriter(str(path), "deepseek2")
    for layer, qt in (("blk.5", "F32"), ("blk.6", "F16"), ("blk.7", "BF16"), ("blk.8", "IQ3_XXS")):
        for proj in ("gate", "up", "down"):
            if qt == "IQ3_XXS":
                _, size = _sizes(qt)
                w.add_tensor(f"{layer}.ffn_{proj}_exps.weight", blocks(qt, "finite", n=8).reshape(2, 4 * size),
                             raw_dtype=GGMLQuantizationType[qt])
            elif qt == "BF16":
                raw = np.zeros((2, 256 * 2), np.uint8)
                w.add_tensor(f"{layer}.ffn_{proj}_exps.weight", raw, raw_dtype=GGMLQuantizationType.BF16)
            else:
                w.add_tensor(f"{layer}.ffn_{proj}_exps.weight", np.ones((2, 256), np.float32 if qt == "F32" else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tree_parent = tmp_path / "tree"
    shutil.copytree(ROOT / "tests" / "fixtures" / "kt-v031-layout", tree_parent)
    assert _cli("--apply", "--path", str(tree_parent)).returncode == 0
    code = f"""
from ktransformers.util.custom_loader import GGUFLoader
from ktransformers.operators.experts import KExpertsCPU
loader = GGUFLoader({str(path)!r})
print([KExpertsCPU(k, loader).load_weights()[k]["gate_type"] for k in ("blk.5", "blk.6", "blk.7")])
KExpertsCPU("blk.8", loader).load_weights()
"""
    r = _run(tree_parent, tmp_path, code)
    assert r.stdout.strip().splitlines()[0] == "[0, 1, 30]", r.stderr
    assert r.returncode != 0 and "blk.8.ffn_gate_exps.weight are IQ3_XXS" in r.stderr
