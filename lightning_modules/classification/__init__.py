"""Image classification: the supervised baseline (:mod:`~lightning_modules.classification.supervised`),
the labeled-loss criteria by name (:mod:`~lightning_modules.classification.criteria`: label smoothing and
its relatives in :mod:`~lightning_modules.classification.label_regularization`, the imbalance losses in
:mod:`~lightning_modules.classification.imbalance_losses`) and the backbones by name
(:mod:`~lightning_modules.classification.networks`).

Nothing is imported here: the base in ``lightning_modules.core`` still builds its criterion and network
from this package (docs/design.md, "Import rules"), so importing ``Supervised`` here would close a cycle.
``lightning_modules.Supervised`` is the public name.
"""
