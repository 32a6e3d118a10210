"""Offline knowledge distillation: a student trained against a frozen teacher.

Response knowledge (Hinton et al., 2015), feature knowledge (FitNets, Romero et al., 2015;
attention transfer, Zagoruyko & Komodakis, 2017; VID, Ahn et al., 2019) and relation knowledge
(RKD, Park et al., 2019; similarity-preserving KD, Tung & Mori, 2019; category-structure KD, Chen
et al., 2020; PKT, Passalis & Tefas, 2018), each with its own weight:

    L = w_ce CE(s, y) + w_kd u(k) L_logit + w_hint ||r(f_s) - f_t||^2 + w_at sum ||a_s - a_t||^2 + w_vid L_VID
        + w_d L_RKD-D + w_a L_RKD-A + w_sp L_SP + w_cs (L_intra + L_inter) + w_pkt L_PKT
        + w_crd L_CRD + w_rev v(k) HCL(ABF(F_s), F_t)

The response term ``L_logit`` is chosen by name (``logit_loss``): Hinton's ``T^2 KL(p_t^T || p_s^T)``
(``kd``), decoupled KD (``dkd``, Zhao et al., 2022) or DIST (``dist``, Huang et al., 2022), see
:mod:`~lightning_modules.distillation.logit_losses`; ``u(k) = min((k + 1) / kd_warmup_steps, 1)`` at
optimizer step ``k`` warms it up (DKD's recipe), 1 by default.

Intermediate features come from forward hooks by module path (``groups.2``, ``fc:input``), never from an
edited ``forward``. With ``distill_unlabeled`` the unlabeled images join the distillation terms.

Self-distillation without a separate teacher (Tf-KD self, Yuan et al., 2020) is this module with
a checkpoint of the same architecture as the teacher; the authors' ResNet-18 recipe (alpha 0.95,
T 6, multiplier 50 on a class-averaged KL) is ``temperature=6, ce_weight=0.05, kd_weight=0.475``
(``configs/tfkd_self_cifar10.yaml``). Tf-KD's virtual teacher is the ``tfkd_reg`` criterion of any module.

Defaults follow RepDistiller's CIFAR recipe (ANCHORS.md): T 4, CE 0.1, KD 0.9; FitNets 100, AT 1000. The DKD, DIST,
PKT, VID, CRD (Tian et al., 2020; ``crd.py``) and ReviewKD (Chen et al., 2021; ``reviewkd.py``; ``v(k) = min(k /
reviewkd_warmup_steps, 1)``) recipes are ``configs/{dkd,dist,pkt,vid,crd,reviewkd}_cifar10.yaml``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lightning_modules.distillation import losses as kd_losses
from lightning_modules.distillation.adversarial import (adversarial_loss, build_discriminator,
                                                       discriminator_loss, discriminator_parameter_groups)
from lightning_modules.distillation.crd import CRDLoss
from lightning_modules.distillation.feature_hooks import FeatureHooks, probe_features, probe_pairs
from lightning_modules.distillation.feature_normalized_kd import head_inputs
from lightning_modules.distillation.logit_losses import LOGIT_LOSSES, NEEDS_HEAD_INPUTS, check_logit_loss
from lightning_modules.distillation.probabilistic_losses import VIDRegressor
from lightning_modules.distillation.reviewkd import ReviewFusion, hierarchical_context_loss
from lightning_modules.distillation.teacher_ensemble import TeacherEnsemble, load_teachers
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop
from lightning_modules.core.optimization import linear_rampup


class KDStudent(SemiSupervisedModule):
    """A student network distilled from a frozen teacher loaded from a local file.

    Args:
        teacher: path of the teacher: a checkpoint of any labelwise classifier, or a plain
            ``state_dict`` file (then ``teacher_network`` is required). See :func:`load_teacher`. A list of
            paths distils from all of them (:class:`TeacherEnsemble`); their modules are then addressed
            ``"<k>.<path>"`` in the feature pairs (``["groups.2", "1.groups.2"]``: teacher 1's last group).
        teacher_weighting: how several teachers' soft targets mix per sample: ``mean``, ``max_prob`` or
            ``entropy`` (:mod:`~lightning_modules.distillation.teacher_ensemble`).
        teacher_network, teacher_network_kwargs: the teacher's architecture for a plain state_dict
            (for a checkpoint, a given name must match the stored one).
        ce_weight, kd_weight, temperature: ``w_ce CE + w_kd L_logit`` at temperature ``T``.
        logit_loss: the response term by name: ``kd`` (Hinton), ``dkd`` (needs labels, so not with
            ``distill_unlabeled``), ``dist`` or ``fnkd`` (feature-normalized KD, Xu et al., 2020: per-sample
            temperatures from the norms of the heads' inputs at ``relation_layer``; one teacher).
        adversarial_weight: adversarial distillation (:mod:`~lightning_modules.distillation.adversarial`): a
            discriminator on the logits, trained by its own loss, and ``adversarial_weight`` times the student's
            term that fools it (0: off); ``discriminator_lr``, its own learning rate (None: ``lr``), ``discriminator_input``,
            what it reads: ``softmax`` (the class probabilities) or ``logits``.
        logit_loss_kwargs: its options, e.g. ``{"alpha": 1, "beta": 8}`` (DKD), ``{"beta": 1, "gamma": 1}`` (DIST).
        kd_warmup_steps: linear warm-up of the response term over this many optimizer steps (0: none).
        hint_layers, hint_weight: FitNets; pairs ``[student_path, teacher_path]`` of feature maps.
            A connector (conv + BN + ReLU, strided or transposed when sizes differ) maps each
            student map to its teacher's shape; it is built from a probe of ``image_size`` pixels.
        connector_relu: end the connector with a ReLU (FitNets/RepDistiller); turn it off when the
            teacher's hinted maps are pre-activation sums that go negative (a Wide ResNet's ``groups.k``).
        at_layers, at_weight: attention transfer over pairs ``[student_path, teacher_path]``.
        vid_layers, vid_weight: VID (Ahn et al., 2019) over pairs ``[student_path, teacher_path]``, each
            with its own :class:`VIDRegressor` (sized from the same probe as the connectors).
        vid_init_variance: the regressors' initial ``sigma^2``: ``None`` (default) sets each channel's to the mean
            square of the teacher's feature on the first training batch, so the term starts at the same scale
            whatever the teacher's; 5.0 is RepDistiller's fixed start (``distiller_zoo/VID.py:16``).
        relation_layer: ``[student_path, teacher_path]`` of the embeddings that the relation
            losses compare (default: the inputs of the ``fc`` heads, i.e. pooled features).
        rkd_distance_weight, rkd_angle_weight, sp_weight, cskd_weight, pkt_weight: relation-loss weights.
        crd_weight, crd_kwargs: CRD on ``relation_layer``, with :class:`CRDLoss`'s options (memories sized from the
            DataModule's ``num_indices``; ``num_samples`` without one).
        reviewkd_layers, reviewkd_weight, reviewkd_warmup_steps: ReviewKD over pairs ordered shallow to deep
            (ABF modules sized from the probe), its weight ramped linearly from 0 over the warm-up steps.
        distill_unlabeled: also distil on the DataModule's unlabeled (weak view) images.
        image_size: side of the training images, used to size the FitNets connectors and VID regressors.
        test_teacher: also log the teacher's accuracy on the test images (``test/teacher_acc``).
        **kwargs: the base's network, optimizer, EMA and criterion arguments (R-Drop's
            ``rdrop_weight`` is refused: this module trains through its own ``compute_losses``).
    """

    progress_bar_terms = ("kd_loss",)

    def __init__(
        self,
        teacher: str | list[str],
        teacher_network: str | None = None,
        teacher_network_kwargs: dict[str, Any] | None = None,
        teacher_weighting: str = "mean",
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        temperature: float = 4.0,
        logit_loss: str = "kd",
        logit_loss_kwargs: dict[str, Any] | None = None,
        kd_warmup_steps: int = 0,
        hint_layers: list[list[str]] | None = None,
        hint_weight: float = 100.0,
        connector_relu: bool = True,
        at_layers: list[list[str]] | None = None,
        at_weight: float = 1000.0,
        vid_layers: list[list[str]] | None = None,
        vid_weight: float = 1.0,
        vid_init_variance: float | None = None,
        relation_layer: list[str] | None = None,
        rkd_distance_weight: float = 0.0,
        rkd_angle_weight: float = 0.0,
        sp_weight: float = 0.0,
        cskd_weight: float = 0.0,
        pkt_weight: float = 0.0,
        crd_weight: float = 0.0,
        crd_kwargs: dict[str, Any] | None = None,
        reviewkd_layers: list[list[str]] | None = None,
        reviewkd_weight: float = 5.0,
        reviewkd_warmup_steps: int = 0,
        adversarial_weight: float = 0.0,
        discriminator_lr: float | None = None,
        discriminator_input: str = "softmax",
        distill_unlabeled: bool = False,
        image_size: int = 32,
        test_teacher: bool = True,
        **kwargs: Any,
    ) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # its own forward: no second labeled pass
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_logit_loss(logit_loss, logit_loss_kwargs or {}, distill_unlabeled)
        if kd_warmup_steps < 0:
            raise ValueError(f"kd_warmup_steps must be >= 0 (0 turns the warm-up off), got {kd_warmup_steps}")
        self.teacher = load_teachers(teacher, self.hparams.num_classes, self.hparams.in_channels, teacher_network,
                                     teacher_network_kwargs, temperature, teacher_weighting)
        if logit_loss in NEEDS_HEAD_INPUTS and isinstance(self.teacher, TeacherEnsemble):
            raise ValueError(f"logit_loss={logit_loss!r} normalizes each network's logits by its own feature norm: "
                             "use it with one teacher, or logit_loss='kd' with several")
        self.discriminator = build_discriminator(self.hparams.num_classes, adversarial_weight, discriminator_lr,
                                                 discriminator_input)
        self.unlabeled_views = ("weak",) if distill_unlabeled else ()
        self.hint_pairs = [tuple(p) for p in hint_layers or []]
        self.at_pairs = [tuple(p) for p in at_layers or []]
        self.vid_pairs = [tuple(p) for p in vid_layers or []]
        self.relation_pair = tuple(relation_layer or ("fc:input", "fc:input"))
        self.relation_weights = {"rkd_distance": rkd_distance_weight, "rkd_angle": rkd_angle_weight,
                                 "sp": sp_weight, "cskd": cskd_weight, "pkt": pkt_weight, "crd": crd_weight}
        self.review_pairs = [tuple(p) for p in reviewkd_layers or []]
        for pair in self.hint_pairs + self.at_pairs + self.vid_pairs + self.review_pairs + [self.relation_pair]:
            if len(pair) != 2:
                raise ValueError(f"layer pairs are [student_path, teacher_path], got {list(pair)}")
        if logit_loss in NEEDS_HEAD_INPUTS and not all(p.endswith(":input") for p in self.relation_pair):
            raise ValueError(f"logit_loss={logit_loss!r} reads the inputs of the linear heads: relation_layer must be "
                             f"['<head>:input', '<head>:input'] (default ['fc:input', 'fc:input']), got {list(self.relation_pair)}")
        self.connectors = self._build_heads(self.hint_pairs, image_size,
                                            lambda s, t: kd_losses.build_connector(s, t, relu=connector_relu))
        self.vid_heads = self._build_heads(self.vid_pairs, image_size, lambda s, t: VIDRegressor(
            s.shape[1], t.shape[1], init_variance=vid_init_variance))
        self.crd = self.review = None
        if crd_weight:
            s, t = self._probe_pairs([self.relation_pair], image_size)
            self.crd = CRDLoss(s[0][0].numel(), t[0][0].numel(), **(crd_kwargs or {}))
            # equal on every rank by construction: DDP need not broadcast N x feat_dim rows per forward
            self._ddp_params_and_buffers_to_ignore = ["crd.memory_student", "crd.memory_teacher"]
        if self.review_pairs:
            s, t = self._probe_pairs(self.review_pairs, image_size)
            self.review = ReviewFusion([f[0].shape for f in s], [f[0].shape for f in t])

    # --- set-up ----------------------------------------------------------------------------
    def _paths(self) -> tuple[list[str], list[str]]:
        pairs = self.hint_pairs + self.at_pairs + self.vid_pairs + self.review_pairs
        if any(self.relation_weights.values()) or self.hparams.logit_loss in NEEDS_HEAD_INPUTS:
            pairs = pairs + [self.relation_pair]
        return list(dict.fromkeys(s for s, _ in pairs)), list(dict.fromkeys(t for _, t in pairs))

    def _build_heads(self, pairs: list[tuple[str, str]], image_size: int,
                     make: Callable[[torch.Tensor, torch.Tensor], nn.Module]) -> nn.ModuleList:
        """One trained module per pair (FitNets connectors, VID regressors), sized from a probe of the features."""
        if not pairs:
            return nn.ModuleList()
        return nn.ModuleList(make(s, t) for s, t in zip(*self._probe_pairs(pairs, image_size)))

    def _probe_pairs(self, pairs: list[tuple[str, str]], image_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return probe_pairs(self.net, self.teacher, pairs, self.hparams.in_channels, image_size)

    def train(self, mode: bool = True) -> "KDStudent":
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm and dropout stay in inference mode
        return self

    def trainable_modules(self) -> list[nn.Module]:
        extra = [m for m in (self.crd, self.review, self.discriminator) if m is not None]  # CRD's embedding heads, ReviewKD's ABFs, the discriminator
        return super().trainable_modules() + [self.connectors, self.vid_heads] + extra

    def parameter_groups(self) -> list[dict[str, Any]]:
        return discriminator_parameter_groups(self.trainable_modules(), self.discriminator, self.hparams.discriminator_lr)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        size = self.data_facts.num_indices if self.data_facts is not None else None
        if self.crd is not None and size is not None and self.crd.num_samples != size:  # a resumed run keeps its memories
            self.crd.reset_memory(size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if any(not head.variance_initialized for head in self.vid_heads):  # once per run: a buffer, kept on resume
            teacher = probe_features(self.teacher, [t for _, t in self.vid_pairs], batch["labeled"]["image"])
            for head, (_, t) in zip(self.vid_heads, self.vid_pairs):
                head.initialize_variance_(teacher[t])

    # --- training --------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        images, targets = [labeled["image"]], [labeled["target"]]
        if self.unlabeled_views and unlabeled is not None:
            images.append(unlabeled["weak"])
            targets.append(torch.full_like(unlabeled["target"], -1))  # unlabeled: no class for CSKD
        student_paths, teacher_paths = self._paths()
        with FeatureHooks(self.net, student_paths) as hooks:
            student_logits = torch.cat(self.forward_views(images))
            student = hooks.pop()
        with torch.no_grad(), FeatureHooks(self.teacher, teacher_paths) as hooks:
            teacher_logits = self.teacher(torch.cat(images))
            teacher = hooks.pop()
        num_labeled = len(labeled["image"])
        kd_options = dict(self.hparams.logit_loss_kwargs or {})
        if self.hparams.logit_loss in NEEDS_HEAD_INPUTS:
            kd_options.update(head_inputs(self.net, self.teacher, self.relation_pair, student, teacher))
        losses = {
            "labeled_loss": self.labeled_loss(student_logits[:num_labeled], labeled["target"]),
            "kd_loss": LOGIT_LOSSES[self.hparams.logit_loss](student_logits, teacher_logits, torch.cat(targets),
                                                             self.hparams.temperature, **kd_options),
        }
        if self.discriminator is not None:
            losses["adversarial_loss"] = adversarial_loss(self.discriminator, student_logits)
            losses["discriminator_loss"] = discriminator_loss(self.discriminator, student_logits, teacher_logits)
        if self.hint_pairs:
            losses["hint_loss"] = sum(kd_losses.hint_loss(connector(student[s]), teacher[t])
                                      for connector, (s, t) in zip(self.connectors, self.hint_pairs))
        if self.at_pairs:
            losses["at_loss"] = kd_losses.attention_transfer_loss(
                [student[s] for s, _ in self.at_pairs], [teacher[t] for _, t in self.at_pairs])
        if self.vid_pairs:
            losses["vid_loss"] = sum(head(student[s], teacher[t]) for head, (s, t) in zip(self.vid_heads, self.vid_pairs))
        if self.review_pairs:
            losses["reviewkd_loss"] = hierarchical_context_loss(
                self.review([student[s] for s, _ in self.review_pairs]), [teacher[t] for _, t in self.review_pairs])
        losses.update(kd_losses.relation_losses(self.relation_weights, student.get(self.relation_pair[0]),
                                                teacher.get(self.relation_pair[1]), torch.cat(targets)))
        if self.crd is not None:
            index = torch.cat([labeled["index"]] + ([unlabeled["index"]] if len(images) > 1 else []))
            losses["crd_loss"], observation = self.crd(student[self.relation_pair[0]], teacher[self.relation_pair[1]],
                                                       index, self.global_step, mean=lambda z: self._gather(z[None]).mean(0))
            self.step_state.propose(self.update_crd_memory, *observation)
        return losses

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` of every rank, concatenated (as is in one process); every rank passes the same shape."""
        world = self._trainer.world_size if self._trainer is not None else 1
        return rows if world == 1 else self.all_gather(rows).flatten(0, 1)

    @torch.no_grad()
    def update_crd_memory(self, *observation: torch.Tensor) -> None:
        """CRD's memory update from every rank's rows (the commit), so every rank holds the same memories."""
        self.crd.update_(*(self._gather(t) for t in observation))

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        warmup = linear_rampup(self.global_step + 1, hp.kd_warmup_steps)  # mdistiller's epoch 1 is already 1/20
        loss = hp.ce_weight * losses["labeled_loss"] + hp.kd_weight * warmup * losses["kd_loss"]
        if "reviewkd_loss" in losses:  # ReviewKD's min(1, epoch / 20): 0 at the first step
            loss = loss + hp.reviewkd_weight * linear_rampup(self.global_step, hp.reviewkd_warmup_steps) * losses["reviewkd_loss"]
        if "adversarial_loss" in losses:  # the discriminator's own loss reaches only its parameters: weight 1
            loss = loss + hp.adversarial_weight * losses["adversarial_loss"] + losses["discriminator_loss"]
        weights = {"hint": hp.hint_weight, "at": hp.at_weight, "vid": hp.vid_weight, **self.relation_weights}
        for term, weight in weights.items():  # the feature and relation terms present
            if f"{term}_loss" in losses:
                loss = loss + weight * losses[f"{term}_loss"]
        return loss

    # --- evaluation ------------------------------------------------------------------------
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if self.hparams.test_teacher and not self.multilabel:  # the teacher on the same images, for the record
            correct = (self.teacher(batch["image"]).argmax(dim=1) == batch["target"]).float().mean()
            self.log("test/teacher_acc", correct, batch_size=len(batch["target"]))
