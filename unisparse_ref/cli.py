"""Command line: ``unisparse-ref COMMAND`` (also ``python -m unisparse_ref COMMAND``).

Each command lives in its own module, loaded only when called, with a
``main(argv: list[str]) -> int`` function.
"""

from __future__ import annotations

import importlib
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("unisparse_ref.demo", "run UniSparse on a synthetic 8K workload with every backend (--model smollm2: a real LLM)"),
    "info": ("unisparse_ref.info", "print versions, available backends and the GPU"),
    "bench": ("unisparse_ref.bench", "benchmark the GPU kernels against other attention kernels"),
    "verify": ("unisparse_ref.oracle.verify", "check your own implementation against the reference"),
    "evaluate": ("unisparse_ref.evaluation.evaluate", "compare UniSparse's selection with other methods"),
}


def _usage() -> str:
    lines = ["usage: unisparse-ref COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'unisparse-ref COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unisparse-ref`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unisparse-ref: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[name][0]:
            print(f"unisparse-ref: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
