"""KTransformers, checked against the real thing with no GPU:
- every legacy-server argv hybridinfer emits is parsed by that release's real `ktransformers/server/args.py` (with its
  real Config and config.yaml): PyPI's sdists for 0.2.1 / 0.2.1.post1, a git mirror of the tags for the rest (those
  tests skip without HYBRIDINFER_KT_GIT; the per-version flag table in kt_versions.py is checked everywhere);
- the optimize-rule YAML names only classes and ops that exist in that release's tree;
- the kt-sglang argv is parsed by SGLang's real argparse setup (sglang 0.5.9 and the sglang-kt 0.7.2 fork, wheels
  from PyPI) and uses a method the real kt-kernel 0.7.2 lists.
"""

import ast
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import kt_source
import pypi_src
import sglang_args
from conftest import ROOT, run_cli
from hybridinfer.engines import kt_probe
from hybridinfer.engines import kt_versions as kv
from hybridinfer.engines import ktransformers_args as ka
from kt_rules import rule_classes
from hybridinfer.errors import HybridError
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.probe import EngineInfo, load_profile

GIB = 1024**3
ALL_TAGS = [t for v in kv.VERSIONS.values() for t in (v.tag, *v.aliases)]
mirror = pytest.mark.skipif(not kt_source.have_mirror(),
                            reason="needs a git mirror of kvcache-ai/ktransformers (HYBRIDINFER_KT_GIT)")


def available(tag: str) -> bool:
    return tag in kt_source.SDISTS or kt_source.have_mirror()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A DeepSeek-R1 config folder as KTransformers reads it (config.json; no weights)."""
    d = tmp_path_factory.mktemp("DeepSeek-R1")
    (d / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                                               "num_hidden_layers": 61}))
    return d


@pytest.fixture(scope="session")
def trees(tmp_path_factory):
    return tmp_path_factory.mktemp("kt-trees")


def with_kt(hw, version, detail="backends: ktransformers, balance_serve; USE_NUMA: off", cc=None):
    engines = [e for e in hw.engines if e.name != "ktransformers"]
    engines.append(EngineInfo(name="ktransformers", installed=True, version=version, detail=detail))
    gpus = [replace(g, compute_capability=cc) for g in hw.gpus] if cc else hw.gpus
    return replace(hw, engines=engines, gpus=gpus)


def model_for(v, models):
    return models["r1-ud-iq1_s"] if v.attn_from_k_b else models["r1-ud-iq1_s-legacy"]


def check_table(v, argv):
    """argv against the release's flag table: known options, switches without values, values after the rest."""
    i = 1
    while i < len(argv):
        opt = argv[i]
        assert opt in v.flags, f"{opt} is not an option of KTransformers {v.name}"
        if opt in v.switches:
            i += 1
        else:
            assert i + 1 < len(argv) and not argv[i + 1].startswith("--"), f"{opt} needs a value"
            i += 2


def parsed(tag, argv, trees):
    r = kt_source.parse(tag, argv, trees)
    assert r["exit"] == 0, f"KTransformers {tag} rejected {argv}: {r['stderr'][-600:]}"
    return r


# --- the per-version flag table is what the real parsers accept ---------------------------------------------------

@pytest.mark.parametrize("tag", ALL_TAGS)
def test_flag_table_is_the_real_parser(tag, trees, model_dir):
    if not available(tag):
        pytest.skip("needs the mirror for this tag")
    v = kv.lookup(tag)
    r = parsed(tag, ["ktransformers", "--model_path", str(model_dir)], trees)
    assert set(r["options"]) == v.flags
    assert {k for k, o in r["options"].items() if o["kind"] == "flag"} == v.switches
    assert r["backend_type"] == v.default_backend  # configs/config.yaml model.type at that tag


def test_version_lookup_and_refusal():
    assert kv.lookup("0.2.1").tag == kv.lookup("v0.2.1.post1").tag == "v0.2.1"
    assert kv.lookup("0.3.2+cu124torch26fancy").tag == "v0.4.1"  # the package metadata lags the tag
    assert kv.lookup("0.2.3.post2").tag == "v0.2.3post1"
    for bad in ("0.2.x (profile)", "0.5.0", "", "latest"):
        with pytest.raises(HybridError) as e:
            kv.lookup(bad)
        assert kv.SUPPORTED in e.value.fix and "\n" not in str(e.value)


def test_tree_detection_on_the_real_sdist(trees):
    root = kt_source.tree("v0.2.1.post1", trees) / "ktransformers"
    v, evidence = kv.detect_tag(root)
    assert v.tag == "v0.2.1" and "__version__ 0.2.1.post1" in evidence


@mirror
@pytest.mark.parametrize("tag", ALL_TAGS)
def test_tree_detection_on_every_tag(tag, tmp_path):
    import subprocess
    arch = subprocess.run(["git", f"--git-dir={kt_source.MIRROR}", "archive", tag, "ktransformers/__init__.py",
                           "ktransformers/server/args.py", "ktransformers/util/utils.py",
                           "ktransformers/server/api/openai/endpoints/chat.py"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=arch.stdout, check=True)
    assert kv.detect_tag(tmp_path / "ktransformers")[0].tag == kv.lookup(tag).tag


# --- the commands hybridinfer emits, per version and backend ------------------------------------------------------

CASES = [(v.tag, "ktransformers") for v in kv.VERSIONS.values()] + \
        [(v.tag, "balance_serve") for v in kv.VERSIONS.values() if v.flashinfer_attn]


@pytest.mark.parametrize("tag,backend", CASES)
def test_command_per_version_parses(tag, backend, models, model_dir, trees):
    v = kv.VERSIONS[tag]
    hw = with_kt(load_profile("xeon4-ddr5-4090"), tag)
    opts = PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(model_dir)},
                       parallel=2 if backend == "balance_serve" else 1)
    p = make_plan(hw, model_for(v, models), opts)
    argv = p.command
    assert argv[0] == "ktransformers" and p.compiled["backend"] == backend and p.compiled["version"] == tag
    check_table(v, argv)
    assert argv[argv.index(v.backend_flag) + 1] == backend  # always explicit (the default changed at v0.2.4, v0.3, v0.4.1)
    assert argv[argv.index("--model_path") + 1] == str(model_dir)
    if v.force_think == "":
        assert "--force_think" not in argv
    elif v.force_think == "value":
        assert argv[argv.index("--force_think") + 1] == "true"
    if backend == "balance_serve":
        assert argv[argv.index("--max_batch_size") + 1] == "2"
    rules = yaml.safe_load(Path(p.compiled["rules_path"]).read_text())
    classes = rule_classes(p.compiled["rules"])
    assert classes <= kv.classes(v), classes - kv.classes(v)
    if backend == "balance_serve":
        assert {"ktransformers.operators.experts.KTransformersExpertsV2", "ktransformers.operators.experts.KDeepseekV3MoEV2",
                v.flashinfer_attn + ".flashinfer_attn", "op:VLinearMarlin"} <= classes
    else:
        assert "ktransformers.operators.attention.KDeepseekV2Attention" in classes
    assert rules and p.compiled["rules"].startswith(f"# KTransformers {v.name}")
    for t in [tag, *v.aliases]:
        if available(t):
            r = parsed(t, argv, trees)
            assert r["backend_type"] == backend
            assert r["args"]["model_path"] == str(model_dir)
            if v.force_think:  # 0.2.1 takes a value, 0.2.2+ a switch: either way the parser reads True
                assert r["force_think"] is True
            else:  # 0.2.0 has no such option
                assert not r.get("force_think")


def test_real_sdist_rejects_what_older_commands_got_wrong(trees, model_dir):
    """What issue 14 found, shown on PyPI's real 0.2.1.post1: --backend_type is unknown there, and its
    --force_think takes a value."""
    r = kt_source.parse("v0.2.1.post1", ["ktransformers", "--model_path", str(model_dir), "--backend_type",
                                         "balance_serve"], trees)
    assert r["exit"] == 2 and "unrecognized arguments: --backend_type" in r["stderr"]
    r = kt_source.parse("v0.2.1.post1", ["ktransformers", "--force_think"], trees)
    assert r["exit"] == 2 and "expected one argument" in r["stderr"]


# --- rules against the real trees ---------------------------------------------------------------------------------

def _tree_has(root: Path, cls: str) -> bool:
    if cls == "torch.nn.Linear":
        return True
    if cls.startswith("op:"):
        name = cls[3:]
        text = (root / "operators" / "linear.py").read_text() + (root / "operators" / "experts.py").read_text()
        return bool(re.search(rf'^\s*"{name}"\s*:', text, re.M))
    mod, _, name = cls.rpartition(".")
    path = root.parent / (mod.replace(".", "/") + ".py")
    return path.is_file() and bool(re.search(rf"^class {re.escape(name)}\b", path.read_text(), re.M))


def _full_tree(tag, dest: Path) -> Path:
    root = dest / f"full-{tag}"
    if not root.is_dir():
        root.mkdir(parents=True)
        if tag in kt_source.SDISTS:
            name = kt_source.SDISTS[tag]
            pypi_src.extract(name, root, (name[:-len(".tar.gz")] + "/ktransformers/",))
            return root / name[:-len(".tar.gz")] / "ktransformers"
        import subprocess
        arch = subprocess.run(["git", f"--git-dir={kt_source.MIRROR}", "archive", tag, "ktransformers"],
                              capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=arch.stdout, check=True)
    if tag in kt_source.SDISTS:
        return root / kt_source.SDISTS[tag][:-len(".tar.gz")] / "ktransformers"
    return root / "ktransformers"


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_class_table_is_the_real_tree(tag, trees):
    if not available(tag):
        pytest.skip("needs the mirror for this tag")
    root = _full_tree(tag, trees)
    missing = sorted(c for c in kv.classes(kv.lookup(tag)) if not _tree_has(root, c))
    assert not missing, f"not in KTransformers {tag}: {missing}"
    # hybridinfer's rules use the classes of the release's own DeepSeek-V3 rule files (plus the Marlin/Torch
    # expert and linear ops those files name in comments or other variants)
    v = kv.lookup(tag)
    own = rule_classes((root / "optimize/optimize_rules/DeepSeek-V3-Chat.yaml").read_text())
    ours = rule_classes(ka.optimize_rules({"blk.3.ffn_up_exps.weight": "cpu", "blk.0.attn_q_a.weight": "gpu:0"}, v))
    # (v0.2.3post1+ ship KMoEGateDeepSeekV3 for the gate; KMoEGate, in every tree, is what the -serve files use)
    assert ours - own <= {"op:KExpertsMarlin", "op:KLinearTorch", "ktransformers.operators.gate.KMoEGate"}, ours - own
    if v.flashinfer_attn:
        own = rule_classes((root / "optimize/optimize_rules/DeepSeek-V3-Chat-serve.yaml").read_text())
        ours = rule_classes(ka.optimize_rules({"blk.3.ffn_up_exps.weight": "cpu", "blk.0.attn_q_a.weight": "gpu:0"},
                                                 v, "balance_serve"))
        assert ours - own <= {"op:KLinearTorch"}, ours - own


# --- every reference profile with a GPU ----------------------------------------------------------------------------

def _gpu_profiles():
    return sorted(p.stem for p in (ROOT / "benchmarks" / "hardware").glob("*.json")
                  if json.loads(p.read_text()).get("gpus"))


# R1 does not fit where KTransformers has no Marlin (V100, Turing: ~30 GiB of bf16 weights) or 8 GB of VRAM; there
# the DeepSeek-architecture demo model stands in (in the GGUF attention form the release reads).
NO_R1 = {"course-vgpu", "budget-2080ti", "laptop-small"}


@pytest.mark.parametrize("profile", _gpu_profiles())
def test_reference_profile_command_parses(profile, shapes_dir, model_dir, trees, tmp_path):
    from hybridinfer.demo.tiny import write_tiny

    hw = load_profile(profile)
    kt = hw.engine("ktransformers")
    v = kv.lookup(kt.version) if kt else kv.VERSIONS["v0.4.1"]  # not installed there: the newest is what it would run
    r1 = shapes_dir["r1-ud-iq1_s" if v.attn_from_k_b else "r1-ud-iq1_s-legacy"]
    base = ["plan", "--hardware", profile, "--engine", "ktransformers", "--kt-model-dir", str(model_dir)]
    runs = []
    if profile in NO_R1:
        r = run_cli(*base, "--gguf", r1)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "GiB short" in r.stderr, r.stderr
        runs.append(base + ["--gguf", str(write_tiny(tmp_path / "tiny.gguf", mla=v.attn_from_k_b))])
    else:
        runs.append(base + ["--gguf", r1])
    if profile == "course-vgpu":
        # The course's published setup (10-14 GB VRAM with R1) is what an Ampere-class vGPU runs.
        d = json.loads((ROOT / "benchmarks/hardware/course-vgpu.json").read_text())
        d["gpus"][0]["compute_capability"] = "8.0"
        (tmp_path / "course-ampere.json").write_text(json.dumps(d))
        runs.append(["plan", "--hardware", str(tmp_path / "course-ampere.json")] + base[3:] + ["--gguf", r1])
    for args in runs:
        r = run_cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout)
        argv = plan["command"]
        check_table(v, argv)
        assert rule_classes(plan["compiled"]["rules"]) <= kv.classes(v)
        if available(v.tag):
            parsed(v.tag, argv, trees)
        assert "ktransformers --model_path" in run_cli(*args).stdout


# --- refusals before launch ---------------------------------------------------------------------------------------

def test_refusals(models, model_dir, tmp_path):
    xeon = load_profile("xeon4-ddr5-4090")
    mla, legacy = models["r1-ud-iq1_s"], models["r1-ud-iq1_s-legacy"]
    opts = PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(model_dir)})

    with pytest.raises(HybridError, match=re.escape(kv.SUPPORTED)):  # unknown version in a profile
        make_plan(with_kt(xeon, "0.2.x (profile)"), mla, opts)
    p = make_plan(with_kt(xeon, "0.9"), mla)  # auto: a reason, not an exception
    kt = next(v for v in p.verdicts if v.engine == "ktransformers")
    assert kt.verdict == "blocked" and kt.reason.startswith("KTransformers version '0.9'")

    with pytest.raises(HybridError, match="no attn_kv_b, which KTransformers 0.2.1 needs"):
        make_plan(with_kt(xeon, "0.2.1"), mla, opts)
    assert make_plan(with_kt(xeon, "0.3.2"), mla, opts).engine == "ktransformers"  # rebuilds it
    assert make_plan(with_kt(xeon, "0.2.1"), legacy, opts).engine == "ktransformers"

    here = replace(with_kt(xeon, "0.3.2"), source="probe")  # planning for this box: the folder must be here
    with pytest.raises(HybridError, match="--kt-model-dir DIR"):
        make_plan(here, mla, PlanOptions(engine="ktransformers"))
    with pytest.raises(HybridError, match="has no config.json"):
        make_plan(here, mla, PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(tmp_path)}))

    with pytest.raises(HybridError, match="at a time"):  # no balance_serve build: one request at a time
        make_plan(with_kt(xeon, "0.3.2", detail="backends: ktransformers"), mla,
                  PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(model_dir)}, parallel=2))
    with pytest.raises(HybridError, match="MLA cache in 16 bits"):
        make_plan(with_kt(xeon, "0.3.2"), mla, replace(opts, kv_type="q8_0"))


def test_marlin_and_iq_gpu_experts(models, model_dir, tmp_path):
    m = models["r1-ud-iq1_s"]
    xeon = load_profile("xeon4-ddr5-4090")
    opts = PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(model_dir)})
    # IQ1_S experts on the GPU need the patch (KExpertsMarlin dequantizes them): auto-fill keeps them on the CPU ...
    p = make_plan(with_kt(xeon, "0.3.2"), m, opts)
    assert not any(d != "cpu" for n, d in p.device_of.items() if "_exps." in n)
    # ... unless the profile says the patch is applied; then Marlin experts, and no CUDA graph (doc/en/FAQ.md)
    p = make_plan(with_kt(xeon, "0.3.2", detail="backends: ktransformers; IQ patch: applied"), m, opts)
    assert any(d != "cpu" for n, d in p.device_of.items() if "_exps." in n)
    assert "op:KExpertsMarlin" in rule_classes(p.compiled["rules"]) and "--no-use_cuda_graph" in p.command
    # explicit rules putting IQ experts on the GPU without the patch: refused with the fix
    rules = tmp_path / "experts-gpu.yaml"
    rules.write_text("name: experts-gpu\nrules:\n  - match: {class: token_embd}\n    device: cpu\n"
                     "  - match: {class: routed_experts, blocks: [3]}\n    device: gpu\n"
                     "  - match: {class: routed_experts}\n    device: cpu\n  - match: {}\n    device: gpu\n")
    with pytest.raises(HybridError, match="IQ patch"):
        make_plan(with_kt(xeon, "0.3.2"), m, replace(opts, rules=str(rules)))
    # Turing with room for bf16 weights (48 GB): KLinearTorch everywhere, experts stay on the CPU
    big = replace(xeon, gpus=[replace(g, name="Quadro RTX 8000", vram_total=48 * GIB, vram_free=0) for g in xeon.gpus])
    patched = "backends: ktransformers; IQ patch: applied"
    p = make_plan(with_kt(big, "0.3.2", detail=patched, cc="7.5"), m, opts)
    assert "op:KLinearMarlin" not in rule_classes(p.compiled["rules"])
    assert not any(d != "cpu" for n, d in p.device_of.items() if "_exps." in n)
    assert "KLinearTorch" in p.verdicts[0].reason
    with pytest.raises(HybridError, match="compute capability 8.0"):
        make_plan(with_kt(big, "0.3.2", detail=patched, cc="7.5"), m, replace(opts, rules=str(rules)))


def test_kv_is_always_the_compressed_mla_cache_and_numa_copies(models, model_dir):
    legacy = models["r1-ud-iq1_s-legacy"]
    p = make_plan(with_kt(load_profile("xeon4-ddr5-4090"), "0.2.1"), legacy,
                  PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(model_dir)}, ctx=8192))
    gpu = next(d for d in p.devices if d.device == "gpu:0")
    assert gpu.kv_cache == 576 * 2 * 61 * 8192 // 61 * 61  # args.py: cache_lens * 2 * 576 * 61, whatever the form
    assert any("KV cache mla form, 70,272 B/token" in r.text for r in p.reasons if r.topic == "context")
    dual = load_profile("dual-6454s-4090d")  # USE_NUMA: on -> a copy per node
    q4 = models["r1-q4_k_m"]
    p = make_plan(dual, q4, PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(model_dir)}))
    assert any("copy of the CPU experts per NUMA node" in w for w in p.warnings)
    off = with_kt(dual, "0.4.1", detail="backends: ktransformers; USE_NUMA: off")
    p = make_plan(off, q4, PlanOptions(engine="ktransformers", engine_options={"kt_model_dir": str(model_dir)}))
    assert not any("per NUMA node" in w for w in p.warnings)
    p = make_plan(dual, q4, PlanOptions(engine="kt-sglang", engine_options={"kt_model_dir": str(model_dir)}))
    assert not any("per NUMA node" in w for w in p.warnings)  # kt-kernel splits the experts across nodes
    assert p.command[p.command.index("--kt-threadpool-count") + 1] == "2"


# --- kt-kernel + SGLang ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", ["sglang", "sglang-kt"])
def test_kt_sglang_command_parses_with_sglangs_real_parser(flavor, models, model_dir, tmp_path_factory):
    hw = load_profile("xeon4-ddr5-4090")
    p = make_plan(hw, models["r1-ud-iq1_s"], PlanOptions(engine="kt-sglang", parallel=2,
                                                         engine_options={"kt_model_dir": str(model_dir)}))
    argv = p.command
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    r = sglang_args.parse(flavor, argv[3:], tmp_path_factory.getbasetemp() / "sglang")
    assert r["exit"] == 0, r["stderr"][-800:]
    a = r["args"]
    assert a["model_path"] == str(model_dir) and a["kt_method"] == "LLAMAFILE" and a["trust_remote_code"]
    assert a["kt_weight_path"] == str(Path(p.model_path).parent) and a["disable_shared_experts_fusion"]
    assert a["attention_backend"] in r["choices"]["attention_backend"]
    assert a["max_running_requests"] == 2 and a["max_total_tokens"] == p.ctx
    # GPU experts sized in the checkpoint's format (FP8 for R1): a 24 GB card holds none next to the FP8 attention
    assert a["kt_num_gpu_experts"] == 0
    gpu = next(d for d in p.devices if d.device == "gpu:0")
    fp8_attention = sum(t.n_elements for t in models["r1-ud-iq1_s"].tensors if t.cls == "attention")
    assert gpu.groups["attention"] >= 0.9 * fp8_attention  # ~1 byte per weight, not the GGUF's ~0.6


def test_kt_kernel_methods_and_cpu_variant_are_the_real_packages(tmp_path):
    wheel = "kt_kernel-0.7.2-cp311-cp311-manylinux_2_35_x86_64.whl"
    assert "LLAMAFILE" in kt_probe.methods(pypi_src.read(wheel, "kt_kernel/experts.py"))
    # hybridinfer's copy of its CPU-variant choice (for profiles of other boxes) == its own detect_cpu_features
    src = pypi_src.read(wheel, "kt_kernel/_cpu_detect.py")
    ns: dict = {}
    exec(compile(src, "_cpu_detect.py", "exec"), ns)
    import io
    for flags in (["avx2"], ["avx2", "avx512f", "avx512bw"], ["avx2", "avx512f", "avx512bw", "avx512_vnni"],
                  ["avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16"],
                  ["amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16"],
                  ["amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw"]):
        ns["open"] = lambda *a, _f=flags, **k: io.StringIO("flags\t\t: " + " ".join(_f) + "\n")
        assert ns["detect_cpu_features"]() == kt_probe.kt_kernel_variant(flags), flags
    # the reference profiles (recorded CPUs of each kind: tests/test_cpu_flags.py)
    for name, prof in (("amx", "xeon4-ddr5-4090"), ("avx512_bf16", "epyc-cpu-only"), ("avx512_bf16", "desktop-4090"),
                       ("avx512_vbmi", "course-vgpu"), ("avx2", "budget-2080ti")):
        assert kt_probe.kt_kernel_variant(load_profile(prof).cpu.flags) == name


def test_probe_reads_the_installed_kt_kernel(tmp_path):
    """probe on an installed kt-kernel 0.7.2 (the wheel's Python files and metadata; its .so are not needed)."""
    import subprocess
    import sys
    wheel = "kt_kernel-0.7.2-cp311-cp311-manylinux_2_35_x86_64.whl"
    pypi_src.extract(wheel, tmp_path, ("kt_kernel/_cpu_detect.py", "kt_kernel/experts.py", "kt_kernel/__init__.py",
                                       "kt_kernel-0.7.2.dist-info/"))
    code = "from hybridinfer.engines.kt_probe import probe_kt_kernel; import json; print(json.dumps(probe_kt_kernel().__dict__))"
    import os
    env = {k: v for k, v in os.environ.items() if k != "KT_KERNEL_CPU_VARIANT"}  # its override skips the detection
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(env, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    info = json.loads(r.stdout)
    from hybridinfer.probe import probe_cpu
    assert info["installed"] and info["version"] == "0.7.2"
    # its own code ran on this box and hybridinfer's copy agrees on it (on every recorded CPU: tests/test_cpu_flags.py)
    assert f"CPU variant: {kt_probe.kt_kernel_variant(probe_cpu().flags)}" in info["detail"]
    assert "LLAMAFILE" in info["detail"]


def test_probe_reads_the_installed_legacy_tree(tmp_path, trees):
    """probe on PyPI's real 0.2.1.post1 tree installed as a package. Its compiled extensions cannot be built here
    (CUDA), so two stand-in files take their place: cpuinfer_ext linked against libnuma (a USE_NUMA=1 build) and
    the top-level sched_ext a USE_BALANCE_SERVE=1 build installs."""
    import os
    import shutil
    import subprocess
    import sys
    site = tmp_path / "site"
    shutil.copytree(kt_source.tree("v0.2.1.post1", trees) / "ktransformers", site / "ktransformers")
    dist = site / "ktransformers-0.2.1.post1+cu121torch24fancy.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ktransformers\nVersion: 0.2.1.post1+cu121torch24fancy\n")
    (site / "cpuinfer_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stand-in NEEDED libnuma.so.1")
    code = ("import json; from hybridinfer.engines.kt_probe import probe_legacy; "
            "print(json.dumps(probe_legacy().__dict__))")
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    info = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)
    assert info["installed"] and info["version"] == "0.2.1"  # the release, read from the tree
    assert "__version__ 0.2.1.post1" in info["detail"] and "package 0.2.1.post1+cu121torch24fancy" in info["detail"]
    assert "backends: ktransformers;" in info["detail"] and "USE_NUMA: on" in info["detail"]
    assert "IQ patch: not applied" in info["detail"]
    (site / "sched_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stand-in")
    info = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)
    assert "backends: ktransformers, balance_serve" in info["detail"]
    # what a profile then records is what the planner reads
    row = EngineInfo(**info)
    assert kt_probe.detail_field(row, "USE_NUMA") == "on" and kt_probe.patch_state(row) == "not applied"


def test_kt_sglang_gpu_experts_are_counted_in_fp8(models, model_dir):
    """An 80 GB GPU holds whole blocks of R1's experts in FP8 (1 byte/weight, not the GGUF's IQ1_S ~0.2), spread by
    kt-kernel as a per-layer count."""
    xeon = load_profile("xeon4-ddr5-4090")
    big = replace(xeon, gpus=[replace(g, name="H100 80GB", vram_total=80 * GIB, vram_free=0, compute_capability="9.0")
                              for g in xeon.gpus])
    m = models["r1-ud-iq1_s"]
    p = make_plan(big, m, PlanOptions(engine="kt-sglang", engine_options={"kt_model_dir": str(model_dir)}))
    on_gpu = [t for t in m.tensors if t.cls == "routed_experts" and p.device_of[t.name] != "cpu"]
    blocks = {t.block for t in on_gpu}
    assert 0 < len(blocks) < 10
    gpu = next(d for d in p.devices if d.device == "gpu:0")
    assert gpu.groups["routed_experts"] >= sum(t.n_elements for t in on_gpu)  # FP8: >= 1 byte per weight
    n = int(p.command[p.command.index("--kt-num-gpu-experts") + 1])
    assert n == len(blocks) * 256 // 58 == p.compiled["gpu_experts_per_layer"]
