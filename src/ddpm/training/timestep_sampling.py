"""Loss-aware importance sampling of the training timestep (Nichol & Dhariwal 2021, section 3.3).

L_vlb = sum_t L_t has terms of very different size (the first few dominate), so its uniform-t
estimate T * L_t is noisy. Drawing t with p_t proportional to sqrt(E[L_t^2]) and weighting each
example's loss by 1 / (T p_t) keeps the estimate unbiased, E_{t~p}[L_t / (T p_t)] = mean_t L_t, and
lowers its variance. E[L_t^2] is a running mean over the 10 most recent losses seen at t; until
every t has 10 of them, t stays uniform (weights 1). A small uniform share (0.001) keeps every
p_t > 0. This is improved-diffusion's LossSecondMomentResampler, with its state in ``state_dict``
so that a resumed run continues with the same history.

Under data parallelism each rank must see the same history: gather (t, losses) from all ranks
and call ``update`` with the whole batch on every rank, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LossAwareTimestepSampler:
    """p_t proportional to sqrt(mean of the last ``history`` losses at t^2), mixed with ``uniform_prob``.

    Use::

        t, w = ts.sample(B, generator=g, device=x0.device)
        losses = training_loss(..., t=t, objective="vlb", reduction="none")
        ts.update(t, losses.detach())
        (losses * w).mean().backward()
    """

    def __init__(self, num_timesteps: int, *, history: int = 10, uniform_prob: float = 0.001):
        for name, value in (("num_timesteps", num_timesteps), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob!r}")
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, float(uniform_prob)
        # Row t holds the losses seen at t, oldest first, shifted once full (as in improved-diffusion).
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        """Whether every timestep has its full history (until then, t is uniform)."""
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t, float64 (T,), summing to 1."""
        T = self.num_timesteps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = self.losses.pow(2).mean(1).sqrt()
        total = p.sum()
        # All-zero losses leave nothing to prefer: stay uniform rather than divide by zero.
        p = p / total if total > 0 else torch.full_like(p, 1.0 / T)
        return p * (1 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps t ~ p (long (B,)) and the importance weights 1 / (T p_t) (float32 (B,)).

        Random numbers come from ``generator`` (a CPU generator, or None for torch's global one).
        """
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (B,) seen at timesteps t (B,), in batch order."""
        t = torch.as_tensor(t).detach().cpu().long().reshape(-1)
        losses = torch.as_tensor(losses).detach().cpu().double().reshape(-1)
        if t.shape != losses.shape:
            raise ValueError(f"t and losses must have the same length, got {t.numel()} and {losses.numel()}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in 0..{self.num_timesteps - 1}")
        if not torch.isfinite(losses).all():
            raise ValueError("losses must be finite (a non-finite loss would fix p_t for the next 10 visits)")
        for ti, loss in zip(t.tolist(), losses.tolist()):
            n = int(self.counts[ti])
            if n == self.history:  # full: drop the oldest
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = loss
            else:
                self.losses[ti, n] = loss
                self.counts[ti] = n + 1

    def state_dict(self) -> dict:
        """The history as tensors (``torch.load(weights_only=True)`` reads it back)."""
        return {"losses": self.losses.clone(), "counts": self.counts.clone(), "uniform_prob": self.uniform_prob}

    def load_state_dict(self, state: dict) -> None:
        losses, counts = torch.as_tensor(state["losses"]), torch.as_tensor(state["counts"])
        want = (self.num_timesteps, self.history)
        if tuple(losses.shape) != want or tuple(counts.shape) != want[:1]:
            raise ValueError(f"timestep sampler state has shape {tuple(losses.shape)}, expected {want}")
        self.losses = losses.double().clone()
        self.counts = counts.long().clone()
        self.uniform_prob = float(state.get("uniform_prob", self.uniform_prob))


def record_vlb_losses(sampler: LossAwareTimestepSampler, t_all: torch.Tensor, mine: torch.Tensor,
                      skip: torch.Tensor, *, world: int, grad_accum: int) -> None:
    """Add a training step's L_vlb per example to the loss history, unless the step is skipped.
    ``t_all`` holds the timesteps of the whole global batch, ``mine`` this rank's losses. Every rank
    records the whole global batch in its order (micro-step, rank, example), so all ranks keep the
    same history, and N ranks the history of one process with the same global batch."""
    if world > 1:
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        mine = torch.stack(parts).view(world, grad_accum, -1).transpose(0, 1).reshape(-1)
    if not skip.item():  # a non-finite loss would fix p_t for its next 10 visits
        sampler.update(t_all, mine)
