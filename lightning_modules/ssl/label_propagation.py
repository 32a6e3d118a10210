"""Label propagation on deep features (Iscen, Tolias, Avrithis and Chum, CVPR 2019, "Label Propagation
for Deep Semi-supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.core.training_images import training_image_batches, without_random_draws
from lightning_modules.ssl.losses import masked_accuracy
from lightning_modules.ssl.propagation import propagate_labels
from lightning_modules.ssl.threshold_state import gather_rows


class LabelPropagation(SemiSupervisedModule):
    """Pseudo-labels propagated over a kNN graph of the network's own features, renewed every epoch.

    At the start of each epoch from ``warmup_epochs`` on (before it, training is supervised: the paper's
    first stage), every labeled and unlabeled training image is embedded once, unaugmented, by the network
    in eval mode (the input of its classifier, L2-normalized), and
    :func:`~lightning_modules.ssl.propagation.propagate_labels` builds the kNN graph (k neighbours, affinity
    ``s^gamma``, symmetric, ``W_n = D^-1/2 W D^-1/2``), solves ``(I - alpha W_n) Z = Y`` by conjugate gradient
    and gives each image ``yhat_i = argmax_c Z_ic``, the certainty ``omega_i = 1 - H(Z_i) / log C`` (over its
    maximum) and each class ``zeta_c = (N / C) / |{i: yhat_i = c}|``.

    Loss: ``L = L_s + lambda_u * 1/(mu B) sum_b omega_b zeta_{yhat_b} CE(yhat_b, p(y | weak(u_b)))``, the
    labeled term the plain cross-entropy of the base. The authors' code (ahmetius/LP-DeepSSL
    ``helpers.py`` lines 206-209) also weights the labeled samples by ``zeta``; with a class-balanced
    labeled set that weight is close to 1, and the labeled loss here stays the task's own criterion.

    Against the authors' code (``lp/db_semisuper.py`` ``update_plabels`` lines 261-339, ``train_stage2.py``
    lines 100-111: propagate, then one epoch of training): the same graph, solver (20 CG iterations, tolerance
    1e-6), weights and class weights, pinned on real digits features by
    ``tests/lightning_modules/ssl/test_label_propagation.py::test_propagation_matches_reference_scipy``.
    Differences: the images are embedded without augmentation (the authors pass the training transform),
    negative similarities count as 0 (their ReLU features have none), and the schedule is one run (their
    second stage restarts the learning rate).

    Paper recipe (CIFAR-10, 4000 labels, 13-layer CNN): 180 supervised epochs, then 180 with propagation;
    k = 50, gamma = 3, alpha = 0.99; batch 100 of which 50 labeled (mu = 1), SGD 0.05 Nesterov, weight
    decay 2e-4. The defaults here: k, gamma, alpha as the paper, ``warmup_epochs`` half of the default
    1024-epoch run, lambda_u = 1 (the authors sum both terms over the batch: equal weight).

    State: the buffers ``pseudo_labels`` (int64, one per ``index``, -1 where none), ``pseudo_weights``
    (omega), ``class_weights`` (zeta) and ``propagated_epoch``, written only by :meth:`update_pseudo_labels`,
    once per epoch from the features of every rank (each rank embeds a shard; the shards are gathered, so
    every rank computes the same labels). The loss only reads them, so FGM's and PGD's extra passes change
    nothing. A run resumed inside an epoch keeps the checkpoint's labels (Lightning 2.6 does not rerun the
    epoch-start hook there; ``propagated_epoch`` would skip it if it did): tests/test_exact_resume.py.

    Args:
        num_neighbors: k of the kNN graph.
        gamma: exponent of the similarities.
        alpha: propagation weight in ``(I - alpha W) Z = Y``.
        cg_iterations, cg_tolerance: conjugate gradient's iteration cap and relative residual.
        warmup_epochs: supervised epochs before the first propagation.
        feature_layer: module path (in ``net``) whose input is the feature; None: the last ``nn.Linear``.
        num_indices: size of the index space when the DataModule publishes no facts.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak",)
    progress_bar_terms = ("mask_ratio", "pseudo_label_acc")

    def __init__(self, num_neighbors: int = 50, gamma: float = 3.0, alpha: float = 0.99, cg_iterations: int = 20,
                 cg_tolerance: float = 1e-6, warmup_epochs: int = 512, feature_layer: str | None = None,
                 num_indices: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1) for (I - alpha W) to be invertible, got {alpha}")
        if num_neighbors < 1 or cg_iterations < 1 or warmup_epochs < 0:
            raise ValueError("num_neighbors and cg_iterations must be at least 1 and warmup_epochs at least 0, got "
                             f"{num_neighbors}, {cg_iterations}, {warmup_epochs}")
        self._feature_module(feature_layer)  # refused now, not at the first propagation
        size = num_indices or 0
        self.register_buffer("pseudo_labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pseudo_weights", torch.zeros(size))
        self.register_buffer("class_weights", torch.ones(self.hparams.num_classes))
        self.register_buffer("propagated_epoch", torch.tensor(-1))

    def _feature_module(self, path: str | None) -> nn.Module:
        """The module whose input is the feature (not kept as an attribute: it would be a second submodule)."""
        if path is not None:
            try:
                return self.net.get_submodule(path)
            except AttributeError as error:
                names = [name for name, _ in self.net.named_modules() if name][-5:]
                raise ValueError(f"feature_layer {path!r} is not a module of {self.hparams.network} ({error}); "
                                 f"its last modules are {names}") from None
        linear = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ValueError(f"{self.hparams.network} has no nn.Linear classifier: name the module whose input is "
                             "the feature with feature_layer")
        return linear[-1]

    # --- state -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        facts = self.data_facts
        if facts is None or facts.num_indices is None:
            if self.pseudo_labels.numel() == 0:
                raise ValueError("LabelPropagation needs the size of the index space: use a DataModule that "
                                 "publishes data_facts() (every labelwise DataModule does) or pass num_indices")
        elif self.pseudo_labels.numel() != facts.num_indices:  # a resumed run keeps its labels
            self.pseudo_labels = torch.full((facts.num_indices,), -1, dtype=torch.long, device=self.device)
            self.pseudo_weights = torch.zeros(facts.num_indices, device=self.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("pseudo_labels", "pseudo_weights"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        epoch = self.current_epoch
        if epoch >= self.hparams.warmup_epochs and int(self.propagated_epoch) != epoch:
            stats = self.update_pseudo_labels(*self.embed_training_images(), epoch=epoch)
            self.log_dict({f"train/{k}": v for k, v in stats.items()}, on_step=False, on_epoch=True, batch_size=1)

    @torch.no_grad()
    def embed_training_images(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, features, label, target)`` of every training image from every rank; ``label`` -1 if unlabeled."""
        captured: list[torch.Tensor] = []
        feature_module = self._feature_module(self.hparams.feature_layer)
        hook = feature_module.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
        was_training = self.net.training
        rows: dict[str, list[torch.Tensor]] = {"index": [], "label": [], "target": []}
        self.net.eval()
        try:
            with without_random_draws(self):
                for part, batch in training_image_batches(self):
                    self.net(batch["image"])
                    rows["index"].append(batch["index"])
                    rows["target"].append(batch["target"])
                    rows["label"].append(batch["target"] if part == "labeled" else torch.full_like(batch["target"], -1))
        finally:
            hook.remove()
            self.net.train(was_training)
        features = torch.cat([f.flatten(1).float() for f in captured])
        index, label, target = (torch.cat(rows[k]).to(self.device) for k in ("index", "label", "target"))
        return tuple(gather_rows(self, t) for t in (index, features, label, target))

    @torch.no_grad()
    def update_pseudo_labels(self, index: torch.Tensor, features: torch.Tensor, label: torch.Tensor,
                             target: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Propagate from the images' features and known labels and store the result (the only writer).

        Returns the accuracy of the propagated labels on the unlabeled images whose target is known, and
        their mean omega (diagnostics; the targets are in no loss)."""
        n = self.pseudo_labels.numel()
        rows = torch.zeros(n, features.shape[1], device=features.device)
        rows[index] = features
        known = torch.full((n,), -1, dtype=torch.long, device=features.device)
        known[index[label >= 0]] = label[label >= 0]  # a labeled image also drawn as unlabeled stays labeled
        truth = torch.full((n,), -1, dtype=torch.long, device=features.device)
        truth[index] = target
        present = torch.zeros(n, dtype=torch.bool, device=features.device)
        present[index] = True
        hp = self.hparams
        result = propagate_labels(rows[present], known[present], hp.num_classes, hp.num_neighbors, hp.gamma, hp.alpha,
                                  hp.cg_iterations, hp.cg_tolerance)
        self.pseudo_labels[present] = result.pseudo_labels.to(self.pseudo_labels.device)
        self.pseudo_weights[present] = result.weights.to(self.pseudo_weights)
        self.class_weights.copy_(result.class_weights)
        self.propagated_epoch.fill_(epoch)
        unlabeled = present & (known < 0)
        labels = self.pseudo_labels[unlabeled]
        return {"propagation_acc": masked_accuracy(labels, truth[unlabeled].to(labels.device), torch.ones_like(labels)),
                "propagation_weight": self.pseudo_weights[unlabeled].mean()}

    # --- loss ------------------------------------------------------------------------------
    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = self.pseudo_labels[batch["index"]]
        has_label = (labels >= 0).float()
        labels = labels.clamp_min(0)
        weight = self.pseudo_weights[batch["index"]] * self.class_weights[labels] * has_label
        loss = F.cross_entropy(logits["weak"].float(), labels, reduction="none")
        return {
            "unlabeled_loss": (weight * loss).mean(),
            "mask_ratio": has_label.mean(),
            "pseudo_label_acc": masked_accuracy(labels, batch["target"], has_label),
            "mean_weight": weight.mean(),
        }
