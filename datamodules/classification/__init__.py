"""The classification DataModules on the labeled/unlabeled base (datamodules.labeled_unlabeled)."""
