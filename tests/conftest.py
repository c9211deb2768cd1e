"""Shared fixtures."""

from collections.abc import Iterator

import pytest
import torch

# helpers in _util.py assert on behalf of tests: let pytest explain their failures too
pytest.register_assert_rewrite("_util")

from _util import SMAX, SMIN  # noqa: E402  (after the rewrite hook)

from sfumato.accuracy import reference_ode  # noqa: E402
from sfumato.mixture import GaussianMixture, random_mixture  # noqa: E402
from sfumato.runtime import torch_threads  # noqa: E402


def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on a busy machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module, its module-scoped fixtures included: tiny 2-D batches
    gain nothing from intra-op threads, which slow them tens of times on a busy CPU (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread_module")``)."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def gm() -> GaussianMixture:
    """The exact 2-D, 4-component Gaussian mixture the sampler truth tests run against."""
    return random_mixture(2, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ode_case(gm):
    """Start states at SMAX (float64) and the reference solution at SMIN."""
    x = SMAX * torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x, reference_ode(gm, x, SMAX, SMIN, steps=1000)


@pytest.fixture(scope="module")
def class_gm() -> GaussianMixture:
    """A class-conditional Gaussian mixture (3-D, 6 components, 3 classes), where the
    conditional denoiser and the noisy classifier p(y | x, sigma) are exact."""
    return random_mixture(dim=3, k=6, num_classes=3, generator=torch.Generator().manual_seed(7))
