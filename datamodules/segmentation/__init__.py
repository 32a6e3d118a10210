"""The segmentation DataModules on the labeled/unlabeled base (datamodules.labeled_unlabeled)."""
