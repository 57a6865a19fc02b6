import pytest

from hybridinfer import rules
from hybridinfer.errors import HybridError

GIB = 1024**3


def test_shipped_rules_load():
    names = rules.available()
    for n in ("moe-experts-on-cpu", "moe-auto-fill", "layer-split", "multi-gpu", "cpu-only"):
        assert n in names
        rs = rules.load(n)
        assert rs.rules and rs.description


@pytest.mark.parametrize("doc,fragment", [
    ({"rules": [{"match": {}, "device": "tpu"}]}, "unknown device 'tpu'"),
    ({"rules": [{"match": {"name": "blk.(("}, "device": "cpu"}]}, "bad regex"),
    ({"rules": [{"match": {"class": "experts"}, "device": "cpu"}]}, "unknown tensor class"),
    ({"rules": [{"match": {}, "device": "cpu", "colour": 1}]}, "unknown key"),
    ({"rules": [{"match": {"blocks": "x-y"}, "device": "cpu"}]}, "blocks 'x-y' not understood"),
    ({"rules": []}, "non-empty `rules:`"),
    ({"rules": [{"match": {}, "device": "auto", "fill": "middle"}]}, "fill must be first or last"),
])
def test_validation_errors(doc, fragment):
    with pytest.raises(HybridError) as e:
        rules.parse(doc, "t.yaml")
    assert fragment in str(e.value)


def test_bad_yaml_and_unknown_name(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("rules:\n  - match: {\n")
    with pytest.raises(HybridError, match="not valid YAML"):
        rules.load(str(f))
    with pytest.raises(HybridError, match="one of: cpu-only"):
        rules.load("no-such-rules")


def test_warnings_shadowed_and_unmatched(models):
    rs = rules.parse({"rules": [
        {"match": {"class": "routed_experts"}, "device": "cpu"},
        {"match": {"name": r"ffn_up_exps"}, "device": "gpu"},  # shadowed by rule 1
        {"match": {"name": r"no_such_tensor"}, "device": "gpu"},
        {"match": {}, "device": "gpu"},
    ]})
    p = rules.resolve(rs, models["r1-ud-iq1_s"], {"gpu:0": 100 * GIB})
    assert any("rule 2" in w and "shadowed" in w for w in p.warnings)
    assert any("rule 3" in w and "matches no tensor" in w for w in p.warnings)


def test_block_ranges_and_auto_fill(models):
    m = models["r1-ud-iq1_s"]
    rs = rules.parse({"rules": [
        {"match": {"class": "routed_experts", "blocks": "3-4"}, "device": "gpu"},
        {"match": {"class": "routed_experts"}, "device": "cpu"},
        {"match": {}, "device": "gpu"},
    ]})
    p = rules.resolve(rs, m, {"gpu:0": 100 * GIB})
    assert p.device_of["blk.3.ffn_up_exps.weight"] == "gpu:0"
    assert p.device_of["blk.5.ffn_up_exps.weight"] == "cpu"
    # auto-fill: budget for exactly two MoE blocks of experts beyond the fixed GPU part
    fixed = sum(t.nbytes for t in m.tensors if t.cls not in ("routed_experts", "token_embd"))
    per_block = sum(t.nbytes for t in m.tensors if t.cls == "routed_experts" and t.block == 3)
    p = rules.resolve(rules.load("moe-auto-fill"), m, {"gpu:0": fixed + int(2.5 * per_block)})
    gpu_blocks = sorted({t.block for t in m.tensors if t.cls == "routed_experts" and p.device_of[t.name] != "cpu"})
    assert gpu_blocks == [3, 4]


def test_no_gpu_resolves_to_cpu(models):
    p = rules.resolve(rules.load("moe-auto-fill"), models["r1-ud-iq1_s"], {})
    assert set(p.device_of.values()) == {"cpu"}
