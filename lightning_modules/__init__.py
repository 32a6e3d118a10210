"""LightningModules: methods, their networks and their losses."""

from lightning_modules.detection.detector import Detector
from lightning_modules.ensemble import Ensemble
from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.ssl.flexmatch import FlexMatch
from lightning_modules.ssl.freematch import FreeMatch
from lightning_modules.distillation.kd_student import KDStudent
from lightning_modules.ssl.mean_teacher import MeanTeacher
from lightning_modules.ssl.mixmatch import MixMatch
from lightning_modules.distillation.mutual_learning import MutualLearning
from lightning_modules.ssl.pi_model import PiModel
from lightning_modules.ssl.pseudo_label import PseudoLabel
from lightning_modules.ssl.remixmatch import ReMixMatch
from lightning_modules.segmentation.segmenter import Segmenter
from lightning_modules.segmentation.semi_supervised import SegFixMatch, SegMeanTeacher
from lightning_modules.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.softmatch import SoftMatch
from lightning_modules.classification.supervised import Supervised
from lightning_modules.ssl.temporal_ensembling import TemporalEnsembling
from lightning_modules.detection.unbiased_teacher import UnbiasedTeacher
from lightning_modules.ssl.uda import UDA
from lightning_modules.ssl.vat import VAT

# The semi-supervised family and its supervised baseline, in the order of the results tables.
SSL_METHODS = [
    "Supervised", "PseudoLabel", "PiModel", "TemporalEnsembling", "MeanTeacher", "VAT", "MixMatch",
    "UDA", "ReMixMatch", "FixMatch", "FlexMatch", "FreeMatch", "SoftMatch",
]
# Distillation: offline (a frozen teacher) and online (peers teaching each other).
KD_METHODS = ["KDStudent", "MutualLearning"]
# Segmentation: supervised, and the semi-supervised methods applied per pixel.
SEGMENTATION_METHODS = ["Segmenter", "SegFixMatch", "SegMeanTeacher"]
# Detection: supervised, and Unbiased Teacher.
DETECTION_METHODS = ["Detector", "UnbiasedTeacher"]
# Concrete modules selectable by class name on the command line.
MODELS = SSL_METHODS + KD_METHODS + SEGMENTATION_METHODS + DETECTION_METHODS + ["Ensemble"]
__all__ = ["SemiSupervisedModule", *MODELS]
