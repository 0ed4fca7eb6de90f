"""Benchmarks behind `tools/bench.py {decode,ffn,attn}`: each submodule has add_arguments(parser) and
run(args) -> dict (the JSON object printed last with --json)."""
