"""`kedit` command line: one subcommand per job, each implemented in the module that owns it.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its subcommand runs, so `kedit synth` never pays for importing Lightning or transformers.
Every subcommand's user errors are reported here, as one line (`kedit --debug` for the traceback).
"""

from __future__ import annotations

import importlib
import sys

from kedit_lightning.errors import OneLineParser, call_reporting_errors
from kedit_lightning.known_warnings import quiet_known_warnings

SUBCOMMANDS = {
    "synth": ("data_modules.synthetic", "write the embedded synthetic world (E-VQA, E-IC, VLKEB layouts + PNG images)"),
    "validate": ("data_modules.validate", "check a data file and every image it names"),
    "shard": ("data_modules.shards", "check a data file, then write it with its images as webdataset tar shards"),
    "export": (
        "kedit_lightning.commands.export_cmd",
        "turn a Lightning checkpoint into an editor artifact (editor.safetensors + editor.json)",
    ),
    "edit": (
        "kedit_lightning.commands.edit_cmd",
        "apply the edits in a data file with an exported editor and save the edited model",
    ),
    "eval": (
        "kedit_lightning.commands.eval_cmd",
        "score an exported editor on a data file: Reliability, Generality, Locality, Portability",
    ),
    "facts": (
        "kedit_lightning.commands.facts_cmd",
        "write the real-facts text edit data set (zsRE layout) from the repo's fact table and a model's answers",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="kedit", description="Meta-trained knowledge editors for multimodal LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sub_parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    run = importlib.import_module(SUBCOMMANDS[args.command][0]).run
    quiet_known_warnings()
    return call_reporting_errors(f"kedit {args.command}", lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
