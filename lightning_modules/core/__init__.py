"""The task-neutral core every method builds on, and the pieces ``datamodules/`` and ``callbacks/`` may
import (docs/design.md, "Import rules"):

* :mod:`~lightning_modules.core.training_module`: the task-neutral base module (network by a hook, optimizer
  and schedule, evaluation EMA, finite-loss check, checkpoint hooks, logging);
* :mod:`~lightning_modules.core.task`: the ``Task`` protocol a module is given (labeled loss, evaluation,
  prediction: ``classification/``, ``segmentation/``, ``detection/`` each have one);
* :mod:`~lightning_modules.core.optimization`: parameter groups, SGD and the cosine schedule
  (:class:`~lightning_modules.core.optimization.OptimizerRecipe`), loss-weight ramp-ups;
* :mod:`~lightning_modules.core.ema`: ``EMAModel``, the weight average the base and the ``EMA``/``SWA``
  callbacks share;
* :mod:`~lightning_modules.core.distributed`, :mod:`~lightning_modules.core.batch_norm`: BatchNorm
  statistics across ranks, and frozen during extra forwards;
* :mod:`~lightning_modules.core.training_checks`, :mod:`~lightning_modules.core.progress_values`: the
  finite-loss check and the progress bar's values without a GPU sync;
* :mod:`~lightning_modules.core.atomic`: files written whole or not at all;
* :mod:`~lightning_modules.core.checkpoint_loading`: every checkpoint and weight file read, as data
  (one policy: ``weights_only=True``);
* :mod:`~lightning_modules.core.class_keys`: class names turned into metric keys;
* :mod:`~lightning_modules.core.batch`, :mod:`~lightning_modules.core.data_contract`: the model-data contract
  (the batch per task and the views a method asks for; the DataModule's facts a method receives in ``setup``).

Nothing is imported here: each piece is imported from its own module.
"""
