"""Records, validation, datasets, collation and LightningDataModules for knowledge-editing data."""
