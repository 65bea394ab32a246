"""The ``tusrec`` command line: ``tusrec <command> --help`` for each command.

The root executables (``./landmarks`` ...) are this module under their own names.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import sys
from dataclasses import dataclass

from tusrec.data import TusrecDataError


@dataclass(frozen=True)
class Command:
    """A command: the module beside its room that holds its options and handler, the
    function there that adds the options to its parser, and the line ``--help`` lists it by.
    The module is imported only when that command is parsed (the submission image holds
    ./predict's alone; ./predict never imports the harness's libraries)."""

    module: str
    add: str
    summary: str


@dataclass(frozen=True)
class Group:
    """A command with subcommands of its own (``evaluate``)."""

    summary: str
    description: str
    dest: str
    commands: dict[str, Command]


EVALUATE = {
    "check": Command("tusrec.scoring.command", "add_check", "validate a predictions folder before scoring"),
    "score": Command("tusrec.scoring.command", "add_score", "per-scan GPE, GLE, LPE, LLE and runtime"),
    "rank": Command(
        "tusrec.ranking.command",
        "add_rank",
        "rank teams from their metrics.csv and analyse how stable the ranking is",
    ),
    "run": Command(
        "tusrec.harness.command",
        "add_run",
        "run every team's image on every scan in containers, score each scan, rank",
    ),
    "preflight": Command(
        "tusrec.harness.command",
        "add_preflight",
        "test a submission image as the organisers will run it: a checklist, then the tar to hand in",
    ),
    "show": Command(
        "tusrec.show.command",
        "add_show",
        "trajectories and reconstructed volumes per scan (PNGs and show.html)",
    ),
}

COMMANDS: dict[str, Command | Group] = {
    "predict": Command(
        "tusrec.predict.command",
        "add_predict",
        "predict GP/GL/LP/LL for every scan of a folder (the submission entrypoint)",
    ),
    "evaluate": Group(
        "validate and score predictions against ground truth",
        "The organisers' evaluation: `check` validates a predictions folder "
        "against a data folder; `score` computes per-scan GPE, GLE, LPE, LLE and runtime; "
        "`rank` ranks teams from their scores and analyses the ranking; `run` runs team images "
        "in containers, scores and ranks them; `preflight` tests one image as `run` will; `show` "
        "draws trajectories and reconstructions.",
        "evaluate_command",
        EVALUATE,
    ),
    "new-submission": Command(
        "tusrec.harness.command",
        "add_new_submission",
        "a team's submission folder: the model, a Dockerfile installing the kit's predictor, the loop",
    ),
    "info": Command("tusrec.data_command", "add_info", "list and validate the scans of a data folder"),
    "train": Command(
        "tusrec.train.command", "add_train", "train ensemble members on a training-layout folder"
    ),
    "error-head": Command(
        "tusrec.train.command",
        "add_error_head",
        "fit the members' error heads (their per-frame expected error) after training",
    ),
    "error-model": Command(
        "tusrec.train.command",
        "add_error_model",
        "fit the ensemble's expected error from the registration residual (after training)",
    ),
    "weights": Command(
        "tusrec.train.command",
        "add_weights",
        "list the members of a weights folder with their training and held-out metrics",
    ),
    "simulate": Command(
        "tusrec.simulate.command",
        "add_simulate",
        "write synthetic freehand scans in the real TUS-REC layout",
    ),
    "landmarks": Command(
        "tusrec.landmarks_command", "add_landmarks", "extract SIFT landmarks into landmark_<sub>.h5 files"
    ),
    "reference": Command(
        "tusrec.scoring.command",
        "add_reference",
        "write reference predictions (ground truth or identity) in the predictions format",
    ),
}


def _add_commands(
    parser: argparse.ArgumentParser, commands: dict, dest: str, argv: list[str] | None
) -> argparse._SubParsersAction:
    """Subparsers of ``commands`` under ``parser``. With ``argv`` (what follows on the command
    line), only the command it names gets its options, so that only that command's module is
    imported; the others are listed by their summary alone. ``argv`` None: every command."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar="command")
    chosen = None
    if argv is not None:
        chosen = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    for name, command in commands.items():
        p = sub.add_parser(name, help=command.summary)
        if argv is not None and (chosen is None or argv[chosen] != name):
            continue
        rest = None if argv is None else argv[chosen + 1 :]
        if isinstance(command, Group):
            p.description = command.description
            _add_commands(p, command.commands, command.dest, rest)
        else:
            getattr(importlib.import_module(command.module), command.add)(p)
    return sub


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``tusrec`` parser and its commands; with ``argv``, only the command it names is
    complete (see _add_commands)."""
    parser = argparse.ArgumentParser(prog="tusrec", description=__doc__.splitlines()[0])
    return parser, _add_commands(parser, COMMANDS, "command", argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``tusrec <command> ...``; with ``prog`` set to a command name, run that command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog in COMMANDS:  # invoked as ./landmarks etc.: that command's own parser
        parser, sub = build_parser([prog, *argv])
        command_parser = sub.choices[prog]
        command_parser.prog = prog
        # its own subcommands were named 'tusrec evaluate rank' ...: as run, './evaluate rank'
        for action in command_parser._subparsers._group_actions if command_parser._subparsers else []:
            for name, child in getattr(action, "choices", {}).items():
                child.prog = f"{prog} {name}"
        args = command_parser.parse_args(argv)
    else:
        parser, _ = build_parser(argv)
        args = parser.parse_args(argv)
    try:
        return args.run(args)
    except TusrecDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A folder that cannot be written (read-only, no permission, disk full) or read:
        # one line naming the path, as ./predict says it, for every command.
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2


ROOT_COMMANDS = ("predict", "evaluate", "landmarks")  # the checkout's ./predict ... (tusrec --as NAME)
REFERENCE_WIDTH = 100  # columns of the usage lines in the reference (the terminal's otherwise)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """A parser's arguments and options, without -h and the subcommands."""
    return [
        a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name ({} if it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help as --help prints it (%(default)s ... filled in), on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def _markdown(text: str) -> str:
    """Help text as Markdown prose: `code` kept, and outside it the characters that Markdown
    or a table would take for syntax (<key>.h5 would be an HTML tag) escaped."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside backticks
        parts[i] = re.sub(r"([\\|*_\[\]])", r"\\\1", parts[i]).replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts) if len(parts) % 2 else text.replace("|", "\\|")


def _command_markdown(parser: argparse.ArgumentParser, title: str, summary: str, level: int) -> list[str]:
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=REFERENCE_WIDTH)
    lines = [f"{'#' * level} `{title}`", "", _markdown(summary) + ".", ""]
    if parser.description:
        lines += [_markdown(parser.description), ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    rows = []
    for action in options(parser):
        formatter = parser._get_formatter()
        name = formatter._format_action_invocation(action)
        required = action.required and action.option_strings
        rows.append(
            f"| `{name}` | {_markdown(help_text(parser, action))}{' (required)' if required else ''} |"
        )
    if rows:
        lines += ["| argument or option | what it does |", "|---|---|", *rows, ""]
    return lines


def reference_markdown() -> str:
    """The command reference (docs/reference/cli.md): every command's summary, description,
    usage and options, from the parsers themselves (scripts/cli_reference.py writes it; a
    test fails when the committed file differs)."""
    _, sub = build_parser()
    lines = [
        "# Command reference",
        "",
        "<!-- Generated from the argparse parsers by scripts/cli_reference.py: do not edit. -->",
        "",
        "Every command with every option, as `--help` prints it. `./predict`, `./evaluate` and "
        "`./landmarks` are the checkout's root commands (in the images: `predict`, `evaluate`, "
        "`landmarks`); the others run as `.venv/bin/tusrec COMMAND` (or `python -m tusrec COMMAND`). "
        "Usage errors exit with status 2.",
        "",
    ]
    for name, command in COMMANDS.items():
        parser = sub.choices[name]
        title = f"./{name}" if name in ROOT_COMMANDS else f"tusrec {name}"
        parser.prog = name if name in ROOT_COMMANDS else f"tusrec {name}"
        lines += _command_markdown(parser, title, command.summary, 2)
        for child_name, child in subcommands(parser).items():
            child.prog = f"{parser.prog} {child_name}"
            lines += _command_markdown(
                child, f"{title} {child_name}", command.commands[child_name].summary, 3
            )
    return "\n".join(lines).rstrip() + "\n"


def os_error_message(err: OSError) -> str:
    """'PATH: reason' of an OSError (h5py's carry no filename: their own message)."""
    if err.filename is not None and err.strerror:
        where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        return f"{where}: {err.strerror} (check that the folder exists and can be written)"
    return " ".join(str(err).split()) or type(err).__name__
