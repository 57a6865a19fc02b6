"""The GB-scale benchmark model: layout checked without writing GBs; the real file loaded by llama.cpp (slow)."""

import os
import subprocess

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from conftest import run_cli
from hybridinfer.demo import mid
from hybridinfer.ggufio import read_header
from hybridinfer.inspect_gguf import inspect
from hybridinfer.engines.binaries import find_llama_binary

SMALL = mid.Shape(blocks=3, n_expert=4, n_used=2, vocab=512, ff_dense=512)


@pytest.mark.parametrize("variant", mid.VARIANTS)
def test_header_shapes_and_types_without_the_data(tmp_path, variant):
    path = mid.write_mid(tmp_path / "m.gguf", variant, data=False)
    assert os.stat(path).st_blocks * 512 < 64 << 20  # sparse: the GBs are not on disk
    h = read_header(path)
    md = h.metadata
    assert md["deepseek2.block_count"] == 27 and md["deepseek2.leading_dense_block_count"] == 1
    assert md["deepseek2.embedding_length"] == 2048 and md["deepseek2.attention.head_count"] == 16
    assert md["deepseek2.attention.head_count_kv"] == 1
    assert (md["deepseek2.attention.key_length"], md["deepseek2.attention.value_length"]) == (576, 512)
    assert (md["deepseek2.attention.key_length_mla"], md["deepseek2.attention.value_length_mla"]) == (192, 128)
    assert "deepseek2.attention.q_lora_rank" not in md  # V2-Lite: plain attn_q
    assert (md["deepseek2.expert_count"], md["deepseek2.expert_used_count"], md["deepseek2.expert_shared_count"]) == (64, 6, 2)
    assert md["tokenizer.ggml.tokens"] == {"array_len": 102400}
    t = {x.name: x for x in h.tensors}
    assert len(t) == len(mid.tensors(variant))
    assert t["blk.0.attn_q.weight"].shape == (2048, 3072)
    assert t["blk.1.attn_k_b.weight"].shape == (128, 512, 16)
    assert t["blk.1.ffn_gate_exps.weight"].shape == (2048, 1536, 64)
    assert t["blk.1.ffn_down_shexp.weight"].shape == (3072, 2048)
    experts, down1, down26 = ("IQ1_S", "IQ2_XXS", "IQ1_S") if variant == "iq1_s" else ("Q4_K", "Q6_K", "Q4_K")
    assert t["blk.5.ffn_up_exps.weight"].type_name == experts
    assert (t["blk.1.ffn_down_exps.weight"].type_name, t["blk.26.ffn_down_exps.weight"].type_name) == (down1, down26)
    assert h.file_bytes == os.path.getsize(path)
    gib = h.file_bytes / 2**30
    assert (3.5 < gib < 4.0) if variant == "iq1_s" else (9.0 < gib < 10.0)
    m = inspect(path)
    assert m.is_moe and m.kv.form == "mla" and m.kv.bytes_per_token["f16"] == 576 * 2 * 27


def test_blocks_decode_to_small_finite_weights_at_their_offsets(tmp_path):
    for variant in mid.VARIANTS:
        path = mid.write_mid(tmp_path / f"{variant}.gguf", variant, shape=SMALL)
        r = GGUFReader(path)  # the reference reader: tensor offsets and sizes agree with ours
        assert [x.name for x in r.tensors] == [x.name for x in mid.tensors(variant, SMALL)]
        for x in r.tensors:
            w = dequantize(np.asarray(x.data), x.tensor_type)
            assert np.isfinite(w).all(), x.name
            if x.name.endswith("norm.weight"):
                assert (w == 1).all()
            elif not x.name.endswith("exp_probs_b.bias"):
                assert 0.005 < float(w.std()) < 0.08 and float(np.abs(w).max()) < 1.0, (x.name, w.std())


def test_write_is_atomic_and_refuses_bad_input(tmp_path):
    with pytest.raises(Exception):
        mid.write_mid(tmp_path / "m.gguf", "q2_k")
    assert list(tmp_path.iterdir()) == []
    r = run_cli("demo", "--size", "mid", "--variant", "q2_k")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_demo_tiny_prints_the_cached_path(tmp_path):
    r = run_cli("demo", "--size", "tiny", env={"HYBRIDINFER_CACHE": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip().startswith(str(tmp_path)) and os.path.exists(r.stdout.strip())


@pytest.mark.slow
@pytest.mark.engine
def test_mid_model_written_fast_and_llama_bench_runs_it(tmp_path):
    bench = find_llama_binary("llama-bench")
    if not bench:
        pytest.skip("llama-bench not installed")
    import time

    t0 = time.perf_counter()
    r = run_cli("demo", "--size", "mid", env={"HYBRIDINFER_CACHE": str(tmp_path)}, timeout=300)
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert path.endswith("mid-deepseek2-v1-iq1_s.gguf") and os.path.getsize(path) > 4e9
    assert took < 60, f"writing the mid model took {took:.0f} s"
    out = subprocess.run([bench, "-m", path, "-p", "16", "-n", "4", "-r", "1", "-o", "json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    rows = json.loads(out.stdout)
    assert {(x["n_prompt"], x["n_gen"]) for x in rows} == {(16, 0), (0, 4)}
    assert all(x["avg_ts"] > 0 for x in rows)
    ik = find_llama_binary("ik-llama-bench")
    if ik:  # ik_llama.cpp loads the mainline MLA form too (it rebuilds attn_kv_b from attn_k_b / attn_v_b)
        out = subprocess.run([ik, "-m", path, "-p", "8", "-n", "2", "-r", "1", "-o", "json"],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        import re

        rates = re.findall(r'"avg_ts":\s*([0-9.eE+-]+)', out.stdout)  # its load log is printed into the JSON
        assert len(rates) == 2 and all(float(x) > 0 for x in rates), out.stdout[-2000:]
    os.unlink(path)
