#!/usr/bin/env python
"""Evaluation: `eval.py ppl --model M --text FILE [--predictors DIR] [--delta DIR_OR_THETA] [--json]`.

Perplexity runs the same sparse paths as decode (per-token FFN active sets, delta-buffer attention),
never a dense approximation. With --json the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys

from loguru import logger


PROG = "eval.py"


def main(argv=None) -> int:
    from sparsedge import evaluate

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="perplexity on a text file")
    evaluate.add_ppl_arguments(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "INFO")
    logger.enable("sparsedge")
    try:
        result = evaluate.run_ppl(args)  # checks the text and artifact folders before loading the model
    except (ValueError, TypeError, OSError) as exc:  # bad input (ModelFormatError, ArtifactError: ValueErrors)
        from sparsedge.cli import report_error
        return report_error(PROG, exc, args.verbose)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
