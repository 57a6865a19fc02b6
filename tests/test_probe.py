from hybridinfer.probe import HardwareProfile, probe, probe_cpu, probe_numa

CPUINFO = "\n\n".join(
    f"processor\t: {i}\nmodel name\t: Intel(R) Xeon(R) Gold 6454S\nphysical id\t: {i // 4}\ncore id\t\t: {(i % 4) // 2}\n"
    f"flags\t\t: fpu sse avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16"
    for i in range(8)) + "\n"


def test_cpuinfo_parsing_sockets_cores_isa():
    c = probe_cpu(CPUINFO)
    assert (c.logical_cores, c.physical_cores, c.sockets) == (8, 4, 2)
    assert c.isa == "amx" and "avx512_vnni" in c.flags and "sse" not in c.flags


def test_numa_from_sysfs(tmp_path):
    for i, cpus in enumerate(["0-3,8-11", "4-7"]):
        d = tmp_path / f"node{i}"
        d.mkdir()
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {i} MemTotal:       1048576 kB\n")
    nodes = probe_numa(str(tmp_path))
    assert [n.cpus for n in nodes] == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7]]
    assert nodes[0].memory_bytes == 1024**3


def test_live_probe_roundtrips():
    from hybridinfer.options import probe_box

    hw = probe_box()  # probe() plus every registered engine's own probe()
    assert hw.cpu.physical_cores >= 1 and hw.ram_total > 0 and hw.source == "probe"
    assert HardwareProfile.from_json(hw.to_json()) == hw
    names = {e.name for e in hw.engines}
    assert {"llama.cpp", "llama-cpp-python", "kt-kernel", "ktransformers", "sglang"} <= names


@__import__("pytest").mark.gpu
def test_gpu_probe_reports_vram():
    import pytest

    from conftest import has_gpu
    if not has_gpu():
        pytest.skip("needs an NVIDIA GPU")
    from hybridinfer.probe import probe_gpus
    g = probe_gpus()[0]
    assert g.vram_total > 1024**3 and g.name


def test_measured_bandwidth_is_multithreaded_reads_and_recorded_in_the_profile():
    hw = probe(measure=True, engines=False)
    assert hw.bandwidth_source == "measured" and hw.memory_bandwidth_gbs > 1
    assert hw.bandwidth_method.startswith("C read kernel") and "threads" in hw.bandwidth_method
    assert HardwareProfile.from_json(hw.to_json()).bandwidth_method == hw.bandwidth_method


def test_bandwidth_falls_back_to_numpy_threads_without_a_compiler(monkeypatch):
    from hybridinfer import bandwidth

    monkeypatch.setenv("CC", "/nonexistent/cc")
    m = bandwidth.measure(threads=2)
    assert m.method == "numpy-sum" and m.gbs > 1 and m.threads == 2
