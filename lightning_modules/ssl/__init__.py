"""Semi-supervised classification: one file per method over the shared base, their losses
(:mod:`~lightning_modules.ssl.losses`), distribution alignment
(:mod:`~lightning_modules.ssl.distribution_alignment`), the adaptive-threshold state they keep
(:mod:`~lightning_modules.ssl.threshold_state`), and the projection head and feature memories of the
similarity methods (:mod:`~lightning_modules.ssl.projection`, :mod:`~lightning_modules.ssl.memory_bank`)."""

from lightning_modules.ssl.adamatch import AdaMatch
from lightning_modules.ssl.comatch import CoMatch
from lightning_modules.ssl.crmatch import CRMatch
from lightning_modules.ssl.dash import Dash
from lightning_modules.ssl.deep_co_training import DeepCoTraining
from lightning_modules.ssl.defixmatch import DeFixMatch
from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.ssl.flexmatch import FlexMatch
from lightning_modules.ssl.freematch import FreeMatch
from lightning_modules.ssl.label_propagation import LabelPropagation
from lightning_modules.ssl.ladder import LadderNetwork
from lightning_modules.ssl.ladder_gamma import LadderGamma
from lightning_modules.ssl.mean_teacher import MeanTeacher
from lightning_modules.ssl.mixmatch import MixMatch
from lightning_modules.ssl.multimatch import MultiMatch
from lightning_modules.ssl.pi_model import PiModel
from lightning_modules.ssl.pseudo_label import PseudoLabel
from lightning_modules.ssl.refixmatch import ReFixMatch
from lightning_modules.ssl.remixmatch import ReMixMatch
from lightning_modules.ssl.simmatch import SimMatch
from lightning_modules.ssl.simmatchv2 import SimMatchV2
from lightning_modules.ssl.sequencematch import SequenceMatch
from lightning_modules.ssl.softmatch import SoftMatch
from lightning_modules.ssl.temporal_ensembling import TemporalEnsembling
from lightning_modules.ssl.uda import UDA
from lightning_modules.ssl.vat import VAT

__all__ = ["PseudoLabel", "PiModel", "TemporalEnsembling", "MeanTeacher", "VAT", "MixMatch", "UDA", "ReMixMatch",
           "FixMatch", "FlexMatch", "FreeMatch", "SoftMatch", "AdaMatch", "Dash",
           "DeFixMatch", "ReFixMatch", "LabelPropagation", "SimMatch", "CoMatch", "SimMatchV2", "CRMatch", "SequenceMatch", "MultiMatch",
           "LadderNetwork", "LadderGamma", "DeepCoTraining"]
