import pytest
import torch

from expand_and_cluster import backends

DEVICES = ["cpu"] + (["cuda"] if "cuda" in backends() and torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
# Relative tolerances of the kernels against torch.autograd (DESIGN.md): float64 agrees to
# summation-order rounding (~1e-15 per term, << 1e-10); float32 to a few ulp times the depth.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param
