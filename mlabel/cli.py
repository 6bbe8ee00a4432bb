"""The command line in one place: the ``mlabel`` console script, and the one error policy every
``python -m mlabel.X`` command runs under.

A user's mistake (config, data, a file that cannot be read or written, a missing optional
package) ends as one line, ``error: ...`` naming the file or key and the fix, with exit status 2.
Anything else is a bug of ours and is said to be one, also in one line; ``--debug`` (or
``MLABEL_DEBUG=1``) lets the traceback through instead.
"""
from __future__ import annotations

import argparse
import errno
import functools
import importlib
import os
import sys
from typing import Callable

__all__ = ["COMMANDS", "ArgumentParser", "describe_error", "guarded", "main"]

# command -> (module with main(argv), or module:function, one line)
COMMANDS = {
    "train": ("mlabel.train", "train a recipe: mlabel train RECIPE [key=value ...]"),
    "data": ("mlabel.data.__main__", "summarise a recipe's data set"),
    "tune": ("mlabel.tune", "(re)tune per-label thresholds of a saved model on val"),
    "evaluate": ("mlabel.evaluate", "metrics of a saved model on one split"),
    "predict": ("mlabel.predict", "labels and probabilities for images"),
    "export": ("mlabel.export", "ONNX, TorchScript, a plain timm folder or a WD14-style tagger folder, thresholds included"),
    "audit": ("mlabel.audit.__main__", "find wrong labels out of fold: mlabel audit RECIPE --out DIR; then audit apply"),
    "report": ("mlabel.report", "(re)build a run's report/report.html from its saved model"),
    "models": ("mlabel.cli", "list timm backbones, marking those with offline weights"),
    "push": ("mlabel.hub:push_main", "upload a model and its card to the Hugging Face Hub (or --dry-run DIR)"),
    "pull": ("mlabel.hub:pull_main", "download a model from the Hugging Face Hub, validated"),
}

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error policy: a wrong option or a missing argument is one
    ``error:`` line naming the command and where its usage is, exit 2 (argparse prints its whole usage
    block first). Subcommand parsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MLABEL_DEBUG", "") not in ("", "0")


def describe_error(err: BaseException) -> str:
    """One line for the user: what went wrong, where, and what to do."""
    from .errors import is_user_error
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on the device writing {err.filename or 'a file'}: free space or write elsewhere"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write or read {err.filename}: {err.strerror}; choose a path you may write to"
    if isinstance(err, OSError):  # the file system's answer, not a bug: say it as it is
        return f"{err.filename}: {err.strerror or err}" if err.filename else _without_worker_traceback(str(err))
    if isinstance(err, ImportError):
        return (f"the package {err.name or err} is missing; install the extra that needs it, e.g. "
                "pip install 'mlabel[export]' for ONNX or 'mlabel[tensorboard]'")
    if is_user_error(err):
        return _without_worker_traceback(str(err))
    first = str(err).splitlines()[0] if str(err) else ""
    return (f"internal error ({type(err).__name__}: {first}); this is a bug in mlabel: rerun with --debug "
            "(or MLABEL_DEBUG=1) to see the traceback, and report it")


def _without_worker_traceback(text: str) -> str:
    """torch's DataLoader re-raises a worker's exception with the worker's whole traceback in its
    message (``Caught DataError in DataLoader worker process 0. Original Traceback ...``): the
    user's message is the part after the last ``DataError: ``."""
    first = text.split("\n", 1)[0]
    if not (first.startswith("Caught ") and "DataLoader worker process" in first):
        return text
    marker = first.split()[1] + ": "
    return text.rsplit(marker, 1)[1].strip() if marker in text else text


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main(argv) -> exit status`` in the error policy; strips ``--debug``."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = _debugging(argv)
        try:
            return main([a for a in argv if a != "--debug"])
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - the one place every error is turned into a message
            if debug:
                raise
            print(f"error: {describe_error(err)}", file=sys.stderr)
            return EXIT_ERROR
    return wrapper


@guarded
def models_main(argv: list[str]) -> int:
    """``mlabel models [PATTERN]``: timm backbones matching PATTERN; ``offline`` marks weights on this machine."""
    parser = ArgumentParser(prog="mlabel models", description=models_main.__doc__.split(": ", 1)[1])
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. '*efficientnet*'")
    args = parser.parse_args(argv)
    import timm
    from .weights import offline_weights
    offline = offline_weights()
    names = timm.list_models(args.pattern)
    for name in names:
        mark = f"  offline: model.pretrained={offline[name]}" if name in offline else ""
        print(f"{name}{mark}")
    print(f"{len(names)} backbones; {sum(n in offline for n in names)} with offline weights here "
          "(model.pretrained=true fetches timm's weights from the hub)", file=sys.stderr)
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: mlabel COMMAND [ARGS ...] [--debug]\n\ncommands:\n" + "\n".join(lines)
            + "\n\nmlabel COMMAND --help describes each; python -m mlabel.COMMAND is the same command.")


def main(argv: list[str] | None = None) -> int:
    """The ``mlabel`` console script: ``mlabel COMMAND ...`` runs ``python -m mlabel.COMMAND ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"error: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return EXIT_ERROR
    if command == "models":
        return models_main(rest)
    # importing the command is guarded too: a missing dependency is a message, not a traceback
    module, _, function = COMMANDS[command][0].partition(":")
    return guarded(lambda args: getattr(importlib.import_module(module), function or "main")(args))(rest)


if __name__ == "__main__":
    sys.exit(main())
