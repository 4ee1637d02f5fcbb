"""Peak memory of the torch FSAT on the CPU, measured exactly (the fsat-memory and fsat-forward-memory targets).

The peak is the running sum of the CPU allocator's events during one call (``torch.profiler`` with
``profile_memory=True``, the method of :func:`refattn.bench.measure.peak_torch_cpu`), above what was
allocated before it: the inputs are excluded. Everything FSAT holds is O(L) per (batch, head), so
at lengths that are powers of two (FFT length 2L) the ratio to the bound does not depend on L: at
L = 2,048 it is the ratio at L = 16,384, 65,536 and 1,048,576 (fwd+bwd 1.078, with or without padding;
forward 1.282; `refattn bench --targets` measured 1.078 at 16,384, 65,536 and 1,048,576).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from refattn.backends.torch import fsat  # noqa: E402
from refattn.bench.measure import peak_torch_cpu  # noqa: E402

BATCH, HEADS, LENGTH, DIM, TOP_K = 1, 8, 2048, 64, 16
FLOAT32 = 4


def inputs(masked: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(BATCH, HEADS, LENGTH, DIM, generator=generator) for _ in range(4))
    w = torch.randn(HEADS, DIM, generator=generator) / math.sqrt(DIM)
    mask = None
    if masked:
        mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
        mask[:, LENGTH - LENGTH // 4 :] = True
    return q, k, v, w, dout, mask


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "padded"])
def test_forward_and_backward_peak_is_within_one_and_a_half_times_what_they_must_hold(masked):
    """Target 5: peak above the inputs <= 1.5 x (output + gradients of q, k, v, w + the saved (B, H, L, K)
    probabilities). Holding the spectra of all heads at once, or keeping them for dw, made it 1.89x."""
    q, k, v, w, dout, mask = inputs(masked)
    for leaf in (q, k, v, w):
        leaf.requires_grad_(True)

    def forward_and_backward() -> None:
        for leaf in (q, k, v, w):
            leaf.grad = None
        fsat.attention(q, k, v, w, TOP_K, key_padding_mask=mask).backward(dout)

    peak = peak_torch_cpu(forward_and_backward)
    tokens = BATCH * HEADS * LENGTH
    needed = FLOAT32 * (tokens * DIM + 3 * tokens * DIM + HEADS * DIM + tokens * TOP_K)
    print(f"fwd+bwd L={LENGTH}: peak above the inputs {peak} B, output + gradients + probabilities {needed} B, "
          f"ratio {peak / needed:.3f}")
    assert q.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
    assert peak <= 1.5 * needed
    # What the code holds today, 1.078: one more (B, H, L, K) float32 tensor at the peak would add 0.059.
    assert peak <= 1.08 * needed


def test_forward_peak_is_within_one_and_a_half_outputs():
    """Target 1's inference half: at L = 2,097,152 (B = 1, H = 8, D = 64) q, k and v are 12 GiB and the
    output 4 GiB; a peak above the inputs of at most 1.5 outputs (6 GiB) keeps the call within 24 GiB.
    Holding the spectra of all heads at once made it 8 outputs."""
    q, k, v, w, _, _ = inputs(False)

    def forward() -> None:
        with torch.no_grad():
            fsat.attention(q, k, v, w, TOP_K)

    peak = peak_torch_cpu(forward)
    output = FLOAT32 * BATCH * HEADS * LENGTH * DIM
    print(f"forward L={LENGTH}: peak above the inputs {peak} B, output {output} B, ratio {peak / output:.3f}")
    assert peak <= 1.5 * output
    # At the peak (out allocated): the (B, H, L, K) probabilities, lse and its finite copy (B, H, L), and the
    # (B, H, K) offsets and bias; nothing else of size O(L). Keeping the (B, H, L, K) mask of invalid pairs
    # alive until then made it 256 KiB more here (1.344 outputs; 256 MiB at L = 2,097,152).
    rows = BATCH * HEADS * LENGTH
    assert peak <= output + FLOAT32 * (rows * TOP_K + 2 * rows) + 4096
