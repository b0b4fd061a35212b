"""ADS-Edit as a LightningDataModule: records in the ADS-Edit layout (data_modules/ads_records.py), from JSON
or from `kedit shard` shards, batched as any edit data (`EditCollator`).

Each row's visual input reaches the backbone's encoder as one image, a list of frames or a dict of camera
views, so only a family whose `visual_inputs` take video and views can train or evaluate on the whole set;
others are refused at setup, before their weights load. The public multi-view records name nuScenes files
as `../nuscenes/...`: give that folder in `extra_image_roots`. Validation reports every metric also per
`data_type/<name>` and `image_type/<name>` (EditMetrics groups).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_modules.ads_records import ADSRecord, scan_ads_records
from data_modules.ads_synth import ADS_DIR as SYNTH_DIR
from data_modules.ads_synth import write_ads_set
from data_modules.datamodules import EditDataModule
from data_modules.records import usable_records


class ADSEditDataModule(EditDataModule):
    """ADS-Edit train / val (/ test) files, questions through the VQA template.

    Defaults are `kedit synth`'s set (`data_dir` its output folder). The other options are EditDataModule's
    (LightningCLI reads them through `**kwargs`).
    """

    def __init__(
        self,
        data_dir: str,
        train_file: str = f"{SYNTH_DIR}/train.json",
        val_file: str = f"{SYNTH_DIR}/test.json",
        image_root: str = f"{SYNTH_DIR}/images",
        extra_image_roots: tuple[str, ...] = (f"{SYNTH_DIR}/nuscenes",),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_dir,
            train_file,
            val_file,
            image_root=image_root,
            extra_image_roots=extra_image_roots,
            kind="vqa",
            **kwargs,
        )

    def prepare_data(self) -> None:
        """With `synthesize`, write `kedit synth --ads`'s set if `data_dir` has none."""
        if self.synthesize and not (self.data_dir / SYNTH_DIR / "train.json").is_file():
            write_ads_set(self.data_dir)

    def read_file(self, path: Path) -> list[ADSRecord]:
        return usable_records(scan_ads_records(path))
