import os

import pytest

from conftest import run_cli
from hybridinfer.errors import HybridError
from hybridinfer.engines import support_table
from hybridinfer.inspect_gguf import inspect

GIB = 1024**3


def test_r1_ud_iq1_s_matches_published_shape(models, shapes_dir):
    m = models["r1-ud-iq1_s"]
    assert m.arch == "deepseek2" and m.block_count == 61 and len(m.paths) == 3
    assert m.params == pytest.approx(671.03e9, rel=1e-3)
    assert m.bytes / GIB == pytest.approx(130.60, abs=0.1)  # gguf-parser: 130.60 GiB
    assert m.bpw == pytest.approx(1.67, abs=0.01)
    assert (m.expert_count, m.expert_used_count, m.expert_shared_count, m.leading_dense_block_count) == (256, 8, 1, 3)
    assert m.vocab_size == 129280
    g = m.groups
    assert g["routed_experts"].tensors == 58 * 3
    assert g["routed_experts"].bytes / m.bytes > 0.9
    assert set(g["routed_experts"].types) == {"IQ1_S", "IQ2_XXS"}
    assert g["shared_experts"].tensors == 58 * 3 and g["router"].tensors == 58 * 2
    assert g["dense_ffn"].tensors == 3 * 3
    assert sum(x.bytes for x in g.values()) == m.bytes
    # MLA: (512 + 64) values x 61 layers
    assert m.kv.form == "mla"
    assert m.kv.bytes_per_token == {"f16": 70272, "q8_0": 37332, "q4_0": 19764}
    assert round(m.kv.bytes_per_token["f16"] * 32768 / 2**20) == 2196
    # header only: sparse shards cost almost no disk
    for p in m.paths:
        assert os.stat(p).st_blocks * 512 < 64 * 2**20 < os.path.getsize(p)


def test_legacy_form_detected_and_71x_bigger(models):
    leg, mla = models["r1-ud-iq1_s-legacy"], models["r1-ud-iq1_s"]
    assert leg.kv.form == "legacy-mha"
    assert leg.kv.bytes_per_token["f16"] == 128 * (192 + 128) * 61 * 2
    assert leg.kv.bytes_per_token["f16"] / 2**20 == pytest.approx(4.77, abs=0.01)
    assert 70 < leg.kv.bytes_per_token["f16"] / mla.kv.bytes_per_token["f16"] < 72


def test_other_architectures(models):
    q = models["qwen3moe-30b-a3b-q4_k_m"]
    assert q.arch == "qwen3moe" and q.is_moe and q.expert_count == 128 and q.expert_used_count == 8
    assert q.kv.form == "gqa" and q.kv.bytes_per_token["f16"] == 48 * 4 * (128 + 128) * 2
    assert q.params == pytest.approx(30.5e9, rel=0.02)
    d = models["llama3-8b-q4_k_m"]
    assert not d.is_moe and "routed_experts" not in d.groups
    assert d.params == pytest.approx(8.03e9, rel=0.01)
    assert d.kv.bytes_per_token["f16"] == 32 * 8 * 256 * 2
    mx = models["mixtral-8x7b-q4_k_m"]
    assert mx.arch == "llama" and mx.is_moe and mx.expert_count == 8
    assert models["qwen2moe-a2.7b-q4_k_m"].groups["shared_experts"].tensors == 24 * 4


def test_directory_and_engine_support(shapes_dir, models):
    m = inspect(os.path.dirname(shapes_dir["r1-ud-iq1_s"]))
    assert len(m.paths) == 3
    assert support_table(models["r1-ud-iq1_s"])["routed_experts"]["ktransformers"] == "ok"
    assert support_table(models["r1-ud-iq1_m"])["routed_experts"]["ktransformers"].startswith("refused: IQ1_M")


def test_tiny_model(tiny_model):
    m = inspect(tiny_model)
    assert m.arch == "deepseek2" and m.expert_count == 8 and m.kv.form == "mla"
    assert m.has_chat_template


def _expect_error(path, fragment):
    with pytest.raises(HybridError) as e:
        inspect(path)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_inputs(tmp_path, shapes_dir, tiny_model):
    _expect_error(tmp_path / "nope.gguf", "no such file")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    _expect_error(tmp_path / "x.gguf", "not a GGUF file")
    data = open(tiny_model, "rb").read()
    (tmp_path / "cut-header.gguf").write_bytes(data[:2000])
    _expect_error(tmp_path / "cut-header.gguf", "truncated GGUF header")
    (tmp_path / "cut-data.gguf").write_bytes(data[:-1000])
    _expect_error(tmp_path / "cut-data.gguf", "truncated")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", "no .gguf files")


def test_split_set_errors(tmp_path, shapes_dir):
    src = os.path.dirname(shapes_dir["r1-ud-iq1_s"])
    d = tmp_path / "r1"
    d.mkdir()
    for f in os.listdir(src):  # hard links: a copy would expand the sparse 47 GB shards on disk
        os.link(os.path.join(src, f), d / f)
    first = d / "DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf"
    _expect_error(d / "DeepSeek-R1-UD-IQ1_S-00002-of-00003.gguf", "pass the first shard")
    # a shard from another set: same name, different split.no
    os.replace(d / "DeepSeek-R1-UD-IQ1_S-00003-of-00003.gguf", tmp_path / "keep.gguf")
    _expect_error(first, "missing 1 of 3 shards")
    os.link(d / "DeepSeek-R1-UD-IQ1_S-00002-of-00003.gguf", d / "DeepSeek-R1-UD-IQ1_S-00003-of-00003.gguf")
    _expect_error(first, "says it is shard 1/3, expected 2/3")


def test_cli_inspect(shapes_dir, tmp_path):
    r = run_cli("inspect", "--gguf", shapes_dir["r1-ud-iq1_s"], "--json")
    assert r.returncode == 0, r.stderr
    import json
    d = json.loads(r.stdout)
    assert d["arch"] == "deepseek2" and d["kv"]["form"] == "mla" and "tensors" not in d
    r = run_cli("inspect", "--gguf", shapes_dir["r1-ud-iq1_s"])
    assert r.returncode == 0 and "routed_experts" in r.stdout and "70,272 B/token" in r.stdout
    r = run_cli("inspect", "--gguf", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_opens_think_from_template(models, tiny_model):
    assert inspect(tiny_model).opens_think  # R1-style template: generation prompt ends with <think>
    assert not models["llama3-8b-q4_k_m"].opens_think


def test_tiny_model_has_deepseek_attention_dims(tiny_model, tmp_path):
    """ik_llama.cpp loads a mainline MLA GGUF only with key 576 / value 512, one KV head, rope 64 and heads
    divisible by 4 (its src/llama-hparams.cpp); the demo model keeps those so every engine runs it."""
    m = inspect(tiny_model)
    assert (m.head_count_kv, m.key_length, m.value_length, m.rope_dim) == (1, 576, 512, 64)
    assert m.head_count % 4 == 0 and m.bytes < 16 << 20
    assert m.kv.bytes_per_token["f16"] == 576 * 2 * m.block_count
    from hybridinfer.demo.tiny import write_tiny
    legacy = inspect(write_tiny(tmp_path / "legacy.gguf", mla=False))
    assert legacy.kv.form == "legacy-mha" and (legacy.head_count_kv, legacy.key_length, legacy.value_length) == (4, 192, 128)
    q4 = inspect(write_tiny(tmp_path / "q4.gguf", qtype="q4_0"))
    assert "Q4_0" in q4.quant_types and q4.key_length == 576


def _write_gguf(path, tensors):
    """A minimal GGUF v3 with raw tensors [(name, ggml shape, type id, nbytes)] — for types the gguf package lacks."""
    import struct

    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    kv = s("general.architecture") + struct.pack("<I", 8) + s("llama")
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1) + kv
    off = 0
    for name, shape, t, n in tensors:
        head += s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", t, off)
        off += -(-n // 32) * 32
    head += b"\0" * (-len(head) % 32)
    with open(path, "wb") as f:
        f.write(head + b"\0" * off)


def test_reads_ik_llama_cpp_types(tmp_path):
    # IQ4_K (id 139): 144 B per 256 values; IQ4_KS (144) has 136 B + 4 B per row; IQ1_S_R4 (219): 6 B per 32 + 2 B per row.
    p = tmp_path / "ik.gguf"
    _write_gguf(p, [("blk.0.ffn_up_exps.weight", (256, 8, 4), 139, 32 * 144),
                    ("blk.0.ffn_down_exps.weight", (256, 8, 4), 144, 32 * (4 + 136)),
                    ("blk.0.ffn_gate_exps.weight", (256, 8, 4), 219, 32 * (2 + 8 * 6))])
    m = inspect(p)
    by = {t.name.split(".")[2]: t for t in m.tensors}
    assert (by["ffn_up_exps"].type, by["ffn_down_exps"].type, by["ffn_gate_exps"].type) == ("IQ4_K", "IQ4_KS", "IQ1_S_R4")
    assert by["ffn_down_exps"].nbytes == 32 * 140 and by["ffn_gate_exps"].nbytes == 32 * 50
