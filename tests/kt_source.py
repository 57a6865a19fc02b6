"""Run KTransformers' real server argument parser (`ktransformers/server/args.py` with its real `Config` and
`configs/config.yaml`) on an argv, from PyPI's sdists (0.2.1, 0.2.1.post1) or from a git checkout of any legacy tag.

Only what args.py imports beyond the server's own files is stubbed, because it needs CUDA or a model folder:
`ktransformers.util.utils.get_free_ports` (v0.2.4+; the real module imports the CUDA extension),
`transformers.AutoConfig` (v0.3.1+; reads the model folder, which hybridinfer checks itself) and
`ktransformers.models.configuration_*` (v0.4.1; transformers config classes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pypi_src

# A fetched mirror of github.com/kvcache-ai/ktransformers (bare git dir); tests that need it skip without it.
MIRROR = os.environ.get("HYBRIDINFER_KT_GIT", "/work/.mirror/kvcache-ai+ktransformers/repo")

SDISTS = {"v0.2.1": "ktransformers-0.2.1.tar.gz", "v0.2.1.post1": "ktransformers-0.2.1.post1.tar.gz"}

RUN = r"""
import argparse, json, sys
seen = {}
_orig = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    for opt, a in self._option_string_actions.items():
        if opt.startswith("--"):
            kind = "flag" if a.nargs == 0 else "value"
            seen[opt] = {"kind": kind, "type": getattr(a.type, "__name__", None), "choices": list(a.choices or [])}
    return _orig(self, args, namespace)
argparse.ArgumentParser.parse_args = parse_args
from ktransformers.server.config.config import Config
from ktransformers.server.args import ArgumentParser
sys.argv = ["ktransformers"] + json.loads(sys.argv[1])
cfg = Config()
try:
    ns = ArgumentParser(cfg).parse_args()
except SystemExit as e:
    print(json.dumps({"exit": e.code, "options": seen}))
    raise
out = {k: v for k, v in vars(ns).items() if isinstance(v, (str, int, float, bool, type(None)))}
print(json.dumps({"exit": 0, "args": out, "options": seen, "backend_type": cfg.backend_type,
                  "force_think": getattr(cfg, "user_force_think", None)}))
"""

STUB_UTILS = '''"""Stub (hybridinfer tests): the real module imports KTransformers' CUDA extension."""
import socket

def get_free_ports(n, exclude):
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports
'''
STUB_TRANSFORMERS = '''"""Stub (hybridinfer tests): AutoConfig reads the model folder's config.json, as transformers would."""
import json, os, types

class AutoConfig:
    @staticmethod
    def from_pretrained(path, trust_remote_code=False):
        with open(os.path.join(path, "config.json")) as f:
            return types.SimpleNamespace(**json.load(f))
'''
STUB_CONFIG_CLASS = '''"""Stub (hybridinfer tests): a transformers config class."""
class {name}:
    @classmethod
    def from_pretrained(cls, path):
        raise ValueError("stub")
'''


def have_mirror() -> bool:
    return Path(MIRROR, "HEAD").is_file()


def tree(tag: str, dest: Path) -> Path:
    """The tag's `ktransformers` server files (+ stubs) under dest; -> the directory to put on PYTHONPATH."""
    root = dest / tag
    if (root / "ktransformers").is_dir():
        return root
    root.mkdir(parents=True)
    if tag in SDISTS:  # PyPI has these: use its files
        name = SDISTS[tag]
        prefix = name[: -len(".tar.gz")] + "/"
        with tarfile.open(pypi_src.fetch(name)) as tf:
            for m in tf.getmembers():
                if m.name.startswith(prefix + "ktransformers/"):
                    m.name = m.name[len(prefix):]
                    tf.extract(m, root, filter="data")
    else:
        arch = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", tag, "ktransformers/__init__.py",
                               "ktransformers/server", "ktransformers/configs"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=arch.stdout, check=True)
    args_py = (root / "ktransformers/server/args.py").read_text()
    if "ktransformers.util.utils" in args_py and not (root / "ktransformers/util/utils.py").exists():
        (root / "ktransformers/util").mkdir(exist_ok=True)
        (root / "ktransformers/util/__init__.py").write_text("")
        (root / "ktransformers/util/utils.py").write_text(STUB_UTILS)
    for line in args_py.splitlines():
        if line.startswith("from ktransformers.models.configuration_"):
            mod, _, name = line[len("from "):].partition(" import ")
            path = root / (mod.replace(".", "/") + ".py")
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(STUB_CONFIG_CLASS.format(name=name.strip()))
    stubs = dest / "_stubs" / "transformers"
    stubs.mkdir(parents=True, exist_ok=True)
    (stubs / "__init__.py").write_text(STUB_TRANSFORMERS)
    return root


def parse(tag: str, argv: list[str], dest: Path) -> dict:
    """Run the tag's real parser on argv (argv[0], the program name, is dropped); -> its JSON report
    (`exit`, `args`, `options`, `backend_type`, `force_think`) plus `stderr`."""
    root = tree(tag, dest)
    home = dest / "home" / tag  # Config copies its config.yaml to ~/.ktransformers once: one home per version
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{dest / '_stubs'}", HOME=str(home),
               PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(argv[1:])], capture_output=True, text=True,
                       env=env, timeout=120, cwd=str(dest))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"exit": r.returncode}
    out["stderr"] = r.stderr
    return out


def show(tag: str, path: str) -> str:
    """A file at a tag, from the mirror (or, for the PyPI versions without the mirror, the sdist)."""
    if tag not in SDISTS:
        return subprocess.run(["git", f"--git-dir={MIRROR}", "show", f"{tag}:{path}"], capture_output=True,
                              text=True, check=True).stdout
    name = SDISTS[tag]
    return pypi_src.read(name, name[: -len(".tar.gz")] + "/" + path)
