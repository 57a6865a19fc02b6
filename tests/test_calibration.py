"""Calibration: the solve that turns benchmark runs into per-type costs, the prediction from them, engine choice
by them with the source in every "Why" line, storage keyed by box and engine build, busy-CPU detection, and one
real (short) calibration with the installed llama-bench."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from conftest import run_cli
from hybridinfer import calibration
from hybridinfer.calibrate import BusyMeter, Run, _weights, current, ensure, solve, with_calibration
from hybridinfer.calibration import Calibration, EngineRates
from hybridinfer.demo import calib, mid
from hybridinfer.engines import get
from hybridinfer.inspect_gguf import inspect
from hybridinfer.plan import PlanOptions, make_plan
from hybridinfer.probe import EngineInfo, load_profile, probe

IK, MAIN = "ik_llama.cpp", "llama.cpp"
TYPES = ("Q8_0", "IQ1_S", "Q4_K", "BF16")


@pytest.fixture(scope="module")
def calib_models(tmp_path_factory):
    """The calibration models' headers (sparse files: the layout without the data)."""
    d = tmp_path_factory.mktemp("calib")
    out = {}
    for name in ("base", "heads", "dense", *TYPES):
        shape = replace(calib.SHAPE, blocks=calib.BASE_BLOCKS, ff_exp=calib.BASE_FF) if name == "base" else \
            replace(calib.SHAPE, blocks=calib.BASE_BLOCKS, ff_exp=calib.BASE_FF, n_head=16) if name == "heads" else \
            replace(calib.SHAPE, blocks=4, n_dense=3, ff_dense=calib.DENSE_FF, ff_exp=calib.BASE_FF) if name == "dense" \
            else replace(calib.SHAPE, blocks=calib.blocks_for(name))
        q = "Q8_0" if name in ("base", "heads", "dense") else name
        out[name] = inspect(mid.write_mid(d / f"{name}.gguf", calib._mix(mid.Q[q]), shape=shape, data=False))
    return out


def _time(model, blk, cost, g=1.0, prefill=False, f=1.0):
    B, dense, exp = _weights(model, prefill)
    return B * blk + sum(w * cost[t] * f for t, w in dense.items()) + sum(w * g * cost[t] for t, w in exp.items())


def test_solve_recovers_the_costs_it_was_given(calib_models):
    # Runs timed from known costs (seconds per weight) come back as those costs (ns per weight) and block time.
    dec = {"Q8_0": 0.30e-9, "IQ1_S": 0.85e-9, "Q4_K": 0.22e-9, "BF16": 0.9e-9}
    pre = {"Q8_0": 0.010e-9, "IQ1_S": 0.030e-9, "Q4_K": 0.012e-9, "BF16": 0.05e-9}
    blk = 80e-6
    per_expert = 24.0
    g = 1 + 12.0 / per_expert
    runs = {n: Run(n, 1 / _time(m, 7e-6 + (m.head_count - 4) * 2e-6, pre, g, prefill=True, f=0.5),
                   1 / _time(m, blk + (m.head_count - 4) * 3e-6, dec, f=0.8)) for n, m in calib_models.items()}
    sol = solve(runs, calib_models, per_expert)
    assert sol["failed"] == {} and sol["block_decode_us"] == pytest.approx(80.0, rel=1e-6)
    assert sol["block_prefill_us"] == pytest.approx(7.0, rel=1e-6)
    assert sol["head_decode_us"] == pytest.approx(3.0, rel=1e-6) and sol["head_prefill_us"] == pytest.approx(2.0, rel=1e-6)
    assert sol["dense_decode"] == pytest.approx(0.8, rel=1e-6) and sol["dense_prefill"] == pytest.approx(0.5, rel=1e-6)
    for t in TYPES:
        assert sol["decode_ns"][t] == pytest.approx(dec[t] * 1e9, rel=1e-6)
        assert sol["prefill_ns"][t] == pytest.approx(pre[t] * 1e9, rel=1e-6)
    # without the dense model's run the split is not known: dense weights cost what experts do
    del runs["dense"]
    assert solve(runs, calib_models, per_expert)["dense_decode"] == 1.0


def test_solve_keeps_what_failed_and_skips_it(calib_models):
    runs = {n: Run(n, 100.0, 10.0) for n in calib_models}
    runs["BF16"] = Run("BF16", None, None, "exit 1: unknown type")
    sol = solve(runs, calib_models, 24.0)
    assert sol["failed"] == {"BF16": "exit 1: unknown type"} and "BF16" not in sol["decode_ns"] and "IQ1_S" in sol["decode_ns"]


def _rates(key, engine, decode_scale=1.0, build="b1"):
    return EngineRates(key=key, engine=engine, build=build, threads=2,
                       decode_ns={"Q8_0": 0.3 * decode_scale, "IQ1_S": 0.9 * decode_scale, "Q4_K": 0.25 * decode_scale,
                                  "Q6_K": 0.3 * decode_scale},
                       prefill_ns={"Q8_0": 0.01, "IQ1_S": 0.03, "Q4_K": 0.012, "Q6_K": 0.015}, block_decode_us=50.0,
                       dense_decode=0.9)


def _cal(hw, *rates, busy=""):
    return Calibration(box=calibration.box_key(hw), created="2026-12-04T12:00:00Z", cpu=hw.cpu.model,
                       bandwidth_gbs=40.0, bandwidth_method="test", seconds=1.0, engines=list(rates), busy=busy)


@pytest.fixture
def box():
    h = probe(engines=False)
    return replace(h, engines=[EngineInfo(name=MAIN, installed=True), EngineInfo(name=IK, installed=True)])


def test_prediction_is_the_sum_of_measured_costs(tiny_model, box):
    m = inspect(tiny_model)
    r = _rates(MAIN, MAIN)
    hw = with_calibration(box, _cal(box, r))
    p = make_plan(hw, m, PlanOptions(engine=MAIN))
    pred = p.prediction
    assert pred.source == "calibrated" and pred.source_detail == f"{MAIN}, 2 threads"
    ns = sum(t.n_elements * (m.expert_used_count / m.expert_count if t.cls == "routed_experts" else
                             (1 / m.vocab_size if t.cls == "token_embd" else 1.0) * r.dense_decode) * r.decode_cost(t.type)
             for t in m.tensors if len(t.shape) >= 2 and t.type != "F32")
    blocks = len({t.block for t in m.tensors if t.block is not None})
    weights_s = ns * 1e-9 + blocks * 50e-6
    kv_s = pred.breakdown_ms["cpu_memory"] / 1e3  # only the KV cache is left to bandwidth
    assert 1 / pred.decode_tps == pytest.approx(weights_s + kv_s, rel=0.01)
    # the measured bandwidth replaced the profile's
    assert hw.memory_bandwidth_gbs == 40.0 and hw.bandwidth_source == "measured"


def test_auto_picks_the_engine_this_box_measured_faster(tiny_model, box):
    m = inspect(tiny_model)
    fast_ik = with_calibration(box, _cal(box, _rates(MAIN, MAIN), _rates(f"{IK} -rtr", IK, decode_scale=0.5),
                                         _rates(IK, IK, decode_scale=2.0)))
    p = make_plan(fast_ik, m, PlanOptions())
    assert p.engine == IK
    assert "calibrated on this box 2026-12-04: ik_llama.cpp -rtr, 2 threads" in p.verdicts[0].source
    slower = next(v for v in p.verdicts if v.engine == MAIN)
    assert slower.verdict == "slower" and "calibrated on this box 2026-12-04: llama.cpp" in slower.source
    fast_main = with_calibration(box, _cal(box, _rates(MAIN, MAIN), _rates(f"{IK} -rtr", IK, decode_scale=3.0)))
    assert make_plan(fast_main, m, PlanOptions()).engine == MAIN
    # explicitly mapped weights: ik runs without repacking, and its no-rtr figures are the ones used
    mm = make_plan(fast_ik, m, PlanOptions(engine=IK, load_mode="mmap"))
    assert mm.prediction.source_detail.startswith(f"{IK}, ") and "-rtr" not in mm.command


def test_sources_are_named_for_other_boxes_and_uncalibrated_ones(tiny_model, box):
    m = inspect(tiny_model)
    p = make_plan(box, m, PlanOptions(engine=MAIN))
    assert p.prediction.source == "predicted" and "no calibration of this box used" in p.verdicts[0].source
    other = load_profile("desktop-4090")
    q = make_plan(other, m, PlanOptions(engine=MAIN))
    assert "predicted for desktop-4090 from published figures" in q.verdicts[0].source
    busy = with_calibration(box, _cal(box, _rates(MAIN, MAIN), busy="other processes used 40% of the CPU"))
    assert "measured on a busy CPU" in make_plan(busy, m, PlanOptions(engine=MAIN)).verdicts[0].source


def test_hybrid_plan_calibrates_the_cpu_side_only(box, models):
    gpu_box = replace(load_profile("desktop-4090"), source="probe", engines=box.engines)
    cal = _cal(gpu_box, _rates(MAIN, MAIN), _rates(IK, IK))
    p = make_plan(with_calibration(gpu_box, cal), models["r1-ud-iq1_s"], PlanOptions(engine=MAIN))
    assert p.prediction.source == "calibrated CPU, predicted GPU" and "GPU predicted" in p.verdicts[0].source


def test_storage_is_per_box_and_per_build(box):
    cal = _cal(box, _rates(MAIN, MAIN, build="old"))
    calibration.save(cal)
    assert calibration.load(cal.box) == cal
    other = replace(box, cpu=replace(box.cpu, flags=[*box.cpu.flags, "amx_tile"]))
    assert calibration.load(calibration.box_key(other)) is None  # another CPU kind never reuses it
    # a rebuilt engine: its old figures are never used; with calibration off nothing is measured or read
    assert all(r.build != "old" for r in current(cal, box).engines)
    assert ensure(box, auto=True) is None and ensure(box, auto=False) is None


def test_calibration_json_round_trips_through_the_profile(box):
    hw = with_calibration(box, _cal(box, _rates(MAIN, MAIN)))
    again = type(hw).from_json(hw.to_json())
    assert again == hw and again.calibration.rates(MAIN).decode_cost("IQ1_M") == pytest.approx(0.9 * 1.75 / 1.5625)


def test_unmeasured_types_borrow_the_nearest_kernel_scaled_by_bits():
    r = _rates(MAIN, MAIN)
    assert r.decode_cost("IQ1_M") == pytest.approx(0.9 * 1.75 / 1.5625)  # IQ1_S family, more bits
    assert r.decode_cost("Q5_K") == pytest.approx(0.25 * 5.5 / 4.5)
    assert r.decode_cost("IQ2_XXS") is not None  # no IQ2 figure at all: nearest by bits


def test_busy_cpu_is_detected():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with BusyMeter() as m:
            time.sleep(1.0)
    finally:
        spin.kill()
        spin.wait()
    # at least most of the spinner's one core, as a share of however many cores this box has
    assert m.other_share > 0.5 / (os.cpu_count() or 1)


@pytest.mark.skipif(not get(MAIN).bench_binary_path(), reason="needs llama-bench (./install.sh)")
def test_calibrate_for_real_then_probe_and_plan_use_it(monkeypatch):
    # A short real calibration: every installed engine, two weight types (the full one takes ~2 min).
    monkeypatch.delenv("HYBRIDINFER_NO_CALIBRATE")
    r = run_cli("calibrate", "--types", "Q8_0,Q4_0", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    cal = json.loads(r.stdout)
    rates = next(e for e in cal["engines"] if e["key"] == MAIN)
    assert rates["decode_ns"]["Q8_0"] > 0 and rates["decode_ns"]["Q4_0"] > 0 and rates["prefill_ns"]["Q4_0"] > 0
    assert cal["bandwidth_gbs"] > 1 and cal["age_days"] < 1 and rates["threads"] >= 1
    p = json.loads(run_cli("probe", "--json").stdout)
    assert p["calibration"]["created"] == cal["created"] and p["calibration_age_days"] < 1
    assert p["bandwidth_source"] == "measured"
    plan = json.loads(run_cli("plan", "--engine", MAIN, "--json").stdout)
    assert plan["prediction"]["source"] == "calibrated" and "calibrated on this box" in plan["verdicts"][0]["source"]
    # a second run reuses it: nothing measured again
    again = run_cli("calibrate", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["created"] == cal["created"]


def test_serve_reuses_the_tuned_plan_for_this_model_on_this_box(tiny_model, tmp_path):
    import argparse
    import os

    from hybridinfer.options import PLAN_DEFAULTS, plan_from_args
    from hybridinfer.tune import plan_document
    from hybridinfer.tuned import model_identity, tuned_path

    model = inspect(tiny_model)
    args = argparse.Namespace(**{**PLAN_DEFAULTS, "gguf": tiny_model, "plan": None})
    static, _ = plan_from_args(args, serving=True)
    tuned = replace(static, threads=1, command=[*static.command, "-t", "1"])
    box = calibration.box_key(probe(engines=False))
    doc = plan_document(tuned, {"box": box, "model": model_identity(tiny_model), "gain": 1.2,
                                "created": "2026-12-04T12:00:00Z"})
    tuned_path(tiny_model).parent.mkdir(parents=True, exist_ok=True)
    tuned_path(tiny_model).write_text(json.dumps(doc))
    got, _ = plan_from_args(args, serving=True)
    assert got.threads == 1 and got.reasons[0].topic == "tuned"
    assert "measured fastest on this box 2026-12-04 (1.20x" in got.reasons[0].text
    # a plan option plans afresh; `plan` (not serving) never swaps plans; a changed file is another model
    assert plan_from_args(argparse.Namespace(**{**vars(args), "ctx": 4096}), serving=True)[0].threads != 1 or \
        static.threads == 1
    assert plan_from_args(args, serving=False)[0].reasons[0].topic != "tuned"
    os.utime(tiny_model, (1, 1))
    assert plan_from_args(args, serving=True)[0].reasons[0].topic != "tuned"
    assert model.paths[0] == tiny_model


def test_a_failed_calibration_never_stops_a_plan(box, monkeypatch, capsys):
    import hybridinfer.calibrate as cal_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.delenv("HYBRIDINFER_NO_CALIBRATE")
    monkeypatch.setattr(cal_mod, "calibrate", boom)
    monkeypatch.setattr(cal_mod, "stale_engines", lambda cal, hw: [MAIN])
    assert ensure(box) is None
    assert "calibration failed" in capsys.readouterr().err
