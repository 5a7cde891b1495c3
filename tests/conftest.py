import pytest

from tests.testing import DEVICES, DTYPES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param
