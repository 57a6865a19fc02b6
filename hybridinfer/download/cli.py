"""`hybridinfer download`: the command-line face of flow.py."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import HybridError
from ..util import GIB
from .hubs import SOURCES


def cmd_download(args) -> int:
    """Download a GGUF quant by repository name (ModelScope by default, or Hugging Face), verified before use.

    Lists the repository and its quants with their sizes, reads the chosen quant's GGUF headers (Range
    requests, a few MB) to predict with the planner whether and how fast this box serves it, checks free disk,
    then fetches only that quant's files with progress, speed and ETA. Ctrl-C or a lost connection keeps the
    partial file (`*.incomplete`); the same command resumes it. Each shard is verified (complete set, sizes,
    GGUF header) before the `hybridinfer serve` command is printed.

    examples:
      hybridinfer download unsloth/DeepSeek-R1-GGUF --quant UD-IQ1_S --dir /data/models
      hybridinfer download unsloth/DeepSeek-R1-GGUF --plan-only          the quants, sizes and prediction
      hybridinfer download --kt-config deepseek-ai/DeepSeek-R1             config/tokenizer for KTransformers
      hybridinfer download --list                                          known giant-MoE quants and sizes
    """
    from .flow import download_kt_config, download_quant, serve_command

    if getattr(args, "list", False):
        from .registry import catalog_lines
        print("\n".join(catalog_lines()))
        return 0
    if not args.repo and not args.kt_config:
        raise HybridError("nothing to download", "give a repository (e.g. unsloth/DeepSeek-R1-GGUF --quant UD-IQ1_S) or --kt-config REPO; --list shows known giant-MoE quants")
    if args.keep_free < 0:
        raise HybridError(f"--keep-free must be 0 or more, not {args.keep_free}", "give GiB to leave free, e.g. --keep-free 2")
    hw = None
    if args.hardware:
        from ..probe import load_profile
        hw = load_profile(args.hardware)
    if args.repo:
        first = download_quant(args.repo, args.quant, args.source, args.dir, hw=hw, force=args.force,
                               keep_free=int(args.keep_free * GIB), plan_only=args.plan_only)
        if first is not None:
            print(f"verified: every shard complete, sizes as listed, GGUF headers parse\nserve it with:\n  {serve_command(first)}")
    if args.kt_config and not args.plan_only:
        # with a GGUF download in the same --dir, the config folder goes beside it, named like the repository
        kt_dir = (Path(args.dir) / args.kt_config.split("/")[-1] if args.repo else Path(args.dir)) if args.dir else None
        folder = download_kt_config(args.kt_config, args.source, kt_dir)
        print(f"config folder of {args.kt_config}: {folder} (recorded: plan/serve find it as the engine's --model_path)")
    sys.stdout.flush()
    return 0


def register(sub, add, plan_args) -> None:
    p = add("download", cmd_download)
    p.add_argument("repo", nargs="?", metavar="REPO", help="repository, e.g. unsloth/DeepSeek-R1-GGUF")
    p.add_argument("--quant", metavar="Q", help="quant to fetch, e.g. UD-IQ1_S, Q4_K_M (default: the only one)")
    p.add_argument("--dir", metavar="DIR", help="where to put it (default: $HYBRIDINFER_CACHE/models/REPO); the repository's folders are kept")
    p.add_argument("--source", default="modelscope", choices=SOURCES, help="hub (default: modelscope)")
    p.add_argument("--plan-only", action="store_true", help="list, check disk and predict; fetch nothing")
    p.add_argument("--force", action="store_true", help="download a quant this box cannot serve (e.g. for another machine)")
    p.add_argument("--kt-config", metavar="REPO", help="also fetch REPO's config/tokenizer/code without weights (the --model_path folder of the KT engines)")
    p.add_argument("--hardware", metavar="FILE|ID", help="predict for this hardware profile instead of this box")
    p.add_argument("--list", action="store_true", help="list the known giant-MoE quants (repository, quant, size) and exit")
    p.add_argument("--keep-free", type=float, default=2.0, metavar="GIB", help="disk to leave free after the download (default: 2)")
