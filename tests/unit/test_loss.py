"""The chunked FP32 cross-entropy equals torch's on FP32-upcast logits, loss and gradient."""

import pytest
import torch
import torch.nn.functional as F

from dsv3.model.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 256, 10_000])
def test_chunked_cross_entropy_matches_torch(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(53, 97, generator=g) * 3).to(dtype)
    target = torch.randint(0, 97, (53,), generator=g)
    target[[0, 5, 52]] = -100
    a = logits.clone().requires_grad_()
    ref = F.cross_entropy(a.float(), target, ignore_index=-100)
    (ref * 1.7).backward()
    b = logits.clone().requires_grad_()
    ours = cross_entropy(b, target, -100, chunk_rows=chunk)
    (ours * 1.7).backward()
    assert ours.dtype == torch.float32 and b.grad.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=tol, atol=tol)
    assert b.grad[[0, 5, 52]].abs().max() == 0  # ignored rows get no gradient


def test_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
