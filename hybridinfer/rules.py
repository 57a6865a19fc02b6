"""Stage 3 — placement rules: YAML files that say where each GGUF tensor lives, resolved to a `Placement`.

Schema (see placement_rules/README.md):

    name: moe-experts-on-cpu
    description: text shown by `plan`
    rules:                          # ordered; the first rule whose `match` fits a tensor places it
      - match: {class: routed_experts}      # class / name (regex, searched) / blocks ("3-", "0-2", [4, 5])
        device: cpu                         # cpu | gpu | gpu:N | auto | spread
      - match: {}                           # {} matches every tensor
        device: gpu

`auto` fills spare VRAM unit by unit (`unit: block` = one block's matched tensors together, `fill: first|last`
block order), one GPU after the other, and leaves the rest on `fallback` (default cpu). `spread` divides blocks
over all GPUs in proportion to their budgets (multi-GPU layer split), one contiguous block range per GPU in GPU
order, the output head with the last block. With no GPU, `gpu`/`auto`/`spread` rules resolve to cpu.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .errors import HybridError
from .inspect_gguf import GROUPS, ModelInfo, Tensor

DEVICE_RE = re.compile(r"^(cpu|gpu|gpu:\d+|auto|spread)$")
MATCH_KEYS = {"class", "name", "blocks"}
RULE_KEYS = {"match", "device", "fill", "unit", "fallback", "follow", "comment"}


@dataclass(frozen=True)
class Rule:
    device: str
    classes: tuple[str, ...] = ()
    name: str | None = None
    blocks: tuple[int, int] | tuple[int, ...] | None = None  # (lo, hi) inclusive range or explicit set
    block_set: tuple[int, ...] | None = None
    fill: str = "first"
    fallback: str = "cpu"
    follow: str = ""  # auto only: "attention" = each block's unit on the GPU holding that block's attention
    text: str = ""

    def matches(self, t: Tensor) -> bool:
        if self.classes and t.cls not in self.classes:
            return False
        if self.name is not None and not re.search(self.name, t.name):
            return False
        if self.blocks is not None:
            if t.block is None:
                return False
            lo, hi = self.blocks
            if not (lo <= t.block <= hi):
                return False
        if self.block_set is not None and t.block not in self.block_set:
            return False
        return True


@dataclass(frozen=True)
class RuleSet:
    name: str
    description: str
    rules: list[Rule]
    source: str


@dataclass(frozen=True)
class Placement:
    rules: str
    device_of: dict[str, str]  # tensor name -> "cpu" | "gpu:N"
    warnings: list[str] = field(default_factory=list)

    def devices(self) -> list[str]:
        return sorted(set(self.device_of.values()), key=lambda d: (d != "cpu", d))


def rules_dir() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "placement_rules", here.parent / "placement_rules"):
        if cand.is_dir():
            return cand
    return here.parent / "placement_rules"


def available() -> list[str]:
    return sorted(p.stem for p in rules_dir().glob("*.yaml"))


def load(name_or_path: str) -> RuleSet:
    p = Path(name_or_path)
    if not p.exists():
        p = rules_dir() / f"{name_or_path}.yaml"
        if not p.exists():
            raise HybridError(f"placement rules '{name_or_path}' not found",
                              f"use a YAML file or one of: {', '.join(available())}")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HybridError(f"{p}:{where} is not valid YAML", "fix the syntax (indentation, quotes)") from None
    return parse(doc, str(p))


def parse(doc, source: str = "<rules>") -> RuleSet:
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list) or not doc["rules"]:
        raise HybridError(f"{source}: needs a non-empty `rules:` list", "see placement_rules/README.md for the schema")
    rules = []
    for i, r in enumerate(doc["rules"], 1):
        where = f"{source}: rule {i}"
        if not isinstance(r, dict):
            raise HybridError(f"{where} is not a mapping", "write `- match: {...}` and `device: ...`")
        unknown = set(r) - RULE_KEYS
        if unknown:
            raise HybridError(f"{where} has unknown key(s) {sorted(unknown)}", f"allowed: {sorted(RULE_KEYS)}")
        dev = str(r.get("device", ""))
        if not DEVICE_RE.match(dev):
            raise HybridError(f"{where}: unknown device '{dev}'", "use cpu, gpu, gpu:N, auto or spread")
        fb = str(r.get("fallback", "cpu"))
        if not DEVICE_RE.match(fb) or fb in ("auto", "spread"):
            raise HybridError(f"{where}: unknown fallback '{fb}'", "use cpu, gpu or gpu:N")
        fill = str(r.get("fill", "first"))
        if fill not in ("first", "last"):
            raise HybridError(f"{where}: fill must be first or last, not '{fill}'", "fill: first (block 0 up) or last (last block down)")
        follow = str(r.get("follow", ""))
        if follow not in ("", "attention") or (follow and dev != "auto"):
            raise HybridError(f"{where}: follow: {follow!r} is not understood here",
                              "follow: attention, with device: auto (fill each GPU with its own blocks' tensors)")
        m = r.get("match", {}) or {}
        if not isinstance(m, dict) or set(m) - MATCH_KEYS:
            raise HybridError(f"{where}: match accepts only {sorted(MATCH_KEYS)}", "e.g. match: {class: routed_experts, blocks: '3-'}")
        classes = m.get("class", ())
        classes = (classes,) if isinstance(classes, str) else tuple(classes)
        bad = [c for c in classes if c not in GROUPS]
        if bad:
            raise HybridError(f"{where}: unknown tensor class {bad}", f"classes: {', '.join(GROUPS)}")
        name = m.get("name")
        if name is not None:
            try:
                re.compile(name)
            except re.error as e:
                raise HybridError(f"{where}: bad regex {name!r} ({e})", "fix the pattern (it is searched in the tensor name)") from None
        blocks, block_set = _blocks(m.get("blocks"), where)
        rules.append(Rule(device=dev, classes=classes, name=name, blocks=blocks, block_set=block_set, fill=fill,
                          fallback=fb, follow=follow, text=_describe(m, dev)))
    return RuleSet(name=str(doc.get("name") or Path(source).stem), description=str(doc.get("description", "")).strip(),
                   rules=rules, source=source)


def _blocks(spec, where):
    if spec is None:
        return None, None
    if isinstance(spec, int):
        return (spec, spec), None
    if isinstance(spec, list) and all(isinstance(x, int) for x in spec):
        return None, tuple(spec)
    m = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", str(spec))
    if not m or (not m.group(1) and not m.group(2)):
        raise HybridError(f"{where}: blocks '{spec}' not understood", "use N, 'A-B', 'A-' or a list [A, B]")
    return (int(m.group(1) or 0), int(m.group(2)) if m.group(2) else 1 << 30), None


def _describe(m, dev) -> str:
    parts = [f"{k}={v}" for k, v in m.items()] or ["everything else"]
    return f"{', '.join(parts)} -> {dev}"


def resolve(rs: RuleSet, model: ModelInfo, budgets: dict[str, int],
            cost: Callable[[Tensor, str], int] | None = None) -> Placement:
    """Place every tensor. `budgets`: bytes of weights each GPU ("gpu:0", ...) may still take for `auto` and
    `spread`; `cost(tensor, device)` is the bytes a tensor occupies there (engines may repack)."""
    fit = _Fit(budgets, cost or (lambda t, d: t.nbytes))
    placed, claimed_by = _claim(rs, model)
    warnings = _rule_warnings(rs, model, claimed_by)
    # Fixed devices first, so `auto` only gets what is truly spare.
    _place_fixed(rs, claimed_by, placed, fit)
    # spread before auto: a spread lays out whole block ranges, auto then takes what is spare on each GPU.
    for i, r in sorted(enumerate(rs.rules), key=lambda ir: ir[1].device != "spread"):
        if r.device == "auto" and r.follow == "attention":
            _place_following_attention(r, claimed_by[i], placed, fit)
        elif r.device == "auto":
            _place_auto(r, claimed_by[i], placed, fit)
        elif r.device == "spread":
            _place_spread(claimed_by[i], placed, fit)
    return Placement(rules=rs.name, device_of={t.name: placed[t.name] for t in model.tensors}, warnings=warnings)


class _Fit:
    """The GPUs, the bytes each may still take, and what a tensor costs on a device."""

    def __init__(self, budgets: dict[str, int], cost: Callable[[Tensor, str], int]):
        self.budgets = budgets
        self.remaining = dict(budgets)
        self.cost = cost
        self.gpus = sorted(budgets)
        self.first_gpu = self.gpus[0] if self.gpus else "cpu"

    def take(self, dev: str, tensors: list[Tensor]) -> bool:
        """Charges `tensors` to `dev` if they all fit there."""
        need = sum(self.cost(t, dev) for t in tensors)
        if self.remaining.get(dev, -1) >= need:
            self.remaining[dev] -= need
            return True
        return False

    def fallback(self, r: Rule) -> str:
        """Where an `auto` rule's tensors go when no GPU takes them."""
        fb = r.fallback if r.fallback != "gpu" else self.first_gpu
        return fb if fb in self.budgets or fb == "cpu" else "cpu"


def _claim(rs: RuleSet, model: ModelInfo) -> tuple[dict[str, str], dict[int, list[Tensor]]]:
    """Each tensor to the first rule that matches it (rule index -> its tensors); a tensor no rule matches is
    placed on the CPU."""
    placed: dict[str, str] = {}
    claimed_by: dict[int, list[Tensor]] = {i: [] for i in range(len(rs.rules))}
    for t in model.tensors:
        for i, r in enumerate(rs.rules):
            if r.matches(t):
                claimed_by[i].append(t)
                break
        else:
            placed[t.name] = "cpu"  # no rule: the safe default
    return placed, claimed_by


def _rule_warnings(rs: RuleSet, model: ModelInfo, claimed_by: dict[int, list[Tensor]]) -> list[str]:
    """Rules that do nothing for this model: a regex that matches no tensor, a rule earlier ones shadow."""
    warnings = []
    for i, r in enumerate(rs.rules):
        if r.name is not None and not any(re.search(r.name, t.name) for t in model.tensors):
            warnings.append(f"rule {i + 1} ({r.text}): regex matches no tensor of this model")
        if not claimed_by[i] and any(r.matches(t) for t in model.tensors):
            warnings.append(f"rule {i + 1} ({r.text}) is shadowed: earlier rules already place everything it matches")
    return warnings


def _place_fixed(rs: RuleSet, claimed_by: dict[int, list[Tensor]], placed: dict[str, str], fit: _Fit) -> None:
    """The rules naming a device (cpu, gpu, gpu:N), charged to that GPU's budget whether or not they fit."""
    for i, r in enumerate(rs.rules):
        if r.device in ("auto", "spread"):
            continue
        dev = r.device if r.device != "gpu" else fit.first_gpu
        if dev.startswith("gpu") and dev not in fit.budgets:
            if not fit.gpus:
                dev = "cpu"
            else:
                raise HybridError(f"rule {i + 1} ({r.text}) names {dev}, but this box has {', '.join(fit.gpus)}",
                                  "use gpu (= gpu:0) or a GPU index that exists")
        for t in claimed_by[i]:
            placed[t.name] = dev
            if dev != "cpu":
                fit.remaining[dev] = fit.remaining.get(dev, 0) - fit.cost(t, dev)


def _place_following_attention(r: Rule, ts: list[Tensor], placed: dict[str, str], fit: _Fit) -> None:
    """`auto` with `follow: attention`: each block's unit on the GPU that holds that block's attention."""
    fb = fit.fallback(r)
    full: set[str] = set()
    for unit in _units(ts, r.fill):
        b = unit[0].block
        dev = placed.get(f"blk.{b}.attn_norm.weight", "cpu") if b is not None else "cpu"
        # Contiguous per GPU: once one of its blocks does not fit, its later blocks stay on the fallback.
        if dev == "cpu" or dev in full or not fit.take(dev, unit):
            full.add(dev)
            dev = fb
        for t in unit:
            placed[t.name] = dev


def _place_auto(r: Rule, ts: list[Tensor], placed: dict[str, str], fit: _Fit) -> None:
    """`auto`: units fill spare VRAM, one GPU after the other."""
    # Contiguous, like -ngl/-ts: one GPU fills, then the next (never back to an earlier one, which would
    # interleave block ranges and add GPU-to-GPU hops); once no GPU takes a unit, the rest fall back too.
    order = fit.gpus[::-1] if r.fill == "last" else fit.gpus  # so gpu:0 holds the earliest of the blocks
    g_i = 0
    for unit in _units(ts, r.fill):
        while g_i < len(order) and not fit.take(order[g_i], unit):
            g_i += 1
        dev = order[g_i] if g_i < len(order) else fit.fallback(r)
        for t in unit:
            placed[t.name] = dev


def _place_spread(ts: list[Tensor], placed: dict[str, str], fit: _Fit) -> None:
    """`spread`: blocks divided over all GPUs in proportion to what each has left, one contiguous range per GPU
    in GPU order."""
    gpus = fit.gpus
    units = _units(ts, "first")
    total = sum(max(0, fit.remaining[g]) for g in gpus) or 1
    share = {g: max(0, fit.remaining[g]) / total for g in gpus}
    n = len(units)
    bounds, acc = [], 0.0
    for g in gpus:
        acc += share[g] * n
        bounds.append((g, round(acc)))
    g_i = 0
    for k, unit in enumerate(units):
        if not gpus:
            dev = "cpu"
        else:
            want = next((i for i, (g, hi) in enumerate(bounds) if k < hi), len(gpus) - 1)
            g_i = max(g_i, want)  # block ranges stay contiguous and in GPU order
            while g_i < len(gpus) and not fit.take(gpus[g_i], unit):
                g_i += 1
            dev = gpus[g_i] if g_i < len(gpus) else "cpu"
        for t in unit:
            placed[t.name] = dev


def _units(tensors: list[Tensor], fill: str) -> list[list[Tensor]]:
    """One unit per block in fill order, and the block-less tensors (output head, ...) as one unit at the end
    of the block order: first for `fill: last` — like llama.cpp's `-ngl N`, which since its output layer
    counts as a layer offloads it first (src/llama-model.cpp: i_gpu_start = n_layer + 1 - ngl) — else last."""
    by_block: dict[int, list[Tensor]] = {}
    loose = []
    for t in tensors:
        (by_block.setdefault(t.block, []) if t.block is not None else loose).append(t)
    order = sorted(by_block, reverse=(fill == "last"))
    units = [by_block[b] for b in order]
    if loose:
        units.insert(0, loose) if fill == "last" else units.append(loose)
    return units
