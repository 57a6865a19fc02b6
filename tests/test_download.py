"""`hybridinfer download` with the real modelscope and huggingface_hub clients against a loopback hub (tests/hub.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from hub import Hub, write_split

TINY = "hybridinfer/tiny-R1-GGUF"  # Unsloth's layout, small real shards of a loadable model
R1 = "unsloth/DeepSeek-R1-GGUF"  # real-shaped R1 headers (sparse, 131 GB apparent): for planning and disk checks
CONFIG = "deepseek-ai/DeepSeek-R1"
QDIR = "DeepSeek-R1-UD-IQ1_S"
SHARDS = [f"{QDIR}/{QDIR}-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
SOURCES = ["modelscope", "huggingface"]


@pytest.fixture(scope="session")
def repo_trees(tmp_path_factory, shapes_dir):
    from hybridinfer.demo.tiny import write_tiny

    base = tmp_path_factory.mktemp("hub")
    # ~60 MB so a shard outlasts huggingface_hub's 10 MiB write chunk: an interruption leaves bytes to resume from.
    src = write_tiny(base / "src.gguf", n_expert=24, n_embd=512, n_ff_exp=512)
    tiny = base / "tiny"
    write_split(src, tiny / QDIR, QDIR, 3)
    write_split(src, tiny / "DeepSeek-R1-Q4_K_M", "DeepSeek-R1-Q4_K_M", 2)
    shutil.copy(src, tiny / "DeepSeek-R1-Q8_0.gguf")
    (tiny / "README.md").write_text("# tiny R1-architecture GGUF quants\n")
    r1 = base / "r1" / QDIR
    r1.mkdir(parents=True)
    for p in Path(shapes_dir["r1-ud-iq1_s"]).parent.glob("DeepSeek-R1-UD-IQ1_S-*.gguf"):
        os.link(p, r1 / p.name) if p.stat().st_dev == r1.stat().st_dev else shutil.copy(p, r1 / p.name)
    (base / "r1" / "README.md").write_text("# DeepSeek-R1 GGUF\n")
    cfg = base / "config"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 256}))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "configuration_deepseek.py",
                 "modeling_deepseek.py", "model.safetensors.index.json", "README.md"):
        (cfg / name).write_text(f"{name}\n")
    for i in (1, 2):
        (cfg / f"model-0000{i}-of-000163.safetensors").write_bytes(os.urandom(1 << 20))
    return {TINY: tiny, R1: base / "r1", CONFIG: cfg}


@pytest.fixture(autouse=True)
def _isolated_hub_clients(tmp_path, monkeypatch):
    # The clients keep caches, locks and an install id under the home directory: keep them in the test's.
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def hub(repo_trees, tmp_path, monkeypatch):
    h = Hub()
    for repo, root in repo_trees.items():
        h.add(repo, root)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", h.url)
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.close()


def downloaded(hub, path, since=0):
    """Body bytes sent by whole-file or resume GETs (not the planner's header reads, which name an end byte)."""
    return sum(e["sent"] for e in hub.log[since:] if e.get("file") == path and e["method"] == "GET"
               and (e["range"] is None or e["range"].endswith("-")))


def one_line_error(r, fragment, progress_before=False):
    """Exit 2, the error on one line; with progress_before, earlier stderr lines may only be progress lines."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert fragment in lines[-1] and lines[-1].startswith("hybridinfer: error: ") and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 or (progress_before and all(x.startswith("  [") for x in lines[:-1])), r.stderr


def nothing_written(d: Path):
    left = [p for p in d.rglob("*") if p.is_file()] if d.exists() else []
    assert not left, left


@pytest.mark.parametrize("source", SOURCES)
def test_three_shard_quant_downloaded_and_verified(hub, repo_trees, tmp_path, source):
    d = tmp_path / "models"
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # the listing: every quant with its size, the chosen one marked
    assert "UD-IQ1_S" in out and "Q4_K_M" in out and "Q8_0" in out and "<- chosen" in out
    assert "Plan (from the shards' GGUF headers" in out and "predicted decode" in out
    assert "Disk:" in out and "— ok" in out
    first = d / SHARDS[0]
    assert f"hybridinfer serve --gguf {first}" in out
    for s in SHARDS:
        assert (d / s).read_bytes() == (repo_trees[TINY] / s).read_bytes()
        assert downloaded(hub, s) == (repo_trees[TINY] / s).stat().st_size  # each fetched exactly once
    assert not list(d.rglob("*.incomplete"))
    # only the chosen quant was fetched
    assert not any(e.get("file", "").startswith(("DeepSeek-R1-Q4", "DeepSeek-R1-Q8")) for e in hub.log)
    # recorded: plan finds it by name, a second download fetches nothing
    r = run_cli("plan", "--gguf", f"{TINY}:UD-IQ1_S", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_path"] == str(first)
    mark = len(hub.log)
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    assert r.returncode == 0, r.stderr
    assert all(downloaded(hub, s, mark) == 0 for s in SHARDS)


def test_plan_only_lists_checks_and_predicts(hub, tmp_path, shapes_dir):
    d = tmp_path / "models"
    r = run_cli("download", R1, "--plan-only", "--dir", str(d))  # no --quant: the table
    assert r.returncode == 0, r.stderr
    assert "UD-IQ1_S" in r.stdout and "GiB" in r.stdout
    r = run_cli("download", R1, "--quant", "UD-IQ1_S", "--plan-only", "--dir", str(d), "--hardware", "desktop-4090")
    assert r.returncode == 0, r.stderr
    assert "on desktop-4090: engine llama.cpp, rules moe-auto-fill" in r.stdout, r.stdout
    local = run_cli("plan", "--gguf", shapes_dir["r1-ud-iq1_s"], "--hardware", "desktop-4090", "--json")
    tps = json.loads(local.stdout)["prediction"]["decode_tps"]
    assert f"predicted decode {tps:g} tok/s" in r.stdout  # the same as `plan` on the files themselves
    nothing_written(d)
    header = sum(e["sent"] for e in hub.log if e.get("file"))
    assert header < 16 << 20 and downloaded(hub, SHARDS[0]) == 0  # headers only, of a 131 GB quant


def test_box_that_cannot_hold_it_needs_force_then_disk_says_how_short(hub, tmp_path):
    d = tmp_path / "models"
    r = run_cli("download", R1, "--quant", "UD-IQ1_S", "--dir", str(d), "--hardware", "ci-box")
    one_line_error(r, "--force")
    assert "cannot serve it on ci-box" in r.stderr
    free_gib = shutil.disk_usage(tmp_path).free / 2**30
    # --keep-free larger than the free space makes the shortfall certain on any disk
    r = run_cli("download", R1, "--quant", "UD-IQ1_S", "--dir", str(d), "--hardware", "ci-box", "--force",
                "--keep-free", str(int(free_gib) + 1))
    one_line_error(r, "GiB short")
    assert "not enough disk for UD-IQ1_S" in r.stderr
    nothing_written(d)
    assert downloaded(hub, SHARDS[0]) == 0


@pytest.mark.parametrize("source,sig", [("modelscope", signal.SIGINT), ("huggingface", signal.SIGINT),
                                        ("modelscope", signal.SIGKILL)], ids=["modelscope-ctrl-c", "huggingface-ctrl-c", "modelscope-kill"])
def test_interrupted_download_resumes_with_only_the_rest(hub, repo_trees, tmp_path, source, sig):
    d = tmp_path / "models"
    size2 = (repo_trees[TINY] / SHARDS[1]).stat().st_size
    part = d / (SHARDS[1] + ".incomplete")
    # The hub holds the second shard after 3/4 of its bytes until released: the interruption lands mid-shard
    # however fast this machine is, and no waiting on a throttled transfer.
    hub.hold_once[SHARDS[1]] = size2 * 3 // 4
    exe = str(Path(sys.executable).parent / "hybridinfer")
    p = subprocess.Popen([exe, "download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.held.wait(120), p.stderr.read() if p.poll() is not None else "the shard was never requested"
        deadline = time.time() + 60  # the client writes what it received (huggingface_hub in 10 MiB chunks)
        while not (part.exists() and part.stat().st_size > 0) and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert p.poll() is None, p.communicate()[1]
        p.send_signal(sig)  # Ctrl-C (or a killed process) mid-shard, while the client waits for the rest
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        hub.release()
    if sig == signal.SIGINT:
        assert p.returncode == 130, err
        assert "rerun the same command to resume" in err
    else:
        assert p.returncode == -signal.SIGKILL
    assert not (d / SHARDS[1]).exists() and not (d / SHARDS[2]).exists()  # no partial file under a model name
    kept = part.stat().st_size
    assert 0 < kept <= size2 * 3 // 4
    mark = len(hub.log)
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    assert r.returncode == 0, r.stderr
    assert downloaded(hub, SHARDS[0], mark) == 0  # finished before the interruption: not fetched again
    assert downloaded(hub, SHARDS[1], mark) == size2 - kept  # exactly the rest
    assert [e["range"] for e in hub.log[mark:] if e.get("file") == SHARDS[1] and e["range"] and e["range"].endswith("-")] \
        == [f"bytes={kept}-"]
    assert (d / SHARDS[1]).read_bytes() == (repo_trees[TINY] / SHARDS[1]).read_bytes()


@pytest.mark.parametrize("source", SOURCES)
def test_lost_connection_resumes_within_the_run(hub, repo_trees, tmp_path, source):
    d = tmp_path / "models"
    size2 = (repo_trees[TINY] / SHARDS[1]).stat().st_size
    hub.drop_once[SHARDS[1]] = size2 * 3 // 4
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    assert r.returncode == 0, r.stderr
    gets = [e for e in hub.log if e.get("file") == SHARDS[1] and e["method"] == "GET"
            and (e["range"] is None or e["range"].endswith("-"))]
    assert len(gets) == 2 and gets[0]["sent"] == size2 * 3 // 4
    resumed_at = int(gets[1]["range"][len("bytes="):-1])
    assert 0 < resumed_at <= size2 * 3 // 4 and gets[1]["sent"] == size2 - resumed_at
    assert (d / SHARDS[1]).read_bytes() == (repo_trees[TINY] / SHARDS[1]).read_bytes()


@pytest.mark.parametrize("source", SOURCES)
def test_missing_shard(hub, tmp_path, source):
    d = tmp_path / "models"
    hub.missing.add(SHARDS[2])  # listed, but the hub has no such file
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    one_line_error(r, f"{SHARDS[2]}: not found on")
    nothing_written(d)
    del hub.repos[TINY][SHARDS[2]]  # not even listed
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    one_line_error(r, "lists 2 of the 3 shards of UD-IQ1_S (missing DeepSeek-R1-UD-IQ1_S-00003-of-00003.gguf)")
    nothing_written(d)


@pytest.mark.parametrize("source", SOURCES)
def test_corrupted_shard(hub, repo_trees, tmp_path, source):
    d = tmp_path / "models"
    bad = tmp_path / "bad.gguf"
    data = bytearray((repo_trees[TINY] / SHARDS[1]).read_bytes())
    data[:4] = b"GGUX"
    bad.write_bytes(data)
    hub.repos[TINY][SHARDS[1]] = bad
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    one_line_error(r, "not a GGUF file")
    nothing_written(d)
    hub.repos[TINY][SHARDS[1]] = repo_trees[TINY] / SHARDS[1]
    hub.size_lie[SHARDS[2]] = (repo_trees[TINY] / SHARDS[2]).stat().st_size + 4096  # listing and bytes disagree
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    one_line_error(r, "the hub sent a different size than its listing says", progress_before=True)
    assert not (d / SHARDS[2]).exists() and not list(d.rglob("*.incomplete"))


@pytest.mark.parametrize("source", SOURCES)
def test_shard_damaged_in_transfer_fails_verification(hub, tmp_path, source):
    d = tmp_path / "models"
    hub.flaky.add(SHARDS[1])
    hub.no_sha.add(SHARDS[1])  # with a listed SHA-256 ModelScope's client would catch it first
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(d), "--source", source)
    one_line_error(r, f"{Path(SHARDS[1]).name} failed verification (not a GGUF file", progress_before=True)
    assert "removed" in r.stderr and not (d / SHARDS[1]).exists()
    assert "hybridinfer serve" not in r.stdout
    from hybridinfer.download.registry import find_gguf
    assert find_gguf(TINY, "UD-IQ1_S") is None


@pytest.mark.parametrize("source", SOURCES)
def test_unknown_repository_or_quant(hub, tmp_path, source):
    d = tmp_path / "models"
    r = run_cli("download", "nobody/no-such-model-GGUF", "--quant", "Q4_K_M", "--dir", str(d), "--source", source)
    one_line_error(r, "nobody/no-such-model-GGUF: not found on")
    r = run_cli("download", TINY, "--quant", "Q9_9", "--dir", str(d), "--source", source)
    one_line_error(r, f"{TINY} has no quant 'Q9_9' — available: ")
    assert re.search(r"UD-IQ1_S [0-9.]+ MiB", r.stderr) and "Q4_K_M" in r.stderr
    r = run_cli("download", TINY, "--dir", str(d), "--source", source)
    one_line_error(r, "has 3 quants — choose one with --quant")
    nothing_written(d)


def test_hub_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--dir", str(tmp_path / "m"))
    one_line_error(r, "cannot reach ModelScope at http://127.0.0.1:9")


@pytest.mark.parametrize("source", SOURCES)
def test_kt_config_without_weights(hub, repo_trees, tmp_path, source):
    from hybridinfer.download import kt_config_dir

    d = tmp_path / "R1-config"
    r = run_cli("download", "--kt-config", CONFIG, "--dir", str(d), "--source", source)
    assert r.returncode == 0, r.stderr
    got = sorted(p.name for p in d.rglob("*") if p.is_file())
    assert "config.json" in got and "tokenizer.json" in got and "modeling_deepseek.py" in got
    assert not [n for n in got if n.endswith(".safetensors")] and not list(d.rglob("*.incomplete"))
    assert kt_config_dir(CONFIG) == d and kt_config_dir("deepseek-ai/other") is None
    assert not any(e.get("file", "").endswith(".safetensors") for e in hub.log)
    # both of the course's downloads in one command: the config folder goes beside the quant, named like its repository
    both = tmp_path / "both"
    r = run_cli("download", TINY, "--quant", "UD-IQ1_S", "--kt-config", CONFIG, "--dir", str(both), "--source", source)
    assert r.returncode == 0, r.stderr
    assert (both / SHARDS[0]).is_file() and (both / "DeepSeek-R1" / "config.json").is_file()
    assert kt_config_dir(CONFIG) == both / "DeepSeek-R1"


def test_repo_refs():
    from hybridinfer.download import is_repo_ref, parse_ref

    assert is_repo_ref("unsloth/DeepSeek-R1-GGUF:UD-IQ1_S") and is_repo_ref("unsloth/DeepSeek-R1-GGUF")
    assert not is_repo_ref("models/x.gguf") and not is_repo_ref("x.gguf") and not is_repo_ref(None)
    assert parse_ref("unsloth/DeepSeek-R1-GGUF:UD-IQ1_S") == ("unsloth/DeepSeek-R1-GGUF", "UD-IQ1_S")


def test_quant_detection():
    from hybridinfer.download.layout import RemoteFile, find_quants

    files = [RemoteFile(p, 10) for p in (
        "DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf",
        "DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-00003-of-00003.gguf",
        "DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-00002-of-00003.gguf",
        "Q4_K_M/DeepSeek-R1-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/DeepSeek-R1-Q4_K_M-00002-of-00002.gguf",
        "qwen2.5-7b-instruct-q4_k_m.gguf", "Qwen3-30B-A3B-UD-Q4_K_XL.gguf", "BF16/Model-BF16-00001-of-00002.gguf",
        "mmproj-F16.gguf", "README.md")]
    q = {x.label: x for x in find_quants(files)}
    assert set(q) == {"UD-IQ1_S", "Q4_K_M", "q4_k_m", "UD-Q4_K_XL", "BF16"}
    assert [f.path[-13:] for f in q["UD-IQ1_S"].files] == ["1-of-00003.gguf"[-13:], "2-of-00003.gguf"[-13:], "3-of-00003.gguf"[-13:]]
    assert q["UD-IQ1_S"].size == 30 and not q["UD-IQ1_S"].missing
    assert q["BF16"].missing == ("Model-BF16-00002-of-00002.gguf",)


@pytest.mark.engine
@pytest.mark.skipif(not shutil.which("llama-server", path=str(Path(sys.executable).parent)), reason="needs llama-server")
@pytest.mark.parametrize("source", SOURCES)
def test_serve_by_repository_name(hub, repo_trees, tmp_path, source):
    from served import Served

    # not here yet: listed, checked, fetched, verified, served
    s = Served(["--gguf", f"{TINY}:UD-IQ1_S", "--source", source], tmp_path)
    try:
        out = "\n".join(s.lines)
        assert "<- chosen" in out and "Plan (from the shards' GGUF headers" in out
        for sh in SHARDS:
            assert downloaded(hub, sh) == (repo_trees[TINY] / sh).stat().st_size
        c = s.client()
        assert [m.id for m in c.models.list().data] == ["DeepSeek-R1-UD-IQ1_S"]
        r = c.chat.completions.create(model="DeepSeek-R1-UD-IQ1_S", messages=[{"role": "user", "content": "hello"}],
                                      max_tokens=8, temperature=0)
        assert r.usage.completion_tokens > 0
    finally:
        s.stop()
    mark = len(hub.log)
    s = Served(["--gguf", f"{TINY}:UD-IQ1_S"], tmp_path)  # now from the registry: the hub is not asked at all
    try:
        assert hub.log[mark:] == []
        assert s.client().models.list().data[0].id == "DeepSeek-R1-UD-IQ1_S"
    finally:
        s.stop()
