"""Reading KTransformers optimize-rule YAML the way KTransformers does, for the tests that check what hybridinfer
compiles (the package only writes rules)."""

import re

import yaml


def rule_classes(rules_yaml: str) -> set[str]:
    """Every class import path a rules file names (match and replace), and the ops it selects (`op:NAME`)."""
    out = set()
    for r in yaml.safe_load(rules_yaml):
        for part in (r.get("match", {}), r.get("replace", {})):
            c = part.get("class")
            if c and c != "default":
                out.add(c)
        for k in ("generate_op", "prefill_op"):
            op = r.get("replace", {}).get("kwargs", {}).get(k)
            if op:
                out.add("op:" + op)
    return out


def select(rules_yaml: str, modules: dict[str, str]) -> dict[str, dict]:
    """Which rule (its `replace`) each module gets, with KTransformers' semantics: the first rule whose
    `name` regex is found in the module name and whose `class` (if any) is the module's class.
    `modules`: module name -> its class import path."""
    rules = yaml.safe_load(rules_yaml)
    out = {}
    for mod, cls in modules.items():
        for r in rules:
            pat, want = r["match"].get("name"), r["match"].get("class")
            if (pat is None or re.search(pat, mod)) and (want is None or want == cls):
                out[mod] = r["replace"]
                break
    return out
