"""Whether ``kernel=cpu`` can be built on this machine (a C compiler with OpenMP and vector extensions):
tests that run it are skipped, with the compiler's reason, where it cannot."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from pagedlab.kernels.cpu_kernel import CpuKernel


@cache
def problem() -> str | None:
    """Why kernel=cpu cannot run here (the build is made once and cached), or None."""
    return CpuKernel.problem(torch.device("cpu"))


def needs_cpu_kernel() -> pytest.MarkDecorator:
    """A skip mark for tests of kernel=cpu on a machine that cannot build it."""
    return pytest.mark.skipif(problem() is not None, reason=f"kernel=cpu cannot be built here: {problem()}")
