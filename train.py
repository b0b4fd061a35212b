"""Meta-train an editor: `python train.py fit --config configs/quickstart.yaml`.

A thin LightningCLI entry point: the model is any editor LightningModule (MEND, SERAC, or the
BackboneModule that fine-tunes a base model), the data any of the package's DataModules, and
everything else (trainer, callbacks, loggers) comes from the YAML config and the command line.
A user error (missing or malformed config, unknown class path, missing file) is one line on
stderr and exit code 2; `KEDIT_DEBUG=1 python train.py ...` shows the traceback instead.
"""

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from kedit_lightning.errors import run_training_entry


def main() -> None:
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    sys.exit(run_training_entry(main))
