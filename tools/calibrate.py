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


PROG = "calibrate.py"


def check_inputs(args) -> None:
    """Every input that can be checked without the model's weights, before they load: the text (present,
    not empty, long enough for --tokens / --delta-tokens with the model's tokenizer), --out (writable, not
    some other folder) and the flag combinations. Errors name the flag and the fix."""
    from sparsedge.artifact import check_output
    from sparsedge.calibrate import ffn_cli as ffn_cal
    from sparsedge.evaluate import check_text_file, text_token_ids
    from sparsedge.loading import open_model

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if not 0.0 <= args.text_start < 1.0:
        raise ValueError(f"--text-start must be in [0, 1), got {args.text_start}")
    wants = []  # (flag, tokens) the text must hold
    if not args.no_ffn:
        if args.tokens < 2:
            raise ValueError(f"--tokens must be at least 2, got {args.tokens}")
        ffn_cal.variant_from_args(args)  # flag combinations of the FFN predictors
        wants.append(("--tokens", args.tokens))
    if args.delta:
        if args.delta_tokens < 2:
            raise ValueError(f"--delta-tokens must be at least 2, got {args.delta_tokens}")
        wants.append(("--delta-tokens", args.delta_tokens))
    text = check_text_file(args.text, "--text", args.text_start)
    check_output(args.out, "--out")
    tokenizer = open_model(args.model).tokenizer  # config and tokenizer only: no weights yet
    have = len(text_token_ids(tokenizer, text, max(n for _, n in wants)))
    for flag, n in wants:
        if have < n:
            raise ValueError(f"--text {args.text} holds only {have} tokens{' from --text-start' if args.text_start else ''}"
                             f", fewer than {flag} {n}; lower {flag} to at most {have} or give a longer text "
                             f"(nothing was written)")


def main(argv=None) -> int:
    from sparsedge.calibrate import delta as delta_cal
    from sparsedge.calibrate import ffn_cli as ffn_cal

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, .gguf, llama2.c .bin or smollm2-135m")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--text", required=True, help="calibration text file (keep it disjoint from evaluation text)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--dtype", default=None, help="float dtype to dequantize to (default: float32 for the svd/q4 "
                   "predictors and delta; down keeps a quantized file in its own blocks)")
    p.add_argument("--delta", action="store_true", help="also calibrate delta-attention thresholds")
    p.add_argument("--no-ffn", action="store_true", help="skip the FFN predictors (with --delta)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON last")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    ffn_cal.add_arguments(p)
    delta_cal.add_arguments(p)
    args = p.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "INFO")
    logger.enable("sparsedge")
    if args.no_ffn and not args.delta:
        p.error("--no-ffn leaves nothing to calibrate; add --delta")
    summary = {}
    try:
        check_inputs(args)
        if not args.no_ffn:
            summary["ffn"] = ffn_cal.run(args)
        if args.delta:
            summary["delta"] = delta_cal.run(args)
    except ffn_cal.BudgetError as exc:
        logger.error(str(exc))
        return 2
    except (ValueError, TypeError, OSError) as exc:  # bad input (ModelFormatError, ArtifactError: ValueErrors)
        from sparsedge.cli import report_error
        return report_error(PROG, exc, args.verbose)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
