"""Image classification: the task (:mod:`~lightning_modules.classification.task`), the classification base
(:mod:`~lightning_modules.classification.semi_supervised`: the core given that task), the supervised baseline
(:mod:`~lightning_modules.classification.supervised`), the labeled-loss criteria by name
(:mod:`~lightning_modules.classification.criteria`: label smoothing and its relatives in :mod:`~lightning_modules.classification.label_regularization`, the imbalance losses in
:mod:`~lightning_modules.classification.imbalance_losses`) and the backbones by name
(:mod:`~lightning_modules.classification.networks`).

Nothing is imported here: each piece is imported from its own module. ``lightning_modules.Supervised`` and
``lightning_modules.SemiSupervisedModule`` are the public names.
"""
