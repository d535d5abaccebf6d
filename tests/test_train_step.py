"""The fast training step against its references: the shared loop (`train_net`: vectorised miner +
loss, fused Adam) equals pytorch-metric-learning's miner + loss with the single-tensor Adam step by step,
and the fused Adam equals the single-tensor one; plus the step-profile tool's command line."""

from __future__ import annotations

import pytest
import torch

from bench.config import preset_config
from bench.data import Split
from bench.loss import contrastive_loss, make_loss_and_miner
from bench.model import build_model
from bench.train import make_optimizer, train_net


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lean_adam_is_torchs_fused_adam_bit_for_bit(weight_decay):
    """`make_optimizer` (LeanAdam: torch's fused kernel called directly after the first step) against
    torch.optim.Adam(fused=True) itself: the same parameters and state after every step (torch.equal),
    through a changed learning rate, a step where one parameter has no gradient (torch's own path), a
    state_dict round trip and a zero_grad."""
    cfg = preset_config("paper").replace(weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 784), (16,), (5, 2, 16), (5, 2)]
    ours = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = make_optimizer(ours, cfg)
    opt_ref = torch.optim.Adam(ref, lr=cfg.lr, weight_decay=weight_decay, fused=True)
    for i in range(12):
        if i == 4:
            for o in (opt, opt_ref):
                o.param_groups[0]["lr"] = cfg.lr / 3
        if i == 8:
            opt.load_state_dict(opt.state_dict())
        for j, (p, q) in enumerate(zip(ours, ref)):
            gr = None if (i == 10 and j == 1) else torch.randn(p.shape, generator=g)
            p.grad, q.grad = gr, (None if gr is None else gr.clone())
        opt.step()
        opt_ref.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), f"step {i}"
        for p, q in zip(ours, ref):
            assert torch.equal(opt.state[p]["exp_avg_sq"], opt_ref.state[q]["exp_avg_sq"])
        opt.zero_grad()
        assert all(p.grad is None for p in ours)
        if i in (3, 5, 9):
            assert opt._lean is not None  # the fast path is taken (also after a changed lr, a reload)
    # after the step without a gradient the counters differ: torch's path from then on, still equal
    assert opt._lean is None


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_adam_equals_single_tensor_adam(weight_decay):
    """make_optimizer's Adam against torch's for-loop Adam (foreach=False) on the same gradients, for
    tensors shaped like a net's and like an ensemble's stacked [M, ...] parameters."""
    cfg = preset_config("paper").replace(weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 784), (16,), (5, 2, 16), (5, 2)]
    ours = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]
    opt, opt_ref = (
        make_optimizer(ours, cfg),
        torch.optim.Adam(ref, lr=cfg.lr, weight_decay=weight_decay, foreach=False),
    )
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q, p0 in zip(ours, ref, start):
        assert not torch.equal(p, p0)
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


def test_train_net_equals_pml_loss_with_reference_adam():
    """An epoch of the shared loop, step by step the same as PML's TripletMarginMiner + ContrastiveLoss
    with torch's single-tensor Adam on the same batches (train_net's seeded order), in float64 so that
    only rounding separates them; the loss history is the mean of PML's batch losses."""
    cfg = preset_config("paper").replace(hidden=(8, 8), epochs=1, batch_size=16, quiet=True)
    g = torch.Generator().manual_seed(1)
    n = 16 * 12 + 5  # a short last batch too
    x, y = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)
    ours = build_model(cfg, (1, 6, 6), seed=3).double()
    ref = build_model(cfg, (1, 6, 6), seed=3).double()
    info = train_net(ours, contrastive_loss(cfg), cfg, Split(x, y), torch.device("cpu"), seed=5)

    loss_fn, miner = make_loss_and_miner(cfg)
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr, foreach=False)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    losses = []
    for idx in perm.split(cfg.batch_size):
        emb = ref(x[idx])
        loss = loss_fn(emb, y[idx], miner(emb, y[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # (train_net sums the epoch's losses in float32)
    assert info["loss_history"] == pytest.approx([sum(losses) / len(losses)], rel=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-11)
    init = build_model(cfg, (1, 6, 6), seed=3).double()
    assert all(not torch.equal(p, q) for p, q in zip(ours.parameters(), init.parameters()))  # it trained


def test_step_profile_cli_prints_every_phase(cli):
    code, out, err = cli("step-profile", "--steps", "4", "--rounds", "1", "--no-profiler")
    assert code == 0, err
    from bench.tools.step_profile import PHASES

    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for phase in (*PHASES, "sum", "loop"):
        assert (
            phase in rows
            and float(rows[phase][1]) > 0
            and float(rows[phase][-1 if phase in ("sum", "loop") else 3]) > 0
        )
    assert "pml / fast loop" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "command",
    [
        ["step-profile"],
        ["hessian-bench", "--data", "random", "--n", "32"],
        ["run", "--preset", "smoke", "--dataset", "synthetic"],
    ],
)
def test_cuda_without_cuda_is_one_line(cli, command):
    code, out, err = cli(*command, "--device", "cuda")
    assert code == 2 and err.strip().count("\n") == 0 and "CUDA is not available" in err, err


def test_in_memory_splits_are_moved_to_the_device_once():
    """The loop's batches are index slices of tensors on the device for in-memory splits (checked with
    the meta device, which needs no GPU); augmenting or on-disk splits keep making batches on the host."""
    from bench.train import resident

    split = Split(torch.zeros(4, 3), torch.arange(4))
    moved = resident(split, torch.device("meta"))
    assert moved.x.device.type == "meta" and moved.y.device.type == "meta" and len(moved) == 4
    assert resident(split, torch.device("cpu")) is split

    class Augmenting(Split):
        augments = True

    aug = Augmenting(split.x, split.y)
    assert resident(aug, torch.device("meta")) is aug
