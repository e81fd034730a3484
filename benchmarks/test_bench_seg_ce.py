"""Benchmark of the segmentation cross entropy; shapes in :data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["seg_ce"])


def test_seg_ce(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)
