"""The shared pieces of the similarity methods: the projection head, the feature queue (wrap-around), the
labeled bank (slots, momentum, repeated samples, resizing on load) and the alignment queue."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules import CoMatch, SimMatch
from lightning_modules.ssl.memory_bank import FeatureQueue, LabeledBank, MarginalQueue
from lightning_modules.ssl.projection import ProjectionHead, logits_and_embeddings
from tests.ssl_helpers import SMALL_NET


def test_feature_queue_wraps_around_like_a_ring():
    """Rows land at (number of rows pushed before them) mod size, whatever the chunk sizes; a chunk longer
    than the queue leaves only its last ``size`` rows."""
    size, g = 7, torch.Generator().manual_seed(0)
    queue, expected_f, expected_p, pushed = FeatureQueue(size, 3, 2), torch.zeros(size, 3), torch.zeros(size, 2), 0
    for n in (3, 3, 5, 1, 9, 2):
        features, probs = torch.randn(n, 3, generator=g), torch.rand(n, 2, generator=g)
        queue.update_(features, probs)
        for row in range(n):  # a plain loop: each row written where the ring's pointer is
            expected_f[(pushed + row) % size], expected_p[(pushed + row) % size] = features[row], probs[row]
        pushed += n
        assert torch.equal(queue.features, expected_f) and torch.equal(queue.probs, expected_p)
        assert int(queue.ptr) == pushed % size and int(queue.count) == pushed
    assert bool(queue.is_full())


def test_feature_queue_state_resumes_through_state_dict():
    queue = FeatureQueue(5, 2, 3)
    queue.update_(torch.randn(4, 2), torch.rand(4, 3))
    fresh = FeatureQueue(5, 2, 3)
    fresh.load_state_dict(queue.state_dict())
    for name, value in queue.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_labeled_bank_slots_momentum_and_repeated_samples():
    bank = LabeledBank(4, momentum=0.7)
    bank.resize_(torch.tensor([40, 3, 17]))  # any order: kept sorted
    assert torch.equal(bank.labeled_indices, torch.tensor([3, 17, 40]))
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(3)) and torch.equal(bank.labels, torch.zeros(3, dtype=torch.long))
    slots = bank.slots_of(torch.tensor([17, 40, 17]))
    assert torch.equal(slots, torch.tensor([1, 2, 1]))
    before, z = bank.features.clone(), F.normalize(torch.randn(3, 4), dim=1)
    bank.update_(slots, z, torch.tensor([5, 6, 7]))
    # row 1 seen twice: the later sample wins; each moved row is normalize(0.7 old + 0.3 new)
    expected = before.clone()
    expected[1] = (0.7 * before[1] + 0.3 * z[2]) / (0.7 * before[1] + 0.3 * z[2]).norm()
    expected[2] = (0.7 * before[2] + 0.3 * z[1]) / (0.7 * before[2] + 0.3 * z[1]).norm()
    torch.testing.assert_close(bank.features, expected)
    assert bank.labels.tolist() == [0, 7, 6]


def test_labeled_bank_loads_a_checkpoint_of_another_size():
    """A resumed run's bank comes from the checkpoint before ``on_fit_start`` knows the split."""
    saved = LabeledBank(4)
    saved.resize_(torch.arange(0, 20, 2))
    saved.update_(torch.tensor([3]), F.normalize(torch.randn(1, 4), dim=1), torch.tensor([2]))
    empty = LabeledBank(4)
    empty.load_state_dict(saved.state_dict())
    for name, value in saved.state_dict().items():
        assert torch.equal(empty.state_dict()[name], value), name


def test_marginal_queue_is_usbs_zero_padded_mean():
    """USB ``hooks/dist_align.py`` lines 90-105: ``p_model`` is the mean over all ``da_len`` rows, unfilled
    (zero) rows included; the batch mean is in the queue before alignment."""
    queue, means = MarginalQueue(3, 2), torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    written = torch.zeros(3, 2)
    for k, mean in enumerate(means):
        written[k % 3] = mean
        torch.testing.assert_close(queue.marginal(mean), written.sum(dim=0) / 3)
        queue.update_(mean[None])
    assert int(queue.ptr) == 1


def test_projection_head_is_the_mean_of_its_mlps_normalized():
    torch.manual_seed(0)
    head, h = ProjectionHead(6, 4, num_heads=3), torch.randn(5, 6)
    mean = sum(m[2](torch.relu(m[0](h))) for m in head.heads) / 3
    torch.testing.assert_close(head(h), mean / mean.norm(dim=1, keepdim=True))
    model = SimMatch(**SMALL_NET)
    images = [torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)]
    model.eval()  # BatchNorm in eval mode: one forward over both batches equals one forward each
    together, separate = (logits_and_embeddings(model.net, model.projection, images, concat) for concat in (True, False))
    for a, b in zip(together[0] + together[1], separate[0] + separate[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: ProjectionHead(8, 4, num_heads=0), "num_heads must be at least 1"),
    (lambda: FeatureQueue(0, 4, 2), "queue size must be positive"),
    (lambda: LabeledBank(4, momentum=1.0), "bank momentum must lie in"),
    (lambda: MarginalQueue(0, 3), "queue length must be positive"),
    (lambda: SimMatch(temperature=0.0, **SMALL_NET), "temperature must be positive"),
    (lambda: CoMatch(contrast_threshold=1.5, **SMALL_NET), "contrast_threshold must lie in"),
    (lambda: CoMatch(rdrop_weight=1.0, **SMALL_NET), "R-Drop"),
    (lambda: SimMatch(dist_align_length=-1, **SMALL_NET), "dist_align_length"),
])
def test_bad_arguments_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_network_without_penultimate_features_is_refused():
    from lightning_modules.classification.networks import available_networks, register_network

    if "plain_linear_test" not in available_networks():
        register_network("plain_linear_test")(lambda num_classes, in_channels=1, **kw: nn.Sequential(
            nn.Flatten(), nn.Linear(64 * in_channels, num_classes)))
    with pytest.raises(ValueError, match="needs a network with forward_features"):
        CoMatch(num_classes=10, in_channels=1, network="plain_linear_test")


def test_simmatch_without_labeled_facts_names_the_argument():
    model = SimMatch(**SMALL_NET)
    model.data_facts = None
    with pytest.raises(ValueError, match="pass num_labeled"):
        model.on_fit_start()
