"""The `diffusers-fair` console script: `diffusers-fair COMMAND [ARGS]` dispatches to each command's `main`."""

import importlib
import sys
from collections.abc import Sequence

# Command -> (module with `main(argv) -> int`, one-line description).
COMMANDS = {
    "audit": ("diffusers_fair.audit", "measure a pipeline's (and its LoRAs') demographic bias, with a report"),
}


def _usage() -> str:
    lines = ["usage: diffusers-fair COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "Run `diffusers-fair COMMAND --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    r"""
    Entry point of the `diffusers-fair` console script.

    Args:
        argv (`list[str]`, *optional*): The arguments after the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: The exit status (2 for an unknown command, as argparse uses for usage errors).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"diffusers-fair: unknown command {command!r}; use one of: {', '.join(COMMANDS)}.\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
