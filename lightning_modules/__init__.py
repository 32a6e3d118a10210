"""LightningModules: methods, their networks and their losses, one sub-package per family over a
task-neutral core (docs/design.md, "Packages"):

``core/`` the base module and what every method shares; ``classification/``, ``segmentation/`` and
``detection/`` the tasks (segmentation and detection with their semi-supervised methods); ``ssl/`` the
semi-supervised classifiers; ``distillation/`` knowledge distillation; ``fusion/`` several trained models
made into one (``Ensemble``, the greedy soup). Every class selectable by ``--model`` is importable from here.
"""

import sys
from importlib import import_module

from lightning_modules.classification.supervised import Supervised
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.detection import Detector, SoftTeacher, UnbiasedTeacher
from lightning_modules.distillation import KDStudent, MutualLearning
from lightning_modules.fusion import Ensemble
from lightning_modules.segmentation import CPS, SegFixMatch, SegMeanTeacher, Segmenter, UniMatch
from lightning_modules.ssl import (UDA, VAT, AdaMatch, Dash, DeepCoTraining, DeFixMatch, FixMatch, FlexMatch, FreeMatch,
                                   LabelPropagation, LadderGamma, LadderNetwork, MeanTeacher, MixMatch, PiModel,
                                   PseudoLabel, ReFixMatch, ReMixMatch, SoftMatch, TemporalEnsembling)
from lightning_modules.ssl import CoMatch, CRMatch, MultiMatch, SequenceMatch, SimMatch, SimMatchV2

# The semi-supervised family and its supervised baseline, in the order of the results tables.
SSL_METHODS = [
    "Supervised", "PseudoLabel", "PiModel", "TemporalEnsembling", "MeanTeacher", "VAT", "MixMatch",
    "UDA", "ReMixMatch", "FixMatch", "FlexMatch", "FreeMatch", "SoftMatch", "AdaMatch", "Dash",
    "DeFixMatch", "ReFixMatch", "LabelPropagation",
    "SimMatch", "CoMatch", "SimMatchV2", "CRMatch", "SequenceMatch", "MultiMatch", "LadderNetwork", "LadderGamma",
    "DeepCoTraining",
]
# Distillation: offline (a frozen teacher) and online (peers teaching each other).
KD_METHODS = ["KDStudent", "MutualLearning"]
# Segmentation: supervised, and the semi-supervised methods applied per pixel.
SEGMENTATION_METHODS = ["Segmenter", "SegFixMatch", "SegMeanTeacher", "CPS", "UniMatch"]
# Detection: supervised, Unbiased Teacher and Soft Teacher.
DETECTION_METHODS = ["Detector", "UnbiasedTeacher", "SoftTeacher"]
# Concrete modules selectable by class name on the command line.
MODELS = SSL_METHODS + KD_METHODS + SEGMENTATION_METHODS + DETECTION_METHODS + ["Ensemble"]
__all__ = ["SemiSupervisedModule", *MODELS]

#: Module paths of the flat layout before 2026-12-02 (issue 16), and of ``ensemble.py`` before it joined the
#: soup in ``fusion/`` -> where their classes live now. A
#: class path such as ``lightning_modules.fixmatch.FixMatch`` (typed as ``--model``, kept in a config, or
#: saved as a checkpoint's ``_class_path`` by LightningCLI) keeps resolving: each old module name is an
#: alias of its new module (the same module object, so ``is`` and pickling agree). Only modules that
#: define a LightningModule are listed: nothing else is named by a path in a config or a checkpoint.
MOVED_MODULES = {
    "semi_supervised": "classification.semi_supervised",
    "supervised": "classification.supervised",
    **{name: f"ssl.{name}" for name in (
        "pseudo_label", "pi_model", "temporal_ensembling", "mean_teacher", "vat", "mixmatch", "uda", "remixmatch",
        "fixmatch", "flexmatch", "freematch", "softmatch")},
    "kd_student": "distillation.kd_student",
    "mutual_learning": "distillation.mutual_learning",
    "segmenter": "segmentation.segmenter",
    "semi_supervised_segmentation": "segmentation.semi_supervised",
    "detector": "detection.detector",
    "unbiased_teacher": "detection.unbiased_teacher",
    "ensemble": "fusion.ensemble",  # moved on 2026-12-02, beside the soup
}
for _old, _new in MOVED_MODULES.items():
    sys.modules[f"{__name__}.{_old}"] = globals()[_old] = import_module(f"{__name__}.{_new}")
del _old, _new
# The classification base was core/semi_supervised.py on 2026-12-02, until the task was composed (issue 16)
sys.modules[f"{__name__}.core.semi_supervised"] = semi_supervised
