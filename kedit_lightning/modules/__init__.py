"""The LightningModules: editors to meta-train (MEND, SERAC), baselines (FT), and base-model fine-tuning."""

from kedit_lightning.modules.backbone import BackboneModule
from kedit_lightning.modules.ft import FTModule
from kedit_lightning.modules.mend import MENDModule
from kedit_lightning.modules.serac import SERACModule

__all__ = ["BackboneModule", "FTModule", "MENDModule", "SERACModule"]
