#!/usr/bin/env python
"""Benchmarks: `bench.py decode|ffn|attn [options] [--json]`. Speed targets live here, not in unit tests.

Each subcommand measures the sparse path and its dense baseline side by side in one run and names the
shapes, dtype, density and thread count. With --json the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch
from loguru import logger

SUBCOMMANDS = {"decode": "sparsedge.bench.decode", "ffn": "sparsedge.bench.ffn", "attn": "sparsedge.bench.attn",
               "vs-llamacpp": "sparsedge.bench.llamacpp", "long": "sparsedge.bench.longctx"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    modules = {}
    for name, modname in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:  # report it only when that subcommand is asked for
            sub.add_parser(name, help=f"unavailable: {exc}").set_defaults(import_error=exc)
            continue
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", action="store_true", help="print one JSON object last")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (or npu)")
        p.add_argument("-v", "--verbose", action="store_true")
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    if getattr(args, "import_error", None):
        parser.error(f"bench {args.cmd} is unavailable: {args.import_error}")
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "INFO")
    logger.enable("sparsedge")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = modules[args.cmd].run(args)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
