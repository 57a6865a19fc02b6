"""The engine seam (issue 10): one registry, engines chosen by what they can run and how fast, never by names."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli, verdict
from hybridinfer import engines
from hybridinfer.engines.supervisor import free_port
from hybridinfer.errors import HybridError
from hybridinfer.plan import Plan, PlanOptions, make_plan
from hybridinfer.probe import load_profile
from hybridinfer.util import dump_json

ENGINE_NAMES = ("llama.cpp", "ktransformers", "kt-kernel", "ik_llama.cpp", "llama-cpp-python", "llama-server")

# Attention (and everything else but the routed experts' neighbours) of the first blocks on the CPU: an engine that
# keeps attention on CUDA cannot run this placement.
ATTN_ON_CPU = {
    "name": "moe-experts-on-cpu",  # a misleading name: the choice must rest on the placement, not on names
    "description": "my rules: the first 10 blocks entirely on the CPU, the rest like moe-experts-on-cpu",
    "rules": [{"match": {"blocks": "0-9"}, "device": "cpu"},
              {"match": {"class": "routed_experts"}, "device": "cpu"},
              {"match": {"class": "token_embd"}, "device": "cpu"},
              {"match": {}, "device": "gpu"}],
}


def _string_literals(path: Path):
    """(line, text) of every string constant that is not a docstring (f-string parts included)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n.lineno, n.value


def test_no_engine_name_outside_engines():
    import re

    pat = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(n) for n in ENGINE_NAMES) + r")(?![\w-]|\.\w)", re.I)
    pkg = ROOT / "hybridinfer"
    found = [f"{f.relative_to(ROOT)}:{line}: {m.group(0)!r}"
             for f in sorted(pkg.rglob("*.py")) if "engines" not in f.relative_to(pkg).parts
             for line, text in _string_literals(f) for m in pat.finditer(text)]
    assert not found, "engine names belong under hybridinfer/engines/ (ask the registry):\n" + "\n".join(found)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at run time (function-level ones included, TYPE_CHECKING ones not)."""
    pkg = ROOT / "hybridinfer"
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        tree = ast.parse(f.read_text())
        skip = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
                for b in n.body for x in ast.walk(b)}
        for n in ast.walk(tree):
            if id(n) in skip:
                continue
            if isinstance(n, ast.ImportFrom):
                target = ".".join(base[:len(base) - n.level + 1] + ([n.module] if n.module else [])) if n.level else n.module
                cands = [target] + [f"{target}.{a.name}" for a in n.names]
            elif isinstance(n, ast.Import):
                cands = [a.name for a in n.names]
            else:
                continue
            graph[m] |= {c for c in cands if c in mods and c != m}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_early_stages_import_no_engine():
    """probe, the model families, inspect, rules and predict come before the engines on the data path: nothing they
    run imports one."""
    graph = _import_graph()
    for start in ("hybridinfer.probe", "hybridinfer.archs", "hybridinfer.inspect_gguf", "hybridinfer.rules",
                  "hybridinfer.predict"):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        assert not [m for m in seen if m.startswith("hybridinfer.engines")], (start, sorted(seen))


def test_registry_is_the_one_list():
    assert list(engines.REGISTRY) == engines.names() and engines.DEFAULT in engines.REGISTRY
    for name, e in engines.REGISTRY.items():
        assert e.name == name and e.summary and e.kind in ("server", "in-process") and e.install_hint
    with pytest.raises(HybridError, match="unknown engine 'nope'"):
        engines.get("nope")
    r = run_cli("plan", "--help")
    assert all(n in r.stdout for n in engines.names())  # --engine's choices come from the registry


def test_attention_on_cpu_falls_back_with_the_reason(models, tmp_path):
    """Was a traceback (ktransformers_args.Unsupported): a placement an engine cannot run is a blocker."""
    rules = tmp_path / "my-rules.yaml"
    rules.write_text(yaml.safe_dump(ATTN_ON_CPU))
    xeon = load_profile("xeon4-ddr5-4090")
    p = make_plan(xeon, models["r1-ud-iq1_s"], PlanOptions(rules=str(rules)))
    assert (p.engine, p.verdicts[0].engine, p.verdicts[0].verdict) == ("llama.cpp", "llama.cpp", "chosen")
    kt = verdict(p, "ktransformers")
    assert kt.verdict == "blocked" and kt.reason.startswith("this placement keeps attention")
    assert "on the CPU (blocks 0-9)" in kt.reason
    with pytest.raises(HybridError, match="ktransformers cannot run this plan: this placement"):
        make_plan(xeon, models["r1-ud-iq1_s"], PlanOptions(rules=str(rules), engine="ktransformers"))


def test_attention_on_cpu_cli_is_one_line(shapes_dir, tmp_path):
    rules = tmp_path / "my-rules.yaml"
    rules.write_text(yaml.safe_dump(ATTN_ON_CPU))
    base = ["plan", "--gguf", shapes_dir["r1-ud-iq1_s"], "--hardware", "xeon4-ddr5-4090", "--rules", str(rules)]
    r = run_cli(*base)
    assert r.returncode == 0 and "engine ktransformers: blocked because" in r.stdout, r.stderr
    r = run_cli(*base, "--engine", "ktransformers")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "ktransformers cannot run this plan" in r.stderr
    r = run_cli(*base, "--engine", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and all(n in r.stderr for n in engines.names()), r.stderr


def test_choice_does_not_depend_on_the_rules_name(models, tmp_path):
    xeon, m = load_profile("xeon4-ddr5-4090"), models["r1-ud-iq1_s"]
    experts = yaml.safe_load((ROOT / "placement_rules" / "moe-experts-on-cpu.yaml").read_text())
    for name in ("layer-split", "cpu-only", "multi-gpu", "anything"):
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump({**experts, "name": name}))
        assert make_plan(xeon, m, PlanOptions(rules=str(f))).engine == "ktransformers", name
    # ... and the shipped layer split keeps whole blocks (attention included) on the CPU: blocked by placement.
    p = make_plan(xeon, m, PlanOptions(rules="layer-split"))
    kt = verdict(p, "ktransformers")
    assert p.engine == "llama.cpp" and kt.verdict == "blocked" and kt.reason.startswith("this placement")


def test_auto_lists_every_engine_and_picks_the_fastest(models):
    xeon = load_profile("xeon4-ddr5-4090")
    p = make_plan(xeon, models["r1-ud-iq1_s"])
    verdicts = {v.engine: v for v in p.verdicts}
    assert list(verdicts) == [p.engine, *(n for n in verdicts if n != p.engine)]  # the chosen one first
    assert set(verdicts) == set(engines.names())
    assert p.engine == "ktransformers" and verdicts["ktransformers"].verdict == "chosen"
    assert verdicts["ktransformers"].decode_tps == p.prediction.decode_tps
    assert verdicts["llama.cpp"].verdict == "slower" and verdicts["llama.cpp"].decode_tps < p.prediction.decode_tps
    assert make_plan(xeon, models["r1-ud-iq1_s"], PlanOptions(engine="llama.cpp")).prediction.decode_tps == verdicts["llama.cpp"].decode_tps


def test_plan_carries_command_and_compiled_placement(models):
    p = make_plan(load_profile("desktop-4090"), models["r1-ud-iq1_s"])
    assert p.command[1:3] == ["-m", p.model_path] and "-ot" in p.command
    assert p.compiled["ngl"] == 999 and p.compiled["overrides"]
    back = Plan.from_json(dump_json(p.to_dict()))  # what `plan --json` writes, without the per-tensor placement
    assert back.command == p.command and back.compiled == p.compiled and not back.device_of
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.command = []  # frozen


def test_parallel_beyond_an_engines_slots_is_a_blocker(models):
    hw = load_profile("desktop-4090")
    with pytest.raises(HybridError, match="serves one request at a time"):
        make_plan(hw, models["r1-ud-iq1_s"], PlanOptions(engine="llama-cpp-python", parallel=2))


def test_serve_refuses_an_engine_that_is_not_installed(tiny_model):
    missing = [e for e in engines.REGISTRY.values() if e.serves and (i := e.probe()) is not None and not i.installed]
    if not missing:
        pytest.skip("every servable engine is installed here")
    e = missing[0]
    r = run_cli("serve", "--engine", e.name, "--gguf", tiny_model, "--port", str(free_port()))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not installed" in r.stderr and e.install_hint in r.stderr


def test_serve_plan_conflicts_with_plan_options(tmp_path, tiny_model):
    r = run_cli("plan", "--gguf", tiny_model, "--json")
    f = tmp_path / "plan.json"
    f.write_text(r.stdout)
    r = run_cli("serve", "--plan", str(f), "--ctx", "4096")
    assert r.returncode == 2 and "--plan fixes the plan; --ctx" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("serve", "--plan", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "plan file" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.engine
def test_serve_plan_runs_the_planned_argv(tmp_path, tiny_model):
    """`plan --json > plan.json; serve --plan plan.json` runs plan.command: only the runtime flags differ."""
    from served import Served

    from hybridinfer.engines.binaries import find_llama_binary

    e = engines.get(engines.DEFAULT)
    if not find_llama_binary(e.server_binary):
        pytest.skip(f"needs {e.server_binary} (./install.sh)")
    r = run_cli("plan", "--gguf", tiny_model, "--threads", "2", "--ctx", "4096", "--parallel", "2", "--json")
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)
    f = tmp_path / "plan.json"
    f.write_text(r.stdout)
    s = Served(["--plan", str(f), "--alias", "tiny"], tmp_path)
    try:
        argv = Path(f"/proc/{s.engine_pid()}/cmdline").read_text().split("\0")[:-1]
        assert planned["engine"] == e.name and argv[0] == planned["command"][0]
        assert e.strip_runtime(argv) == e.strip_runtime(planned["command"])
        extra = [a for a in argv if a.startswith("-") and a not in planned["command"]]
        assert set(extra) <= set(e.runtime_flags) and "--alias" in extra
        assert f"(saved plan {f})" in "\n".join(s.lines)
        assert [m.id for m in s.client().models.list().data] == ["tiny"]
    finally:
        s.stop()


@pytest.mark.engine
def test_bench_serves_and_engine_benches_one_plan(tmp_path, tiny_model):
    """`bench --plan` hands the same plan to `serve` and to the engine's own benchmark: no second planning."""
    from hybridinfer.engines.binaries import find_llama_binary

    e = engines.get(engines.DEFAULT)
    if not (find_llama_binary(e.server_binary) and find_llama_binary(e.bench_binary)):
        pytest.skip(f"needs {e.server_binary} and {e.bench_binary} (./install.sh)")
    r = run_cli("plan", "--gguf", tiny_model, "--threads", "1", "--ctx", "2048", "--json")
    planned = json.loads(r.stdout)
    f = tmp_path / "plan.json"
    f.write_text(r.stdout)
    out = tmp_path / "r.json"
    r = run_cli("bench", "--plan", str(f), "--requests", "2", "--max-tokens", "4", "--engine-bench",
                "--engine-bench-prompt", "16", "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())  # the console wraps long lines
    assert "serve --port" in said and f"--plan {f}" in said  # serve ran the saved plan
    cmd = json.loads(out.read_text())["engine_bench"]["command"]
    assert cmd[cmd.index("-m") + 1] == planned["model_path"] and cmd[cmd.index("-t") + 1] == "1"
    assert cmd[cmd.index("-ngl") + 1] == str(planned["compiled"]["ngl"])
    r = run_cli("bench", "--plan", str(f), "--gguf", tiny_model)
    assert r.returncode == 2 and "--plan fixes the model" in r.stderr and r.stderr.count("\n") == 1


def test_no_engine_module_imported_outside_engines():
    """Callers ask the registry (`engines.get(name).parse_bench`, ...), never an engine's module."""
    mods = {m.__name__.rsplit(".", 1)[1] for m in engines._MODULES}
    pkg = ROOT / "hybridinfer"
    found = []
    for f in sorted(pkg.rglob("*.py")):
        if "engines" in f.relative_to(pkg).parts:
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            names = ([n.module or ""] + [f"{n.module}.{a.name}" for a in n.names]) if isinstance(n, ast.ImportFrom) \
                else [a.name for a in n.names] if isinstance(n, ast.Import) else []
            found += [f"{f.relative_to(ROOT)}:{n.lineno}" for x in names
                      if x.split(".")[-2:-1] == ["engines"] and x.split(".")[-1] in mods]
    assert not found, found


def test_for_box_returns_a_new_frozen_engine(models, tmp_path):
    """Per-box facts live on a new object; the registry's instance (which runs saved plans) never changes."""
    xeon, m = load_profile("xeon4-ddr5-4090"), models["r1-ud-iq1_s"]
    for e in engines.REGISTRY.values():
        before = dict(vars(e))
        bound = e.for_box(xeon, PlanOptions(parallel=2, engine_options={"kt_model_dir": str(tmp_path)}), m)
        assert type(bound) is type(e) and dict(vars(e)) == before, e.name
        if bound is not e:  # an engine with facts per box: a frozen copy holding them
            with pytest.raises(dataclasses.FrozenInstanceError):
                bound.model_dir = "elsewhere"
            assert bound.model_dir == str(tmp_path)


def test_engine_options_are_declared_and_validated(models):
    declared = engines.options()
    assert declared and len({o.flag for o in declared}) == len(declared)
    r = run_cli("plan", "--help")
    assert all(o.flag in r.stdout for o in declared)  # each declared option is a flag, once
    hw, m = load_profile("desktop-4090"), models["r1-ud-iq1_s"]
    with pytest.raises(HybridError, match="unknown engine option 'kt_modeldir'"):
        make_plan(hw, m, PlanOptions(engine_options={"kt_modeldir": "/x"}))
    key = declared[0].key
    owner = next(e for e in engines.REGISTRY.values() if declared[0] in e.options)
    with pytest.raises(HybridError, match=f"engine option '{key}' must be text"):
        make_plan(hw, m, PlanOptions(engine=owner.name, engine_options={key: 3}))


def test_each_engine_reports_its_own_probe_rows():
    rows = {e.name: [i.name for i in e.probe_all()] for e in engines.REGISTRY.values()}
    flat = [n for names in rows.values() for n in names]
    assert len(flat) == len(set(flat)) and [i.name for i in engines.probe_all()] == flat
    for name, names in rows.items():  # an engine's rows include the one its `installed` looks for
        e = engines.get(name)
        assert not names or set(names) & set(e.probe_names or (e.name,)), (name, names)


def test_a_llama_cpp_fork_is_one_subclass_and_one_registry_entry(models, monkeypatch):
    """What ik_llama.py does, at its smallest: a name, binaries, and llama.cpp's planning, command and bench."""
    from hybridinfer.engines.llamacpp import LlamaCpp

    class Fork(LlamaCpp):
        name = "my-fork"
        summary = "my llama.cpp fork"
        server_binary, bench_binary = "my-fork-server", "my-fork-bench"

    monkeypatch.setitem(engines.REGISTRY, Fork.name, Fork())  # the one registry line (_MODULES)
    p = make_plan(load_profile("desktop-4090"), models["r1-ud-iq1_s"], PlanOptions(engine="my-fork"))
    assert p.engine == "my-fork" and p.command[0].endswith("my-fork-server") and "-ot" in p.command
    assert engines.get(p.engine).bench_command(p)[0].endswith("my-fork-bench")
