"""Probabilistic face embeddings (PFE; Shi and Jain, ICCV 2019), post hoc on the shared base model.

The base model's embedding is kept, frozen, as the mean mu(x); a small head on the penultimate
features h(x) (the input of the net's last nn.Linear, captured with a forward pre-hook, so any
registered backbone works) predicts the variance sigma^2(x), per dimension ("diag", the paper) or
one shared value ("isotropic"). Only the head is trained, so the method is charged for the head
alone (its "train" stage: feature extraction + head training); retrieval equals the plain net's.

Mutual likelihood score of two Gaussian embeddings (paper, eq. 3): the log-likelihood that both
are noisy views of the same latent code z,

    MLS(x1, x2) = log  int N(z; mu1, diag s1) N(z; mu2, diag s2) dz  =  log N(mu1 - mu2; 0, diag(s1 + s2))
                = -1/2 sum_l [ (mu1_l - mu2_l)^2 / (s1_l + s2_l) + log(s1_l + s2_l) ] - D/2 log(2 pi)

(s = sigma^2). The head minimises L = -mean MLS over the genuine (same-class) pairs of each batch.

Training, after the paper's reference configuration: 3000 steps (3 epochs of 1000 batches, about
1.5 passes over CASIA-WebFace), learning rate cfg.lr (1e-3 there) divided by 10 after 2/3 of the
steps, batches of PFE_BATCH = 256 images from min(64, C) classes with equal images per class (its
64 classes x 4 images; every pair inside a class block is genuine). The harness caps the steps at
cfg.epochs passes over the training set (steps = min(pfe_steps, epochs * ceil(N / 256)): 2475 on
the paper preset, 2 on the smoke preset), so the head never sees more data than the base model.
Optimiser: Adam, as the shared loop (the reference uses SGD with momentum 0.9). The reference head
reads the backbone's last feature map (the input of its embedding layer, as here) through
fc - BN - ReLU - fc - BN - one scale and shift shared by all dimensions, width = embedding size.
Ours: Linear(F, F) - ReLU - Linear(F, k) on the F penultimate features (an embedding-size hidden
layer would be 2 units wide here), output log sigma^2 with sigma^2 = VAR_FLOOR + exp(.) as in the
reference. The reference starts at log sigma^2 = -7 for unit-norm 512-d faces, which has no
analogue for an unnormalised embedding; we start at the best constant
variance instead: the last layer's weights are zero and its bias is the log of the pooled
within-class variance of the training embeddings (per dimension for diag, averaged for isotropic),
the maximiser of the MLS over constant variances.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.environment import cpu_threads
from bench.errors import require
from bench.method import EmbeddingPrediction, FitContext, Method, Option
from bench.model import last_linear
from bench.recipes import Knob, Recipe
from bench.registry import register_method
from methods._gaussian import VAR_FLOOR, VARIANCE_KINDS, broadcast_var, variance_width

PFE_LR_DROP_AT = 2 / 3  # learning rate x 0.1 after this share of the steps (reference: step 2000 of 3000)
PFE_BATCH = 256  # images per batch (reference config)
PFE_CLASSES_PER_BATCH = 64  # classes per batch (reference config: 64 classes x 4 images)
FEATURE_CHUNK = 4096  # images per forward pass when extracting features
HEAD_OFFSET = 0x9FE0  # generator offset of the head's initialisation
BATCH_OFFSET = 0x9FE1  # generator offset of the class-balanced batches


def mutual_likelihood_score(
    mu1: torch.Tensor, var1: torch.Tensor, mu2: torch.Tensor, var2: torch.Tensor
) -> torch.Tensor:
    """MLS [...] of Gaussians N(mu1, diag var1) and N(mu2, diag var2) with means and variances [..., D]
    (module docstring; the log density of mu1 - mu2 under N(0, diag(var1 + var2)))."""
    s = var1 + var2
    return -0.5 * ((mu1 - mu2) ** 2 / s + torch.log(s)).sum(-1) - 0.5 * mu1.shape[-1] * math.log(2 * math.pi)


def embed_with_features(
    model: nn.Module, x: torch.Tensor, chunk: int = FEATURE_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding [N, d], penultimate features [N, F]) of `model` on x, in chunks of `chunk` images."""
    store: list[torch.Tensor] = []
    handle = last_linear(model, "pfe").register_forward_pre_hook(
        lambda mod, inp: store.append(inp[0].flatten(1))
    )
    try:
        emb = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    finally:
        handle.remove()
    return emb, torch.cat(store)


class VarianceHead(nn.Module):
    """Features [N, F] -> variance [N, d]: Linear(F, F) - ReLU - Linear(F, k), sigma^2 = VAR_FLOOR +
    exp(out)."""

    def __init__(self, in_dim: int, embed_dim: int, kind: str) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, variance_width(kind, embed_dim))
        )

    def init_constant(self, var: torch.Tensor) -> None:
        """Start at the constant variance `var` [k]: zero last-layer weights, bias log(var)."""
        last = self.net[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.log(var.clamp_min(VAR_FLOOR)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return broadcast_var(VAR_FLOOR + torch.exp(self.net(h)), self.embed_dim)


def class_balanced_batches(
    y: torch.Tensor, steps: int, batch: int, classes_per_batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices [steps, P, K]: per step P = min(classes_per_batch, C) random classes (of those with >= 2
    items) and K = max(2, batch // P) random items of each (with replacement within the class)."""
    order = torch.argsort(y, stable=True)
    _, counts = torch.unique(y[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    keep = counts >= 2
    require(bool(keep.any()), "pfe needs a training class with at least two items (genuine pairs)")
    starts, counts = starts[keep], counts[keep]
    n_cls = len(counts)
    p = min(classes_per_batch, n_cls)
    k = max(2, batch // p)
    cls = torch.stack([torch.randperm(n_cls, generator=generator)[:p] for _ in range(steps)])  # [steps, P]
    u = torch.rand((steps, p, k), generator=generator, dtype=torch.float64)
    pos = (u * counts[cls][..., None]).long().clamp_max(counts[cls][..., None] - 1)
    return order[starts[cls][..., None] + pos]


def within_class_variance(emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pooled within-class variance per dimension [d]: mean over items of (emb - its class mean)^2."""
    labels, inv = torch.unique(y, return_inverse=True)
    sums = torch.zeros(len(labels), emb.shape[1], dtype=emb.dtype).index_add_(0, inv, emb)
    means = sums / torch.bincount(inv, minlength=len(labels))[:, None].to(emb.dtype)
    return ((emb - means[inv]) ** 2).mean(0)


@register_method("pfe")
class ProbabilisticFaceEmbedding(Method):
    """PFE: frozen base embedding as the mean, a variance head on penultimate features trained with MLS."""

    reuses_base_model = True
    options = {
        "pfe_variance": Option(
            str,
            "diag",
            "diag (Shi and Jain 2019) | isotropic: one variance per image",
            choices=VARIANCE_KINDS,
        ),
        "pfe_steps": Option(
            int, 3000, "most head training steps (reference config: 3 epochs x 1000 batches)", minimum=1
        ),
    }

    recipes = {
        "paper": Recipe(
            settings={"pfe_variance": "diag", "pfe_steps": 3000},
            source="Shi & Jain 2019 (ICCV) + reference config; seasonSH/"
            "Probabilistic-Face-Embeddings, config/sphere64_casia.py: 3000 steps, lr x 0.1 at step 2000, "
            "batches of 64 classes x 4 images, diagonal variance from the embedding layer's input",
            note="the head is Linear-ReLU-Linear on the penultimate features (the reference's fc-BN-ReLU-"
            "fc-BN, its embedding-size width would be 2 units here) and Adam (reference: SGD + momentum); "
            "steps capped at the base model's epochs over the training set",
        )
    }
    tunable = {
        "pfe_variance": Knob(choices=("diag", "isotropic")),
        "pfe_steps": Knob(100, 3000, log=True, integer=True),
    }

    def fit(self, ctx: FitContext) -> None:
        cfg = self.cfg
        kind = self.option(cfg, "pfe_variance")
        steps = min(self.option(cfg, "pfe_steps"), cfg.epochs * math.ceil(len(ctx.data.train_id) / PFE_BATCH))
        self.model = ctx.base_model()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        with ctx.stage("train"), cpu_threads(cfg.train_threads, ctx.device):
            train = ctx.data.train_id
            with torch.no_grad():
                parts = [embed_with_features(self.model, xb.to(ctx.device)) for xb in train.chunks()]
                mu, feats = (torch.cat(t) for t in zip(*parts))
            y = train.y.to(mu.device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed_for(HEAD_OFFSET))
                self.head = VarianceHead(feats.shape[1], mu.shape[1], kind).to(ctx.device)
            within = within_class_variance(mu.cpu(), y.cpu())
            init = within if kind == "diag" else within.mean().reshape(1)
            self.head.init_constant(init.to(ctx.device))
            batches = class_balanced_batches(
                y.cpu(), steps, PFE_BATCH, PFE_CLASSES_PER_BATCH, ctx.generator(BATCH_OFFSET)
            ).to(ctx.device)
            losses = self._train_head(mu, feats, batches)
            self.head.eval()
        self.diagnostics = {
            "variance": kind,
            "steps": steps,
            "batch": list(batches.shape[1:]),
            "feature_dim": int(feats.shape[1]),
            "init_var": [float(v) for v in init],
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_min": min(losses),
        }

    def _train_head(self, mu: torch.Tensor, feats: torch.Tensor, batches: torch.Tensor) -> list[float]:
        """Adam on -mean MLS over the genuine pairs of each class block; returns the per-step losses."""
        opt = torch.optim.Adam(self.head.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[round(PFE_LR_DROP_AT * len(batches))], gamma=0.1
        )
        k = batches.shape[2]
        i, j = torch.triu_indices(k, k, offset=1, device=batches.device)
        losses = torch.empty(len(batches), device=batches.device)  # (read once at the end: no sync per step)
        self.head.train()
        for step, idx in enumerate(batches):  # idx [P, K]
            m, v = mu[idx], self.head(feats[idx.flatten()]).reshape(*idx.shape, -1)
            loss = -mutual_likelihood_score(m[:, i], v[:, i], m[:, j], v[:, j]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses[step] = loss.detach()
        return losses.tolist()

    def predict(self, x: torch.Tensor) -> EmbeddingPrediction:
        mean, feats = embed_with_features(self.model, x)
        return EmbeddingPrediction(mean=mean, var=self.head(feats))
