"""Knowledge distillation: offline (:class:`KDStudent`, from a frozen teacher loaded by
:mod:`~lightning_modules.distillation.teacher_loading`) and online (:class:`MutualLearning`), their
losses (:mod:`~lightning_modules.distillation.losses`) and the forward hooks that read intermediate
features (:mod:`~lightning_modules.distillation.feature_hooks`)."""

from lightning_modules.distillation.kd_student import KDStudent
from lightning_modules.distillation.mutual_learning import MutualLearning

__all__ = ["KDStudent", "MutualLearning"]
