"""Pools are checked against the cluster before anything starts."""

from __future__ import annotations

import pytest

from tip_ray.runtime.placement import PoolResources, ResourceError, check_fits


def test_pools_that_fit():
    check_fits([PoolResources("rollout", 2, cpus=1), PoolResources("learner", 2, cpus=1)], {"CPU": 4.0})


def test_shortfall_names_the_pools_and_the_missing_amount():
    pools = [PoolResources("rollout", 2, cpus=1, gpus=1), PoolResources("teacher", 1, cpus=2, gpus=1),
             PoolResources("learner", 4, cpus=1, custom={"node:learner": 1})]
    with pytest.raises(ResourceError, match=r"short of 1 CPU, 1 GPU, 4 node:learner .*rollout: 2 x .*teacher: 1 x"):
        check_fits(pools, {"CPU": 7.0, "GPU": 2.0})
