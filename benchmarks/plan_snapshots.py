"""Snapshot `hybridinfer plan` over the reference profiles x the real-shaped headers x engines x a few options, as
text, --json and --placement, one file each, so a refactor can show its plans unchanged:

    .venv/bin/python benchmarks/plan_snapshots.py OUT_BEFORE      # on the old tree
    .venv/bin/python benchmarks/plan_snapshots.py OUT_AFTER       # on the new one
    diff -r OUT_BEFORE OUT_AFTER

Calibration is off (HYBRIDINFER_NO_CALIBRATE), so the figures are the published-figure model's, the same on any box.
The headers are written once into --models (sparse files, a few MB of disk).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import sys

os.environ["HYBRIDINFER_NO_CALIBRATE"] = "1"
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridinfer.cli import main  # noqa: E402
from hybridinfer.demo.shapes import ensure_models  # noqa: E402
from hybridinfer.engines import AUTO, names  # noqa: E402

VARIANTS = [[], ["--ctx", "32768", "--parallel", "2", "--kv-type", "q8_0"], ["--no-stream"], ["--load-mode", "mmap"]]


def _run(argv: list[str]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return f"rc={rc}\n{out.getvalue()}\n--stderr--\n{err.getvalue()}"


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--models", default=str(pathlib.Path.home() / ".cache" / "hybridinfer" / "plan-snapshot-models"))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {**ensure_models(args.models), "demo": None}
    profiles = sorted(p.stem for p in (ROOT / "benchmarks" / "hardware").glob("*.json"))
    n = 0
    for hw in profiles:
        for model, path in sorted(models.items()):
            for engine in [AUTO, *names()]:
                for i, variant in enumerate(VARIANTS):
                    if i and engine != AUTO:
                        continue
                    for fmt in ([], ["--json"], ["--placement"]):
                        argv = ["plan", "--hardware", hw, "--engine", engine, *variant, *fmt]
                        argv += ["--gguf", path] if path else []
                        name = f"{hw}__{model}__{engine}__{i}__{''.join(fmt).strip('-') or 'text'}"
                        (out / name).write_text(_run(argv))
                        n += 1
    print(f"{n} snapshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
