"""Meta-train an editor: `python train.py fit --config configs/quickstart.yaml`.

A thin LightningCLI entry point: the model is any editor LightningModule (MEND, SERAC, or the
BackboneModule that fine-tunes a base model), the data any of the package's DataModules, and
everything else (trainer, callbacks, loggers) comes from the YAML config and the command line.
"""

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
