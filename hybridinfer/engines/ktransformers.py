"""KTransformers: the plan as its launch command (legacy engine + compiled optimize rules, or kt-kernel/SGLang).

hybridinfer does not run KTransformers itself yet; `plan` prints the exact command and the rules file.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from ..plan import Plan
from ..util import atomic_write, cache_dir
from .ktransformers_args import kt_kernel_flags, optimize_rules

name = "ktransformers"
serves_openai = True
supports_placement = True


def rules_file(plan: Plan) -> tuple[str, str]:
    """Write the compiled optimize rules to the cache (content-addressed); -> (path, yaml text)."""
    text = optimize_rules(plan.device_of)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = cache_dir() / "ktransformers" / f"optimize-{digest}.yaml"
    if not path.exists():
        atomic_write(path, text)
    return str(path), text


def command(plan: Plan, host: str = "127.0.0.1", port: int = 10002, **_) -> list[str]:
    rules_path, _text = rules_file(plan)
    return ["ktransformers", "--model_path", "deepseek-ai/DeepSeek-R1", "--gguf_path", str(Path(plan.model_path).parent),
            "--optimize_config_path", rules_path, "--host", host, "--port", str(port),
            "--cpu_infer", str(plan.threads), "--cache_lens", str(plan.ctx), "--max_batch_size", str(plan.parallel),
            "--max_new_tokens", "8192", "--backend_type", "balance_serve", "--force_think"]


def kt_kernel_command(plan: Plan, numa_nodes: int, port: int = 30000) -> list[str]:
    return ["python", "-m", "sglang.launch_server", "--model", "deepseek-ai/DeepSeek-R1",
            "--kt-weight-path", str(Path(plan.model_path).parent), "--port", str(port)] + kt_kernel_flags(
        plan.device_of, plan.n_expert, len(plan.moe_blocks), plan.threads, numa_nodes, set(plan.routed_types))


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
