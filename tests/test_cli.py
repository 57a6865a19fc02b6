import json

from conftest import run_cli


def test_help_teaches():
    r = run_cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "plan" in r.stdout
    r = run_cli("plan", "--help")
    assert r.returncode == 0 and "--hardware" in r.stdout and "--compare" in r.stdout


def test_probe_json_chains_into_plan(tmp_path, tiny_model):
    r = run_cli("probe", "--json")
    assert r.returncode == 0, r.stderr
    hw = tmp_path / "hw.json"
    hw.write_text(r.stdout)
    r = run_cli("plan", "--hardware", str(hw), "--gguf", tiny_model, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["engine"] == "llama.cpp" and d["command"][1:3] == ["-m", tiny_model]
    assert d["prediction"]["decode_tps"] > 0


def test_plan_default_model_and_compare(shapes_dir):
    r = run_cli("plan")  # the built-in demo model on this box
    assert r.returncode == 0, r.stderr
    assert "tiny DeepSeek-R1" in r.stdout and "Command" in r.stdout
    r = run_cli("plan", "--gguf", shapes_dir["r1-ud-iq1_s"], "--hardware", "desktop-4090", "--compare", "layer-split", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["rules"] == "moe-auto-fill" and d["compare"]["rules"] == "layer-split"
    assert d["prediction"]["decode_tps"] > d["compare"]["prediction"]["decode_tps"]
    assert "-ot" in d["command"] and "-ngl" in d["compare"]["command_line"]
    r = run_cli("plan", "--gguf", shapes_dir["r1-ud-iq1_s"], "--hardware", "xeon4-ddr5-4090", "--json")
    d = json.loads(r.stdout)
    assert d["engine"] == "ktransformers" and "KExpertsCPU" in d["compiled"]["rules"]
    assert d["command"][0] == "ktransformers" and "--optimize_config_path" in d["command"]
    assert d["command"][d["command"].index("--optimize_config_path") + 1] == d["compiled"]["rules_path"]


def test_plan_errors_are_one_line(shapes_dir, tmp_path):
    cases = [
        (["plan", "--hardware", "no-such-box"], "hardware profile 'no-such-box' not found"),
        (["plan", "--rules", "nope"], "placement rules 'nope' not found"),
        (["plan", "--gguf", shapes_dir["r1-ud-iq1_s"], "--hardware", "ci-box"], "GiB short"),
        (["plan", "--ctx", "100"], "too small"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases.append((["plan", "--hardware", str(bad)], "not a valid hardware profile"))
    for args, fragment in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert fragment in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
