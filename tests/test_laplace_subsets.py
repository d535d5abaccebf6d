"""`la_subset`: the grammar, which parameters each subset names on an MLP and a CNN, the auto rules per
structure, the subset Jacobians against columns of the whole net's jacrev Jacobian, and full_la's refusal
of a matrix that will not fit."""

from __future__ import annotations

import pytest
import torch

from bench.config import preset_config
from bench.errors import BenchError
from bench.la import jacobians as jac
from bench.la.curvature import FullGGN
from bench.la.memory import check_full_memory
from bench.la.structures import STRUCTURES, resolve_subset
from bench.la.subsets import subset_names
from tests.laplace_helpers import TinyConvNet, full_jacobian, rel_err, tiny_data, tiny_images, tiny_net


@pytest.mark.parametrize("value", ["auto", "all", "head", "last_k:1", "last_k:12"])
def test_la_subset_accepted(value):
    assert preset_config("smoke").replace(la_subset=value).la_subset == value


@pytest.mark.parametrize(
    "value", ["heads", "last_k:0", "last_k:", "last_k:-1", "last_k:x", "All", "last_k:2 "]
)
def test_la_subset_refused_in_one_line(value):
    with pytest.raises(BenchError, match="la_subset must be one of auto | all | head | last_k:<k>") as e:
        preset_config("smoke").replace(la_subset=value)
    assert "\n" not in str(e.value)


def test_subset_names_on_a_cnn():
    model = TinyConvNet()
    everything = [n for n, _ in model.named_parameters()]
    assert subset_names(model, "all") == everything
    assert subset_names(model, "head") == ["head.weight", "head.bias"]
    assert subset_names(model, "last_layer") == ["head.weight", "head.bias"]
    assert subset_names(model, "last_k:1") == ["head.weight", "head.bias"]
    # Linear/Conv2d layers in module order: conv0, conv3 (no bias), head; BatchNorm is not counted
    assert subset_names(model, "last_k:2") == ["trunk.3.weight", "head.weight", "head.bias"]
    assert subset_names(model, "last_k:3") == [
        "trunk.0.weight",
        "trunk.0.bias",
        "trunk.3.weight",
        "head.weight",
        "head.bias",
    ]
    with pytest.raises(BenchError, match="only 3 Linear/Conv2d layers"):
        subset_names(model, "last_k:4")
    model.trunk[0].weight.requires_grad_(False)  # 'all' = the trainable parameters
    assert "trunk.0.weight" not in subset_names(model, "all")


def test_a_model_without_head_uses_its_last_linear():
    model = tiny_net()
    assert subset_names(model, "head") == subset_names(model, "last_layer") == ["net.4.weight", "net.4.bias"]


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_auto_rules(structure):
    cnn, mlp = TinyConvNet(), tiny_net()
    want = {
        "full": ("all", "head"),
        "last_layer": ("last_layer", "last_layer"),
        "diag": ("all", "all"),
        "kron": ("all", "all"),
    }[structure]
    assert (resolve_subset(structure, "auto", mlp), resolve_subset(structure, "auto", cnn)) == want
    explicit = resolve_subset(structure, "last_k:2", cnn)
    assert explicit == (
        "last_layer" if structure == "last_layer" else "last_k:2"
    )  # last_layer_la: the last Linear


@pytest.mark.parametrize("subset", ["all", "head", "last_k:2", "last_k:3", "last_layer"])
def test_subset_jacobian_is_columns_of_the_full_jacobian(subset):
    """The subset's Jacobian (torch.func over the subset, the rest fixed; or a closed form) equals the
    corresponding columns of jacrev of the whole net, BatchNorm in eval mode."""
    model, (x, _) = TinyConvNet(), tiny_images(5)
    everything = [n for n, _ in model.named_parameters()]
    full = full_jacobian(model, x, everything).reshape(5, 2, -1)
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    starts = dict(zip(everything, torch.tensor([0] + [sizes[n] for n in everything]).cumsum(0).tolist()))
    names = subset_names(model, subset)
    cols = torch.cat([torch.arange(starts[n], starts[n] + sizes[n]) for n in names])
    J = jac.subset_jacobian(model, x, subset, names)
    assert J.shape == (5, 2, len(cols)) and rel_err(J, full[:, :, cols]) < 1e-12
    assert rel_err(jac.embedding_jacobian(model, x, names), full[:, :, cols]) < 1e-12


def test_last_layer_closed_form_declines_when_the_embedding_is_not_its_output():
    """An L2-normalised embedding: f is not the last Linear's output, so [I (x) phi^T, I] would be wrong."""

    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_net()

        def forward(self, x):
            return torch.nn.functional.normalize(self.inner(x), dim=1)

    model, (x, _) = Normalised(), tiny_data(4)
    names = subset_names(model, "last_layer")
    assert jac.last_layer_jacobian(model, x) is None
    ref = full_jacobian(model, x, names).reshape(4, 2, -1)
    assert rel_err(jac.subset_jacobian(model, x, "last_layer", names), ref) < 1e-12
    assert jac.last_layer_jacobian(model.inner, x) is not None


def test_full_la_refuses_what_will_not_fit_naming_smaller_subsets(monkeypatch):
    """Before allocating: the message has the estimate and the subsets whose matrix would fit."""
    from bench.la import curvature

    model = TinyConvNet()
    D_all = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(curvature, "available_memory", lambda device: 2 * D_all**2 * 8 // 2)  # half of need
    with pytest.raises(BenchError) as e:
        FullGGN(model, torch.float64, "all")
    msg = str(e.value)
    assert f"{D_all}x{D_all}" in msg and "la_subset=all" in msg and "GiB" in msg and "\n" not in msg
    assert "la_subset=head (D=10)" in msg and "diag_la or kfac_la" in msg
    assert "last_k:1" not in msg  # the same D as head: named once
    FullGGN(model, torch.float64, "head")  # fits
    with pytest.raises(BenchError, match="last_layer_la, diag_la or kfac_la"):
        check_full_memory(200_000, torch.float32, torch.device("cpu"))


def test_a_mining_batch_whose_jacobians_cannot_fit_is_one_line(monkeypatch):
    from bench.la import curvature
    from bench.la.structures import compute_curvature

    model, (x, y) = TinyConvNet(), tiny_images(16)
    monkeypatch.setattr(curvature, "available_memory", lambda device: 1000)
    with pytest.raises(
        BenchError, match=r"one mining batch of 8 items needs .* use a smaller la_subset"
    ) as e:
        compute_curvature(model, x, y, structure="diag", mining_batch=8)
    assert "\n" not in str(e.value)
