"""Meta-train an editor: `python train.py fit --config configs/quickstart.yaml`.

A thin LightningCLI entry point (kedit_lightning/training_cli.py): the model is any editor LightningModule
(MEND, SERAC, or the BackboneModule that fine-tunes a base model), the data any of the package's
DataModules, and everything else (trainer, callbacks, loggers) comes from the YAML config and the command
line. `--ckpt_path last` resumes the run of the same name exactly, or stops with one line. A user error
(missing or malformed config, unknown class path, missing file) is one line on stderr and exit code 2;
`KEDIT_DEBUG=1 python train.py ...` shows the traceback instead.
"""

import sys

from kedit_lightning.errors import run_training_entry
from kedit_lightning.training_cli import main as run_training_cli


def main() -> None:
    run_training_cli()


if __name__ == "__main__":
    sys.exit(run_training_entry(main))
