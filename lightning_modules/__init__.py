"""LightningModules: methods, their networks and their losses."""

from lightning_modules.ensemble import Ensemble
from lightning_modules.fixmatch import FixMatch
from lightning_modules.semi_supervised import SemiSupervisedModule
from lightning_modules.supervised import Supervised

__all__ = ["SemiSupervisedModule", "Supervised", "FixMatch", "Ensemble"]
# Concrete methods selectable by class name on the command line.
MODELS = ["Supervised", "FixMatch", "Ensemble"]
