"""`hybridinfer patch ktransformers`: teach a legacy KTransformers (v0.2.0 - v0.4.1) the IQ quant types.

The patch (readable in patches/ktransformers/) appends one marked block to `ktransformers/util/custom_gguf.py`
(registers the IQ types in its six type tables, in place) and one to `ktransformers/operators/experts.py` (the CPU
expert loader refuses types its kernel does not compute), and adds `ktransformers/util/hybridinfer_iq.py`
(hybridinfer's torch dequantizers with ggml's grids embedded, so KTransformers' environment needs no `gguf`).
Applying twice changes nothing; reverting removes exactly what was added, leaving the files byte-identical.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HybridError
from ..util import atomic_write

MARK_BEGIN = "# >>> hybridinfer ktransformers patch v1 >>>"
MARK_END = "# <<< hybridinfer ktransformers patch v1 <<<"
PATCH_DIR = Path(__file__).resolve().parents[2] / "patches" / "ktransformers"
MODULE = "hybridinfer_iq.py"
TABLES = ("GGML_TYPES", "GGML_NAMES", "GGML_BLOCK_SIZES", "GGML_ELEMENTS_PER_BLOCK", "GGML_DEQUANTIZE",
          "GGML_DEQUANTIZE_GPU")


@dataclass
class Tree:
    root: Path                    # the `ktransformers` package directory
    version: str | None
    layout: str                   # "v0.2 (loader in custom_gguf.py)" | "v0.3.1+ (loader in custom_loader.py)"
    state: str                    # "unpatched" | "patched" | "partial"
    files: dict[str, str] = field(default_factory=dict)  # role -> path

    def to_dict(self) -> dict:
        return {"path": str(self.root), "version": self.version, "layout": self.layout, "state": self.state,
                "files": self.files}


def find(path: str | None) -> Path:
    """The `ktransformers` package directory: under --path (the package, its parent, or a source tree), or the
    installed one (found without importing it: importing needs its CUDA extension)."""
    if path:
        p = Path(path).expanduser()
        for cand in (p, p / "ktransformers"):
            if (cand / "util" / "custom_gguf.py").is_file():
                return cand.resolve()
        raise HybridError(f"no KTransformers tree at {p} (expected ktransformers/util/custom_gguf.py)",
                          "pass --path to the ktransformers package directory or its source checkout")
    spec = importlib.util.find_spec("ktransformers")
    if spec is None or not spec.submodule_search_locations:
        raise HybridError("KTransformers is not installed in this Python environment",
                          "install it, or pass --path DIR to a KTransformers tree")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def detect(root: Path) -> Tree:
    gguf = root / "util" / "custom_gguf.py"
    loader = root / "util" / "custom_loader.py"
    experts = root / "operators" / "experts.py"
    g = gguf.read_text()
    missing = [t for t in TABLES if not re.search(rf"^{t}\s*=\s*{{", g, re.M)]
    if missing:
        raise HybridError(f"unknown KTransformers layout at {root}: custom_gguf.py lacks {', '.join(missing)}",
                          "this patch fits v0.2.0 - v0.4.1; newer kt-kernel releases need no patch")
    if "def load_gguf_tensor" in g and "ggml_type" in g:
        layout = "v0.2 (loader in custom_gguf.py)"
    elif loader.is_file() and re.search(r"from ktransformers\.util\.custom_gguf import", loader.read_text()) \
            and "def load_gguf_tensor" in loader.read_text():
        layout = "v0.3.1+ (loader in custom_loader.py)"
    else:
        raise HybridError(f"unknown KTransformers layout at {root}: no GGUF loader in custom_gguf.py or custom_loader.py",
                          "this patch fits v0.2.0 - v0.4.1")
    if not experts.is_file() or not re.search(r"^class KExpertsCPU\b", experts.read_text(), re.M) \
            or "def load_weights" not in experts.read_text():
        raise HybridError(f"unknown KTransformers layout at {root}: operators/experts.py has no KExpertsCPU.load_weights",
                          "this patch fits v0.2.0 - v0.4.1")
    version = None
    init = root / "__init__.py"
    if init.is_file():
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", init.read_text())
        version = m.group(1) if m else None
    marks = [MARK_BEGIN in gguf.read_text(), MARK_BEGIN in experts.read_text(), (root / "util" / MODULE).is_file()]
    state = "patched" if all(marks) else "unpatched" if not any(marks) else "partial"
    return Tree(root, version, layout, state, {"tables": str(gguf), "experts": str(experts),
                                                "module": str(root / "util" / MODULE)})


def module_source() -> str:
    """hybridinfer_iq.py: hybridinfer/quants.py + ggml's grids as literals + the KTransformers glue."""
    from .. import quants

    src = Path(quants.__file__).read_text()
    grids = quants.grid_source()
    head = ("# Written by `hybridinfer patch ktransformers --apply` (removed by --revert): torch dequantizers for\n"
            "# ggml IQ types, bit-exact with ggml, and their registration in KTransformers' type tables.\n")
    body = src.replace("GRID_SOURCE: dict | None = None", f"GRID_SOURCE: dict | None = {grids!r}", 1)
    if body == src:
        raise RuntimeError("quants.py has no GRID_SOURCE line")
    return head + body + "\n\n" + (PATCH_DIR / "register.py").read_text()


def apply(tree: Tree) -> list[str]:
    """-> what changed (empty when already applied)."""
    if tree.state == "patched":
        return []
    if tree.state == "partial":
        raise HybridError(f"KTransformers at {tree.root} is partly patched (edited by hand?)",
                          "run `hybridinfer patch ktransformers --revert` first, then --apply")
    changed = []
    mod = Path(tree.files["module"])
    atomic_write(mod, module_source())
    changed.append(str(mod))
    try:
        for role, block in (("tables", "custom_gguf_block.py"), ("experts", "experts_block.py")):
            f = Path(tree.files[role])
            text = f.read_bytes()
            patched = text + (PATCH_DIR / block).read_bytes()
            compile(patched, str(f), "exec")  # never leave a file Python cannot parse
            atomic_write(f, patched)
            changed.append(str(f))
        compile(mod.read_text(), str(mod), "exec")
    except Exception:
        revert(detect(tree.root))
        raise
    return changed


def revert(tree: Tree) -> list[str]:
    changed = []
    for role in ("tables", "experts"):
        f = Path(tree.files[role])
        text = f.read_bytes()
        i = text.find(b"\n" + MARK_BEGIN.encode())
        if i < 0:
            continue
        end = text.find(MARK_END.encode(), i)
        if end < 0 or text[end + len(MARK_END):].strip():
            raise HybridError(f"{f} was edited after the patch (text after the hybridinfer block)",
                              "remove the block between the hybridinfer markers by hand")
        atomic_write(f, text[:i])
        changed.append(str(f))
    mod = Path(tree.files["module"])
    if mod.is_file():
        mod.unlink()
        changed.append(str(mod))
    return changed


def cmd_patch(args) -> int:
    """Patch a legacy KTransformers (v0.2.0 - v0.4.1) so it loads Unsloth's IQ dynamic quants.

    Fixes `NotImplementedError: ggml_type 18 not implemented` (IQ3_XXS; also IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
    IQ2_S, IQ3_S, IQ4_NL) by registering hybridinfer's bit-exact torch dequantizers in KTransformers' type
    tables, and makes its CPU expert loader refuse routed-expert types its kernel would silently skip.

      hybridinfer patch ktransformers --check            # state of the installed KTransformers
      hybridinfer patch ktransformers --apply            # idempotent
      hybridinfer patch ktransformers --revert           # byte-identical files again
      hybridinfer patch ktransformers --apply --path ~/src/ktransformers

    Exit status for --check: 0 when patched, 1 when not.
    """
    import json

    tree = detect(find(args.path))
    action = "apply" if args.apply else "revert" if args.revert else "check"
    changed = []
    if action == "apply":
        changed = apply(tree)
    elif action == "revert":
        changed = revert(tree)
    after = detect(tree.root) if changed else tree
    if args.json:
        print(json.dumps({"action": action, "changed": changed, **after.to_dict()}, indent=2))
    else:
        print(f"KTransformers {after.version or '(version unknown)'} at {after.root}")
        print(f"  layout: {after.layout}")
        print(f"  state:  {after.state}")
        if action != "check":
            print(f"  {action}: " + ("; ".join(changed) if changed else f"nothing to do (already {after.state})"))
    if action == "check":
        return 0 if after.state == "patched" else 1
    return 0


def register(sub, add, plan_args) -> None:
    p = add("patch", cmd_patch)
    p.add_argument("target", choices=["ktransformers"], help="what to patch")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="report layout, version and patch state (default)")
    g.add_argument("--apply", action="store_true", help="apply the patch (idempotent)")
    g.add_argument("--revert", action="store_true", help="remove it exactly")
    p.add_argument("--path", metavar="DIR", help="KTransformers package or source tree (default: the installed one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
