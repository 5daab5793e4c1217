"""The student: a mixture of Gaussian experts over (flattened) action chunks.

    q(a|s) = sum_z w_z(s) N(a; mu_z(s), L_z(s) L_z(s)^T)

All inputs and outputs are in normalised units: ``obs [B, history*obs_step_dim]``,
``actions [B, act_dim]``. The experts share one backbone and differ only in their last
linear layers (mean head and Cholesky head). Forward paths loop only over nothing or a fixed
number of experts, so the module exports to ONNX with a dynamic batch dimension.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual torch alias

from vdd_ros.learn.backbones import build_backbone, build_mlp
from vdd_ros.learn.configs import COVARIANCES, GATINGS, BackboneConfig

LOG_2PI = math.log(2.0 * math.pi)


def initial_mean_offsets(n_experts: int, act_dim: int, spread: float, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """Initial expert means ``[Z, A]`` spread over ``[-spread, spread]^A``.

    In 2-D a square grid whose points farthest from the centre are kept (8 experts: the 3x3 grid
    without its centre); otherwise uniform samples.
    """
    if act_dim == 2 and n_experts > 1:
        side = math.ceil(math.sqrt(n_experts))
        axis = torch.linspace(-spread, spread, side)
        grid = torch.cartesian_prod(axis, axis)
        order = torch.argsort(grid.norm(dim=1), descending=True, stable=True)
        return grid[order[:n_experts]].clone()
    if n_experts == 1:
        return torch.zeros(1, act_dim)
    return (torch.rand(n_experts, act_dim, generator=generator) * 2.0 - 1.0) * spread


class NormalisedFeatures(nn.Module):
    """Layer norm without affine parameters, scaled by 1/sqrt(width).

    Heads reading these features move their outputs by about ``lr * (1 + 0.8 sqrt(width))`` per
    Adam step whatever the backbone's width or initialisation; on raw features the step grows
    with the features' L1 norm (x100 for a 256-wide MLP on a constant observation).
    """

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(features, (self.width,)) / math.sqrt(self.width)


class MixtureOfExpertsPolicy(nn.Module):
    def __init__(self, obs_dim_step: int, history: int, act_dim: int, n_experts: int,
                 backbone: BackboneConfig | None = None, covariance: str = "full", min_std: float = 1e-4,
                 init_std: float = 1.0, mean_init_spread: float = 1.0, gating: str = "detached_features",
                 generator: torch.Generator | None = None, gating_hidden: int = 0, gating_layers: int = 0):
        super().__init__()
        backbone = BackboneConfig() if backbone is None else backbone
        for name, value, low in (("obs_dim_step", obs_dim_step, 1), ("history", history, 1),
                                 ("act_dim", act_dim, 1), ("n_experts", n_experts, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MixtureOfExpertsPolicy {name}: expected an integer >= {low}, got {value!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"MixtureOfExpertsPolicy covariance: expected one of {COVARIANCES}, got {covariance!r}")
        if gating not in GATINGS:
            raise ValueError(f"MixtureOfExpertsPolicy gating: expected one of {GATINGS}, got {gating!r}")
        if not (min_std > 0 and math.isfinite(min_std)):
            raise ValueError(f"MixtureOfExpertsPolicy min_std: expected a finite number > 0, got {min_std!r}")
        if not (init_std > min_std and math.isfinite(init_std)):
            raise ValueError(f"MixtureOfExpertsPolicy init_std: expected a finite number > min_std={min_std}, "
                             f"got {init_std!r}")
        for name, value in (("gating_hidden", gating_hidden), ("gating_layers", gating_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MixtureOfExpertsPolicy {name}: expected an integer >= 0, got {value!r}")
        if not (mean_init_spread >= 0 and math.isfinite(mean_init_spread)):
            raise ValueError(f"MixtureOfExpertsPolicy mean_init_spread: expected a finite number >= 0, "
                             f"got {mean_init_spread!r}")
        self.hyperparameters = dict(obs_dim_step=obs_dim_step, history=history, act_dim=act_dim,
                                    n_experts=n_experts, backbone=backbone.validate().to_dict(),
                                    covariance=covariance, min_std=min_std, init_std=init_std,
                                    mean_init_spread=mean_init_spread, gating=gating, gating_hidden=gating_hidden,
                                    gating_layers=gating_layers)
        self.obs_dim = obs_dim_step * history
        self.act_dim = act_dim
        self.n_experts = n_experts
        self.covariance = covariance
        self.min_std = min_std
        self.gating = gating

        self.backbone = build_backbone(backbone, obs_dim_step, history)
        features = self.backbone.out_dim
        self.feature_norm = NormalisedFeatures(features)
        self.mean_head = nn.Linear(features, n_experts * act_dim)
        self.std_head = nn.Linear(features, n_experts * act_dim)  # pre-softplus diagonal of L
        n_off = act_dim * (act_dim - 1) // 2 if covariance == "full" else 0
        self.off_diagonal_head = nn.Linear(features, n_experts * n_off) if n_off > 0 else None
        if gating == "detached_features":  # a linear read-out of the (deep) shared features
            self.gating_net = nn.Sequential(nn.Linear(features, n_experts))
        else:
            # own_mlp: an MLP on the observations; detached_mlp: an MLP head on the detached, layer-normalised
            # backbone features (unit scale per entry), trained by the gating M-step only
            hidden, layers = gating_hidden or backbone.hidden, gating_layers or backbone.mlp_layers
            inputs = self.obs_dim if gating == "own_mlp" else features
            self.gating_net = nn.Sequential(build_mlp(inputs, hidden, layers, activation=backbone.activation),
                                            NormalisedFeatures(hidden), nn.Linear(hidden, n_experts))
        # L is gathered from [0, diag entries, off-diagonal entries] with a constant index (export friendly).
        tril_rows, tril_cols = torch.tril_indices(act_dim, act_dim, offset=-1)
        index = torch.zeros(act_dim, act_dim, dtype=torch.long)
        index[torch.arange(act_dim), torch.arange(act_dim)] = 1 + torch.arange(act_dim)
        index[tril_rows, tril_cols] = 1 + act_dim + torch.arange(tril_rows.numel())
        self.register_buffer("tril_index", index.reshape(-1), persistent=False)

        with torch.no_grad():
            # experts start state independent: zero weights, means spread, std ~ init_std, uniform gating
            self.mean_head.weight.zero_()
            self.mean_head.bias.copy_(initial_mean_offsets(n_experts, act_dim, mean_init_spread, generator).reshape(-1))
            self.std_head.weight.zero_()
            self.std_head.bias.fill_(math.log(math.expm1(init_std - min_std)))
            if self.off_diagonal_head is not None:
                self.off_diagonal_head.weight.zero_()
                self.off_diagonal_head.bias.zero_()
            self.gating_net[-1].weight.zero_()
            self.gating_net[-1].bias.zero_()

    # --- building blocks (used by VDD/EM to share one backbone pass) -------------------
    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.feature_norm(self.backbone(obs))

    def gating_logits(self, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Unnormalised log gating weights ``[B, Z]``."""
        if self.gating == "detached_features":
            return self.gating_net(features.detach())
        if self.gating == "detached_mlp":  # the features without NormalisedFeatures' 1/sqrt(width)
            return self.gating_net(features.detach() * math.sqrt(self.feature_norm.width))
        return self.gating_net(obs)

    def expert_means(self, features: torch.Tensor) -> torch.Tensor:
        return self.mean_head(features).reshape(-1, self.n_experts, self.act_dim)

    def expert_scales(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, Z, A]`` standard deviations (diagonal) or ``[B, Z, A, A]`` Cholesky factors (full)."""
        diag = F.softplus(self.std_head(features)).reshape(-1, self.n_experts, self.act_dim) + self.min_std
        if self.off_diagonal_head is None:
            return diag
        off = self.off_diagonal_head(features).reshape(diag.shape[0], self.n_experts, -1)
        entries = torch.cat([torch.zeros_like(diag[..., :1]), diag, off], dim=-1)
        return entries[..., self.tril_index].reshape(diag.shape[0], self.n_experts, self.act_dim, self.act_dim)

    def scale_diagonal(self, scales: torch.Tensor) -> torch.Tensor:
        """``[B, Z, A]`` diagonal of L from :meth:`expert_scales`' output."""
        return scales if self.off_diagonal_head is None else torch.diagonal(scales, dim1=-2, dim2=-1)

    def gaussian_log_probs(self, actions: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``log N(actions; mu_z, L_z L_z^T)`` for ``actions [B, ..., A]`` against every expert ``[B, Z, ...]``.

        ``actions`` may be ``[B, A]`` (one action per state, result ``[B, Z]``) or ``[B, V, A]``
        (V actions per state, result ``[B, V, Z]``).
        """
        extra_axes = actions.dim() - 2
        acts = actions.unsqueeze(-2)  # [B, (V,) 1, A]
        mu = means.reshape(means.shape[0], *([1] * extra_axes), *means.shape[1:])
        log_det = torch.log(self.scale_diagonal(scales)).sum(-1)  # [B, Z]
        log_det = log_det.reshape(log_det.shape[0], *([1] * extra_axes), self.n_experts)
        diff = acts - mu  # [B, (V,) Z, A]
        if self.off_diagonal_head is None:
            whitened = diff / scales.reshape(scales.shape[0], *([1] * extra_axes), *scales.shape[1:])
        else:
            # invert each L once, then apply it to all V actions (cheaper than V triangular solves)
            eye = torch.eye(self.act_dim, dtype=scales.dtype, device=scales.device)
            inverse = torch.linalg.solve_triangular(scales, eye.expand_as(scales), upper=False)  # [B, Z, A, A]
            # actions as columns [B, Z, A, V]: one matmul per (state, expert), no broadcast copies of L^-1
            columns = diff.reshape(diff.shape[0], -1, self.n_experts, self.act_dim).permute(0, 2, 3, 1)
            whitened = (inverse @ columns).permute(0, 3, 1, 2).reshape(diff.shape)
        return -0.5 * whitened.pow(2).sum(-1) - log_det - 0.5 * self.act_dim * LOG_2PI

    def entropies(self, scales: torch.Tensor) -> torch.Tensor:
        """Closed-form entropy ``[B, Z]`` of every expert."""
        return torch.log(self.scale_diagonal(scales)).sum(-1) + 0.5 * self.act_dim * (1.0 + LOG_2PI)

    def sample_experts(self, means: torch.Tensor, scales: torch.Tensor, n_samples: int,
                       generator: torch.Generator | None = None, antithetic: bool = False) -> torch.Tensor:
        """Reparameterised samples ``[B, Z, V, A]``: V per expert per state.

        ``antithetic`` pairs every noise draw eps with -eps (V even), which cancels the odd part of
        the noise in Monte-Carlo gradients (exactly, for the mean, when the target is Gaussian).
        """
        if antithetic and n_samples % 2 != 0:
            raise ValueError(f"sample_experts n_samples: expected an even number with antithetic=True, got {n_samples}")
        draws = n_samples // 2 if antithetic else n_samples
        eps = torch.randn(means.shape[0], self.n_experts, draws, self.act_dim, generator=generator,
                          device=means.device, dtype=means.dtype)
        if antithetic:
            eps = torch.cat([eps, -eps], dim=2)
        if self.off_diagonal_head is None:
            return means.unsqueeze(2) + scales.unsqueeze(2) * eps
        return means.unsqueeze(2) + eps @ scales.transpose(-1, -2)

    # --- public API ----------------------------------------------------------------
    def components(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights [B,Z], means [B,Z,A], chol [B,Z,A,A])``; chol is lower triangular."""
        feats = self.features(obs)
        scales = self.expert_scales(feats)
        chol = torch.diag_embed(scales) if self.off_diagonal_head is None else scales
        return torch.softmax(self.gating_logits(obs, feats), -1), self.expert_means(feats), chol

    def weights_and_means(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [B,Z], means [B,Z,A])`` only: all a greedy or mean-sampling policy needs."""
        feats = self.features(obs)
        return torch.softmax(self.gating_logits(obs, feats), -1), self.expert_means(feats)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights_and_means(obs)

    def expert_log_probs(self, actions: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """``log N(actions; mu_z(s), S_z(s))`` as ``[B, Z]``."""
        feats = self.features(obs)
        return self.gaussian_log_probs(actions, self.expert_means(feats), self.expert_scales(feats))

    def log_prob(self, actions: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(actions | obs)`` as ``[B]``."""
        feats = self.features(obs)
        log_w = torch.log_softmax(self.gating_logits(obs, feats), -1)
        expert = self.gaussian_log_probs(actions, self.expert_means(feats), self.expert_scales(feats))
        return torch.logsumexp(log_w + expert, -1)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``a ~ q(.|obs)``: expert from the gating, then a Gaussian sample of it; ``[B, A]``."""
        feats = self.features(obs)
        weights = torch.softmax(self.gating_logits(obs, feats), -1)
        expert = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
        rows = torch.arange(obs.shape[0], device=obs.device)
        mean = self.expert_means(feats)[rows, expert]
        scale = self.expert_scales(feats)[rows, expert]
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        if self.off_diagonal_head is None:
            return mean + scale * eps
        return mean + (scale @ eps.unsqueeze(-1)).squeeze(-1)

    def act(self, obs: torch.Tensor, greedy: bool = False, generator: torch.Generator | None = None
            ) -> torch.Tensor:
        """The mean of one expert per state: sampled from the gating, or its argmax if greedy; ``[B, A]``."""
        weights, means = self.weights_and_means(obs)
        if greedy:
            expert = torch.argmax(weights, -1)
        else:
            expert = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
        return means[torch.arange(obs.shape[0], device=obs.device), expert]

    @staticmethod
    def from_hyperparameters(hyperparameters: dict) -> MixtureOfExpertsPolicy:
        """Rebuild an (untrained) policy from ``model.hyperparameters``; then load its state_dict."""
        params = dict(hyperparameters)
        # an initialisation-only option of older files (dropped): the loaded weights replace what it set
        params.pop("mean_init_weight_std", None)
        params["backbone"] = BackboneConfig.from_dict(params["backbone"])
        return MixtureOfExpertsPolicy(**params)
