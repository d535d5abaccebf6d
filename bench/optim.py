"""The training loop's optimiser: torch's fused Adam, stepped without its per-call Python overhead.

A small net's training step is bound by per-operator dispatch (`python -m bench step-profile`). At the
paper net's batch 16, `torch.optim.Adam(fused=True).step()` took ~180 us of a ~850 us step, of which its
kernel `torch._fused_adam_` is ~20 us: the rest is the generic optimiser machinery run on every call
(re-gathering the state lists, grouping tensors by device and dtype, profiler hooks, a `_foreach_add_`
over one step counter per parameter). `LeanAdam` is that Adam; after its first step (torch's own, which
creates the state) it keeps the state lists and calls the same kernel directly, with one shared step
counter (every parameter of a group is stepped together, so the counters are equal anyway). The updates
are bit-identical to torch's (tested); anything the fast path does not cover (a closure, a parameter
without a gradient, a changed parameter list, an older torch without the CPU kernel) takes torch's path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class LeanAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) whose steps after the first call the fused kernel directly."""

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, fused=True)
        self._lean: list[tuple] | None = None  # per group: (params, exp_avgs, exp_avg_sqs, steps, step)
        self._kernel = getattr(torch, "_fused_adam_", None)

    def _prepare(self) -> list[tuple] | None:
        """The state lists of every group, the groups' step counters shared (None: not applicable)."""
        out = []
        for g in self.param_groups:
            if g["amsgrad"] or g["maximize"] or g.get("decoupled_weight_decay", False) or g["differentiable"]:
                return None
            params = list(g["params"])
            states = [self.state.get(p) for p in params]
            if not params or any(not s or "exp_avg" not in s for s in states):
                return None
            if len({(p.device, p.dtype) for p in params}) != 1:  # the kernel takes one device and dtype
                return None
            step = states[0]["step"]
            if any(float(s["step"]) != float(step) for s in states):
                return None
            for s in states:
                s["step"] = step
            out.append((params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], step))
        return out

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        lean = self._lean
        if closure is not None or self._kernel is None or lean is None or len(lean) != len(self.param_groups):
            self._unshare()
            loss = super().step(closure)
            self._lean = self._prepare() if self._kernel is not None else None
            return loss
        for g, (params, *_) in zip(self.param_groups, lean):
            if len(g["params"]) != len(params) or any(p.grad is None for p in params):
                self._unshare()
                return self.step()
        for g, (params, exp_avgs, exp_avg_sqs, step) in zip(self.param_groups, lean):
            step.add_(1)
            beta1, beta2 = g["betas"]
            self._kernel(
                params,
                [p.grad for p in params],
                exp_avgs,
                exp_avg_sqs,
                [],
                [step] * len(params),
                amsgrad=False,
                lr=g["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=g["weight_decay"],
                eps=g["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
        return None

    def _unshare(self) -> None:
        """Each parameter its own step counter again (torch's path steps only those with a gradient)."""
        if self._lean is not None:
            for params, *_ in self._lean:
                for p in params:
                    self.state[p]["step"] = self.state[p]["step"].clone()
            self._lean = None

    def state_dict(self) -> dict:
        """torch's state dict with a step counter per parameter (as torch's Adam keeps them)."""
        sd = super().state_dict()
        sd["state"] = {
            k: {n: (v.clone() if n == "step" else v) for n, v in st.items()} for k, st in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self._unshare()
        super().load_state_dict(state_dict)
        for st in self.state.values():  # (a state dict whose counters are one tensor stays unshared)
            if "step" in st:
                st["step"] = st["step"].clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none or self._lean is None:
            return super().zero_grad(set_to_none)
        for params, *_ in self._lean:
            for p in params:
                p.grad = None
