#!/usr/bin/env python
"""Offline calibration: FFN predictors (default) and/or delta-attention thresholds (--delta).

    python tools/calibrate.py --model smollm2-135m --out art/ --text wiki.train.txt [--rank R] [--s S] [--tokens N]
    python tools/calibrate.py --model smollm2-135m --out art/ --text ... --delta [--no-ffn] [--window W] [--sinks S]
    python tools/calibrate.py --model M --out art/ --text ... --ppl-budget 2     # the sparsest s within +2% ppl

Writes (atomically) an artifact folder: safetensors tensors + manifest.json, which
Session.load(..., predictors=DIR, delta=DIR) and tools/eval.py consume. The FFN and delta sections can be
present alone or together; calibrating one section into an existing folder keeps the other.
"""
from __future__ import annotations

import argparse
import json
import sys

from loguru import logger


def main(argv=None) -> int:
    from sparsedge.calibrate import delta as delta_cal
    from sparsedge.calibrate import ffn_cli as ffn_cal

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, .gguf, llama2.c .bin or smollm2-135m")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--text", required=True, help="calibration text file (keep it disjoint from evaluation text)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--delta", action="store_true", help="also calibrate delta-attention thresholds")
    p.add_argument("--no-ffn", action="store_true", help="skip the FFN predictors (with --delta)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON last")
    p.add_argument("-v", "--verbose", action="store_true")
    ffn_cal.add_arguments(p)
    delta_cal.add_arguments(p)
    args = p.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "INFO")
    logger.enable("sparsedge")
    if args.no_ffn and not args.delta:
        p.error("--no-ffn leaves nothing to calibrate; add --delta")
    summary = {}
    if not args.no_ffn:
        try:
            summary["ffn"] = ffn_cal.run(args)
        except ffn_cal.BudgetError as exc:
            logger.error(str(exc))
            return 2
    if args.delta:
        summary["delta"] = delta_cal.run(args)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
