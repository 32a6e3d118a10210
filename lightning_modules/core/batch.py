"""The batch half of the model-data contract: what a batch holds, per task, and the views a method asks for.

Written once here: the DataModules (``datamodules/``) make these batches, the methods read them, and
:func:`check_training_batch` / :func:`check_evaluation_batch` hold both sides to it (every DataModule's
batches in ``tests/lightning_modules/core/test_batch_contract.py``; the base checks the first training
batch of each epoch, so a DataModule of one's own that breaks the contract fails naming the key). The
other half, the facts a method may know about its data, is :mod:`lightning_modules.core.data_facts`.

One dialect for every task: a sample is an ``image``, its ``target`` and its ``index``.

==============  ==================================  ===========================================================
task            ``image``                           ``target``
==============  ==================================  ===========================================================
classification  float (N, C, H, W), normalized      int64 (N,) class ids (-1: unknown), or multi-hot (N, K)
segmentation    float (N, C, H, W), normalized      int64 (N, H, W) class id per pixel (-1: unknown)
detection       list of N float (3, H_i, W_i)       list of N :class:`DetectionTarget` dicts (torchvision's form)
                in [0, 1], sizes may differ
==============  ==================================  ===========================================================

``index`` is int64 (N,): the sample's position in the DataModule's index space ``0 .. num_indices - 1``
(:class:`~lightning_modules.core.data_facts.DataFacts`), the key of per-sample memories (FlexMatch, Temporal
Ensembling). Detection batches also carry ``image_id`` (COCO ids, a list); batches of a predict folder carry
``file`` (names relative to it) and no ``target``.

A training batch is ``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` (Lightning's
``CombinedLoader`` of two streams) after the DataModule's ``on_after_batch_transfer``. ``"unlabeled"`` is
absent when the method asks for no views; it holds one image entry per view asked for, plus ``target``
(the true targets, for diagnostics such as ``pseudo_label_acc`` only, never a loss; -1 where unknown) and
``index``. Validation, test and predict batches are :class:`EvaluationBatch`: whole, unaugmented images.

Views. A method lists the unlabeled views it needs in its class attribute ``unlabeled_views``
(``("weak", "strong")`` for FixMatch, none for ``Supervised``); a DataModule's ``unlabeled_views``
argument overrides it. A name starts with ``weak`` (the weak augmentation), ``strong`` (the strong one)
or ``plain`` (none); each name is an independent draw, so ``("weak", "weak2")`` gives two weak views.
Classification's labeled images get the weak view, and each view the method names in ``labeled_views`` as an
entry of its own (DeFixMatch's ``("strong",)``; other tasks' DataModules make none); segmentation and detection share one geometric draw
across the views of an image (``strong*`` adds photometric changes), so pixels and boxes stay aligned.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

try:  # evaluated annotations (no __future__ import), so that Required/NotRequired mark the keys
    from typing import NotRequired, Required, TypedDict
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired, Required, TypedDict

TASKS = ("classification", "segmentation", "detection")
VIEW_PREFIXES = ("weak", "medium", "strong", "plain")  # medium: SequenceMatch, classification only
#: entries of a batch part that are not images
SAMPLE_KEYS = ("target", "index", "image_id", "file")
#: the names of the detection batches before 2026-12 (``images``, ``targets``), for the error message
OLD_NAMES = {"images": "image", "targets": "target"}


class DetectionTarget(TypedDict, total=False):
    """One image's objects, as torchvision's detectors take them (evaluation targets keep crowd regions)."""

    boxes: Required[Tensor]  # float32 (n, 4), xyxy pixels
    labels: Required[Tensor]  # int64 (n,), 1..K (0 is the background)
    masks: Tensor  # uint8 (n, H, W), instance segmentation only
    image_id: Tensor  # int64 ()
    iscrowd: Tensor  # int64 (n,), evaluation only
    area: Tensor  # float32 (n,), evaluation only


class LabeledBatch(TypedDict):
    image: Tensor | list[Tensor]
    target: Tensor | list[DetectionTarget]
    index: Tensor
    image_id: NotRequired[list[int]]


class UnlabeledBatch(TypedDict):
    """``target`` and ``index``, and one image entry per view asked for (``weak``, ``strong``, ...)."""

    target: Tensor | list[DetectionTarget]
    index: Tensor
    image_id: NotRequired[list[int]]


class TrainingBatch(TypedDict):
    labeled: LabeledBatch
    unlabeled: NotRequired[UnlabeledBatch]


class EvaluationBatch(TypedDict):
    image: Tensor | list[Tensor]
    target: NotRequired[Tensor | list[DetectionTarget]]  # absent in a predict folder's batches
    index: Tensor
    image_id: NotRequired[list[int]]
    file: NotRequired[list[str]]


class BatchContractError(ValueError):
    """A batch that does not follow the contract of :mod:`lightning_modules.core.batch`."""


def check_view_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, if every one starts with ``weak``, ``medium``, ``strong`` or ``plain``."""
    names = tuple(names)
    unknown = [name for name in names if not isinstance(name, str) or not name.startswith(VIEW_PREFIXES)]
    if unknown:
        raise ValueError(f"unknown view(s) {unknown}: view names start with 'weak', 'medium', 'strong' or 'plain' "
                         f"(e.g. ['weak', 'strong'], or ['weak', 'weak2'] for two weak draws)")
    return names


def is_view(key: str) -> bool:
    """Whether an entry of an unlabeled batch is a view (an image), not ``target``/``index``/..."""
    return key.startswith(VIEW_PREFIXES)


def training_images(batch: Mapping[str, Any]) -> list[Any]:
    """A training batch's images as one forward sees them: the labeled images, then each unlabeled view."""
    unlabeled = batch.get("unlabeled") or {}
    return [batch["labeled"]["image"]] + [value for key, value in unlabeled.items() if is_view(key)]


# --- the checker ----------------------------------------------------------------------------
def check_training_batch(batch: Any, task: str, views: Iterable[str] = (), labeled_views: Iterable[str] = ()) -> None:
    """Raise :class:`BatchContractError` naming the first entry of ``batch`` that breaks the contract of
    ``task``; ``views`` are the unlabeled views the method asks for (the unlabeled part, when present, must
    hold them), ``labeled_views`` the labeled ones besides ``image``."""
    _check_task(task)
    if not isinstance(batch, Mapping) or "labeled" not in batch:
        raise BatchContractError(f"a training batch is a dict {{'labeled': ..., 'unlabeled': ...}} (a CombinedLoader "
                                 f"of two streams), got {_describe(batch)}")
    labeled_views = check_view_names(labeled_views)
    if isinstance(batch["labeled"], Mapping):
        missing = [view for view in labeled_views if view not in batch["labeled"]]
        if missing:
            raise BatchContractError(f"batch['labeled'] lacks the view(s) {missing} the method asks for in its "
                                     f"labeled_views: a classification DataModule makes them (AugmentedViews)")
    _check_part(batch["labeled"], "batch['labeled']", task, ("image", *labeled_views))
    if batch.get("unlabeled") is not None:
        part = batch["unlabeled"]
        present = [key for key in part if isinstance(key, str) and is_view(key)] if isinstance(part, Mapping) else []
        missing = [view for view in views if view not in present]
        if missing:
            raise BatchContractError(f"batch['unlabeled'] lacks the view(s) {missing} the method asks for (it has "
                                     f"{present}): make them, or drop the DataModule's unlabeled_views override")
        _check_part(part, "batch['unlabeled']", task, tuple(present))


def check_evaluation_batch(batch: Any, task: str, with_target: bool = True) -> None:
    """Raise :class:`BatchContractError` if a validation/test (``with_target``) or predict batch breaks the contract."""
    _check_task(task)
    _check_part(batch, "batch", task, ("image",), with_target)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: the batch contract knows {', '.join(TASKS)}")


def _check_part(part: Any, where: str, task: str, image_keys: tuple[str, ...], with_target: bool = True) -> None:
    if not isinstance(part, Mapping):
        raise BatchContractError(f"{where} must be a dict of 'image', 'target' and 'index', got {_describe(part)}")
    required = image_keys + (("target",) if with_target else ()) + ("index",)
    missing = [key for key in required if key not in part]
    if missing:
        renamed = [f"'{old}' is now '{new}'" for old, new in OLD_NAMES.items() if old in part and new in missing]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        raise BatchContractError(f"{where} lacks {missing} (it has {sorted(map(str, part))}){hint}: the batch "
                                 f"contract (lightning_modules/core/batch.py) names them 'image', 'target', 'index'")
    index = part["index"]
    if not isinstance(index, Tensor) or index.ndim != 1 or index.dtype.is_floating_point or index.is_complex():
        raise BatchContractError(f"{where}['index'] must be an int64 tensor (N,), got {_describe(index)}")
    size = len(index)
    for key in image_keys:
        _check_images(part[key], f"{where}[{key!r}]", task, size)
    if with_target:
        _check_target(part["target"], f"{where}['target']", task, size, part[image_keys[0]] if image_keys else None)


def _check_images(images: Any, where: str, task: str, size: int) -> None:
    if task == "detection":
        if not isinstance(images, (list, tuple)) or len(images) != size or not all(
                isinstance(x, Tensor) and x.ndim == 3 and x.is_floating_point() for x in images):
            raise BatchContractError(f"{where} must be a list of {size} float (C, H, W) images, got "
                                     f"{_describe(images)}")
    elif not (isinstance(images, Tensor) and images.ndim == 4 and len(images) == size and images.is_floating_point()):
        raise BatchContractError(f"{where} must be a float tensor ({size}, C, H, W), got {_describe(images)}")


def _check_target(target: Any, where: str, task: str, size: int, images: Any) -> None:
    if task == "detection":
        if not isinstance(target, (list, tuple)) or len(target) != size:
            raise BatchContractError(f"{where} must be a list of {size} dicts, got {_describe(target)}")
        for k, item in enumerate(target):
            boxes, labels = (item.get(key) if isinstance(item, Mapping) else None for key in ("boxes", "labels"))
            if not (isinstance(boxes, Tensor) and boxes.ndim == 2 and boxes.shape[1] == 4 and isinstance(labels, Tensor)
                    and labels.shape == boxes.shape[:1]):
                raise BatchContractError(f"{where}[{k}] must hold 'boxes' (n, 4) and 'labels' (n,), got "
                                         f"{_describe(item)}")
        return
    if not isinstance(target, Tensor) or len(target) != size:
        raise BatchContractError(f"{where} must be a tensor of {size} targets, got {_describe(target)}")
    if task == "segmentation":
        if target.ndim != 3 or target.is_floating_point() or target.shape[1:] != images.shape[2:]:
            raise BatchContractError(f"{where} must be int64 class ids ({size}, H, W) matching the images "
                                     f"{tuple(images.shape)}, got {_describe(target)}")
    elif not (target.ndim == 1 and not target.is_floating_point()) and target.ndim != 2:
        raise BatchContractError(f"{where} must be int64 class ids ({size},) or multi-hot ({size}, K), got "
                                 f"{_describe(target)}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        inner = f" of {_describe(value[0])}" if value else ""
        return f"a {type(value).__name__} of {len(value)}{inner.replace(' of a ', ' like a ', 1)}"
    return type(value).__name__
