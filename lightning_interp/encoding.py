"""The algebra below the tasks and the methods: one-hot sequences, Potts gauges and the ``Quadratic`` activation.

Data (:class:`~lightning_interp.tasks.PottsTask`, :class:`~lightning_interp.datamodules.PottsDataModule`) and
methods (:mod:`lightning_interp.expansion`, :mod:`lightning_interp.correlation`) both build on these; keeping
them here lets the data modules import no method. :func:`one_hot_flat` and the gauges are also importable from
:mod:`lightning_interp.expansion`, and :class:`Quadratic` from :mod:`lightning_interp.correlation`.

The module is pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Quadratic", "one_hot_flat", "reference_gauge", "zero_sum_gauge"]


def one_hot_flat(states: Tensor, num_states: int) -> Tensor:
    """Flattened one-hot encoding of integer sequences, site-major.

    Args:
        states: int64 ``[N, L]`` with entries in ``[0, num_states)``.
        num_states: number of states ``q`` per site.

    Returns:
        float32 ``[N, L * q]`` with ``x[n, i * q + a] = 1`` exactly when ``states[n, i] == a``.

    Raises:
        ValueError: ``states`` is not 2-D, not an integer tensor, or has entries outside ``[0, num_states)``.

    Example:
        >>> one_hot_flat(torch.tensor([[0, 2], [1, 0]]), 3)
        tensor([[1., 0., 0., 0., 0., 1.],
                [0., 1., 0., 1., 0., 0.]])
    """
    if states.dim() != 2:
        raise ValueError(f"states must be 2-D [N, L], got shape {list(states.shape)}")
    if states.dtype.is_floating_point or states.dtype.is_complex or states.dtype == torch.bool:
        raise ValueError(f"states must be an integer tensor, got {states.dtype}")
    if states.numel() and (int(states.min()) < 0 or int(states.max()) >= num_states):
        raise ValueError(f"states must lie in [0, {num_states}), got range [{int(states.min())}, {int(states.max())}]")
    n, length = states.shape
    return torch.nn.functional.one_hot(states.long(), num_states).reshape(n, length * num_states).float()


class Quadratic(nn.Module):
    """The activation ``y = z + alpha * z^2`` (exact under Gaussian moment propagation).

    Args:
        alpha: the quadratic coefficient.

    Example:
        >>> Quadratic(0.5)(torch.tensor([2.0]))
        tensor([4.])
    """

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, z: Tensor) -> Tensor:
        return z + self.alpha * z * z

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


# ---------------------------------------------------------------------------------------------
# gauges
# ---------------------------------------------------------------------------------------------


def _sym_check(couplings: Tensor) -> None:
    if couplings.ndim < 4 or couplings.shape[-4] != couplings.shape[-3] or couplings.shape[-2] != couplings.shape[-1]:
        raise ValueError(f"couplings must have shape [..., L, L, q, q], got {list(couplings.shape)}")


def _offdiag(length: int, device: torch.device) -> Tensor:
    return (~torch.eye(length, dtype=torch.bool, device=device))[:, :, None, None]


def zero_sum_gauge(fields: Tensor, couplings: Tensor, constant: Tensor | float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Move ``(E0, h, J)`` to the zero-sum gauge without changing any sequence's energy.

    ``J'_ij(a,b) = J_ij(a,b) - J_ij(.,b) - J_ij(a,.) + J_ij(.,.)``,
    ``h'_i(a) = h_i(a) - h_i(.) + sum_{j != i} (J_ij(a,.) - J_ij(.,.))`` and
    ``E0' = E0 + sum_i h_i(.) + sum_{i<j} J_ij(.,.)`` (dot = mean over states). ``couplings`` are the
    symmetric ``[..., L, L, q, q]`` array (``J[i, j, a, b] = J[j, i, b, a]``, zero diagonal blocks).

    Returns:
        ``(constant, fields, couplings)`` in the zero-sum gauge.
    """
    _sym_check(couplings)
    off = _offdiag(couplings.shape[-4], couplings.device).to(couplings.dtype)
    j = couplings * off
    j_row = j.mean(dim=-1, keepdim=True)  # J_ij(a, .)
    j_col = j.mean(dim=-2, keepdim=True)  # J_ij(., b)
    j_all = j.mean(dim=(-2, -1), keepdim=True)  # J_ij(., .)
    new_j = (j - j_row - j_col + j_all) * off
    h_mean = fields.mean(dim=-1, keepdim=True)
    new_h = fields - h_mean + (j_row - j_all)[..., 0].sum(dim=-2)
    new_c = (
        torch.as_tensor(constant, dtype=fields.dtype, device=fields.device)
        + h_mean[..., 0].sum(-1)
        + 0.5 * j_all.sum(dim=(-4, -3, -2, -1))
    )
    return new_c, new_h, new_j


def reference_gauge(
    fields: Tensor, couplings: Tensor, reference: Tensor, constant: Tensor | float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Move ``(E0, h, J)`` to the gauge where every term of the ``reference`` sequence is zero.

    ``J'_ij(a,b) = J_ij(a,b) - J_ij(r_i,b) - J_ij(a,r_j) + J_ij(r_i,r_j)``,
    ``h'_i(a) = h_i(a) - h_i(r_i) + sum_{j != i} (J_ij(a,r_j) - J_ij(r_i,r_j))`` and
    ``E0' = E(reference)``.
    """
    _sym_check(couplings)
    length, q = fields.shape[-2], fields.shape[-1]
    r = reference.long().to(fields.device)
    if r.shape != (length,) or (r < 0).any() or (r >= q).any():
        raise ValueError(f"reference must be a sequence of {length} states in [0, {q})")
    off = _offdiag(length, couplings.device).to(couplings.dtype)
    j = couplings * off
    # J_ij(a, r_j): [..., L, L, q]; J_ij(r_i, b): [..., L, L, q]; J_ij(r_i, r_j): [..., L, L]
    j_a_r = j[..., :, :, :, :].gather(-1, r[None, :, None, None].expand(*j.shape[:-1], 1).contiguous())[..., 0]
    j_r_b = j.gather(-2, r[:, None, None, None].expand(*j.shape[:-2], 1, q).contiguous())[..., 0, :]
    j_r_r = j_a_r.gather(-1, r[:, None, None].expand(*j_a_r.shape[:-1], 1).contiguous())[..., 0]
    new_j = (j - j_r_b[..., :, :, None, :] - j_a_r[..., :, :, :, None] + j_r_r[..., None, None]) * off
    h_r = fields.gather(-1, r[:, None].expand(*fields.shape[:-1], 1).contiguous())[..., 0]
    new_h = fields - h_r[..., None] + (j_a_r - j_r_r[..., None]).sum(dim=-2)
    energy_r = torch.as_tensor(constant, dtype=fields.dtype, device=fields.device) + h_r.sum(-1) + 0.5 * j_r_r.sum(dim=(-2, -1))
    return energy_r, new_h, new_j
