"""Parse an argv with SGLang's real `ServerArgs.add_cli_args` (sglang/srt/server_args.py from the PyPI wheel).

SGLang cannot be installed or imported as a whole here (CUDA kernels, torch extensions, a GPU at ServerArgs'
`__post_init__`), so only the wheel's `sglang/` Python files are unpacked and imported, and the third-party modules
they import that are not installed are stubbed (`_Stub` below: any attribute, call or subscript returns a stub).
Three sglang modules that compute values at import from those libraries are replaced by stubs with the constants
the parser needs (read from the real files). `add_cli_args` is then SGLang's own argparse setup, unchanged;
`ServerArgs.from_cli_args` (which needs a GPU to pick defaults) is not called.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pypi_src

WHEELS = {"sglang": "sglang-0.5.9-py3-none-any.whl",
          "sglang-kt": "sglang_kt-0.7.2-py3-none-manylinux_2_35_x86_64.whl"}

RUN = r'''
import argparse, importlib.abc, importlib.machinery, json, sys, types

FAKE = json.loads(sys.argv[2])


class _Stub(type):
    def __new__(mcs, name, bases, ns, **kw):
        return super().__new__(mcs, name, bases, ns)

    def __init__(cls, name, bases, ns, **kw):
        super().__init__(name, bases, ns)

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(name)

    def __call__(cls, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else cls  # decorators pass through

    def __getitem__(cls, k):
        return cls

    def __or__(cls, o):
        return cls

    __ror__ = __or__

    def __iter__(cls):
        return iter(())


def _schema(cls, source, handler):
    from pydantic_core import core_schema
    return core_schema.any_schema()


def _make(name):
    return _Stub(name, (), {"__get_pydantic_core_schema__": classmethod(_schema)})


class StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(name)


class Missing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: only modules nothing else found (not installed here) get a stub."""
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top == "sglang" or top in sys.stdlib_module_names or top.startswith("_"):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        m = StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        for k, v in FAKE.get(module.__name__, {}).items():
            setattr(module, k, tuple(v) if isinstance(v, list) else v)


class Replaced(Missing):
    """First on sys.meta_path: the few sglang modules replaced by their constants."""
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if name in FAKE else None


sys.meta_path.insert(0, Replaced())
sys.meta_path.append(Missing())
from sglang.srt.server_args import ServerArgs

p = argparse.ArgumentParser(prog="sglang.launch_server")
ServerArgs.add_cli_args(p)
try:
    ns = p.parse_args(json.loads(sys.argv[1]))
except SystemExit as e:
    print(json.dumps({"exit": e.code}))
    raise
choices = {a.dest: list(a.choices) for a in p._actions if a.choices}
print(json.dumps({"exit": 0, "args": {k: v for k, v in vars(ns).items() if isinstance(v, (str, int, float, bool, type(None)))},
                  "choices": choices}))
'''


def tree(flavor: str, dest: Path) -> Path:
    root = dest / flavor
    if not (root / "sglang").is_dir():
        pypi_src.extract(WHEELS[flavor], root, ("sglang/",))
    return root


def _fakes(root: Path) -> dict:
    srt = root / "sglang" / "srt"
    chunk = re.search(r"^CHUNK_SIZE\s*=\s*(\d+)", (srt / "layers/attention/fla/chunk_delta_h.py").read_text(), re.M)
    fakes = {"sglang.srt.layers.attention.fla.chunk_delta_h": {"CHUNK_SIZE": int(chunk.group(1))},
             "sglang.srt.utils.hf_transformers_utils": {}}  # imports transformers: the parser uses none of it
    glm = srt / "configs" / "glm5_next.py"
    if glm.is_file():  # sglang-kt: server_args imports this constant from its (transformers-based) configs package
        m = re.search(r"GLM5_NEXT_SUPPORTED_TP_SIZES\s*=\s*frozenset\(\(([^)]*)\)\)", glm.read_text())
        fakes["sglang.srt.configs"] = {}
        fakes["sglang.srt.configs.glm5_next"] = {
            "GLM5_NEXT_SUPPORTED_TP_SIZES": [int(x) for x in m.group(1).split(",") if x.strip()]}
    return fakes


def parse(flavor: str, argv: list[str], dest: Path) -> dict:
    """argv = the launcher's arguments after `python -m sglang.launch_server`."""
    root = tree(flavor, dest)
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(argv), json.dumps(_fakes(root))], capture_output=True,
                       text=True, env=env, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"exit": r.returncode}
    out["stderr"] = r.stderr
    return out
