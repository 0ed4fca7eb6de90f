"""`sparsedge` console script: generate text, or report what backends and kernels were found."""
from __future__ import annotations

import argparse
import json
import sys

from loguru import logger


def _setup_logging(verbose: bool) -> None:
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if verbose else "WARNING")
    logger.enable("sparsedge")


def summary_line(st) -> str:
    """The one-line summary `sparsedge generate` prints on stderr (as llama.cpp prints its timings)."""
    return (f"prompt {st.prompt_tokens} tokens, {st.new_tokens} new tokens | prefill "
            f"{st.prefill_tokens_per_s:.1f} tok/s, decode {st.decode_tokens_per_s:.1f} tok/s | stop: {st.stop_reason}")


def check_artifact_flags(predictors, delta) -> None:
    """--predictors / --delta folders (a --delta that is a theta number is no folder), before any model load."""
    from sparsedge.artifact import check_artifact
    from sparsedge.delta import delta_from_cli
    if predictors is not None:
        check_artifact(predictors, "ffn", "--predictors")
    if delta is not None and not isinstance(delta_from_cli(delta), dict):
        check_artifact(delta, "delta", "--delta")


def report_error(prog: str, exc: BaseException, verbose: bool) -> int:
    """The CLIs' bad-input answer: one line `<prog>: error: ...` on stderr (the traceback too with -v); status 2."""
    if verbose:
        logger.opt(exception=exc).debug("traceback")
    msg = " ".join(str(exc).split("\n")) or type(exc).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def check_generate_args(args):
    """What `generate` can check before the model loads: the prompt, the sampling arguments, the artifact
    folders. Returns the SamplingParams."""
    from sparsedge.sampling import SamplingParams
    from sparsedge.tokenizer import check_text

    try:
        check_text(args.prompt)
    except ValueError as exc:
        raise ValueError(f"--prompt: {exc}") from None
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    check_artifact_flags(args.predictors, args.delta)
    return params


def cmd_generate(args) -> int:
    import warnings

    from sparsedge.session import ContextFullWarning, LongContextWarning, Session

    check_generate_args(args)
    with warnings.catch_warnings():
        # the library also logs these at WARNING, which this command shows: one line each is enough
        warnings.simplefilter("ignore", ContextFullWarning)
        warnings.simplefilter("ignore", LongContextWarning)
        return _generate(args, Session)


def _generate(args, Session) -> int:
    from sparsedge.delta import delta_from_cli

    delta = delta_from_cli(args.delta, args.window, args.sinks)
    session = Session.load(args.model, backend=args.backend, dtype=args.dtype, weights=args.weights,
                           predictors=args.predictors, delta=delta, tokenizer=args.tokenizer,
                           max_seq_len=args.max_seq_len, allow_longer_context=args.allow_longer_context,
                           progress=not args.quiet)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop=args.stop or None, ignore_eos=args.ignore_eos)
    if args.json:
        r = session.generate(args.prompt, **kw)
        print(json.dumps({"text": r.text, "token_ids": r.token_ids, "stats": r.stats.to_dict()}))
    else:
        for piece in session.generate(args.prompt, stream=True, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    if not args.quiet:
        print(summary_line(session.stats), file=sys.stderr, flush=True)
    return 0


def doctor_report() -> dict:
    import torch

    from sparsedge import ops
    from sparsedge.backends import base

    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "ops": ops.op_names(),
              "backends": {}}
    for name, cls in base._REGISTRY.items():
        if cls.is_available():
            report["backends"][name] = cls().describe()
        else:
            entry = {"name": name, "available": False, "kernel_library": cls.kernel_module}
            describe_offline = getattr(cls, "describe_offline", None)
            if callable(describe_offline):
                entry.update(describe_offline())
            report["backends"][name] = entry
    return report


def cmd_doctor(args) -> int:
    report = doctor_report()
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    print(f"torch {report['torch']}, {report['threads']} CPU threads")
    for name, b in report["backends"].items():
        if not b.get("available"):
            extra = f" ({b['reason']})" if b.get("reason") else ""
            print(f"[{name}] not available on this machine{extra}")
            fused = b.get("fused_ops")
            if fused:
                print("    kernels built: " + ", ".join(k for k, v in fused.items() if v))
            continue
        print(f"[{name}] device {b['device']}, kernel library {b['kernel_library']}"
              + (f" FAILED TO LOAD: {b['kernel_error']}" if b.get("kernel_error") else ""))
        for op, ok in b["fused_ops"].items():
            print(f"    {op:<18} {'fused' if ok else 'composite (fallback)'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsedge", description="sparse on-device LLM decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", default="smollm2-135m",
                   help="checkpoint folder, .gguf, llama2.c .bin, or smollm2-135m (default)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--backend", default="auto")
    g.add_argument("--dtype", default=None, help="dequantize the weights to this dtype (default: a quantized GGUF "
                                                 "runs in its own blocks)")
    g.add_argument("--weights", default=None, help="native (as stored), or q8_0/q4_0/q4_1 to quantize on load")
    g.add_argument("--tokenizer", default=None, help="tokenizer file for llama2.c checkpoints")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="context length (default: the model's trained context, at most 2048)")
    g.add_argument("--allow-longer-context", action="store_true",
                   help="allow --max-seq-len above the context the model was trained on (warns)")
    g.add_argument("--predictors", default=None, help="FFN predictor artifact folder (tools/calibrate.py)")
    g.add_argument("--delta", default=None, help="delta attention: a theta value or an artifact folder")
    g.add_argument("--window", type=int, default=None)
    g.add_argument("--sinks", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print {text, token_ids, stats} as JSON")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no summary line (tokens, prefill and decode tok/s, stop reason) on stderr")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("doctor", help="show the backends and fused kernels found")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_doctor)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # ModelFormatError, ArtifactError: ValueErrors
        return report_error("sparsedge", exc, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
