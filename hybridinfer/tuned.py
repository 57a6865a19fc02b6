"""Where `hybridinfer tune`'s winning plan for a model on this box is kept, and how `serve` finds it again: the same
file (path, size, modification time) on the same box (calibration.box_key), else it is not used."""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Plan
from .util import cache_dir


def model_identity(path: str) -> dict:
    """What makes a tuned plan still this model's: its path, size and modification time."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime)}


def tuned_path(model_path: str) -> Path:
    return cache_dir() / "plans" / f"{Path(model_path).stem}-tuned.json"


def tuned_plan(model_path: str, box: str) -> tuple[Plan, dict] | None:
    """The plan `tune` measured fastest for this model on this box (same file, same box), or None."""
    try:
        doc = json.loads(tuned_path(model_path).read_text())
        rep = doc.get("tune") or {}
        if rep.get("box") != box or rep.get("model") != model_identity(model_path):
            return None
        plan = Plan.from_json(json.dumps({k: v for k, v in doc.items() if k not in ("tune", "command_line")}))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return (plan, rep) if plan.command else None
