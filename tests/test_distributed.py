"""nodepert_dist.distributed: hostlists, SLURM/env/flag detection, the device-count check."""

import jax
import pytest

from nodepert_dist import distributed as dist
from nodepert_dist.distributed import DistributedError, Layout


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[001-003,007],gpu-a", ["node001", "node002", "node003", "node007", "gpu-a"]),
    ("gpu-a", ["gpu-a"]),
    ("a1,b2", ["a1", "b2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
    ("x[3],y[0-1]-ib", ["x3", "y0-ib", "y1-ib"]),
])
def test_parse_hostlist(hostlist, hosts):
    assert dist.parse_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "n[a-b]", "n[5-2]"])
def test_parse_hostlist_rejects_malformed(bad):
    with pytest.raises(DistributedError):
        dist.parse_hostlist(bad)


SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[017-018],gpu020", "SLURM_NODELIST": "ignored[1-2]",
             "SLURM_JOB_ID": "123456", "SLURM_PROCID": "13", "SLURM_NTASKS": "24",
             "SLURM_LOCALID": "5"}


def test_slurm_one_process_per_gpu():
    layout = dist.detect(env=SLURM_ENV)
    assert layout == Layout("slurm", num_processes=24, process_id=13,
                            coordinator_address=f"gpu017:{61000 + 123456 % 4000}",
                            local_device_ids=(5,))


def test_slurm_gpu_bound_to_the_task_is_device_zero():
    layout = dist.detect(env={**SLURM_ENV, "CUDA_VISIBLE_DEVICES": "5"})
    assert layout.local_device_ids == (0,)
    layout = dist.detect(env={**SLURM_ENV, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert layout.local_device_ids == (5,)


def test_slurm_one_process_per_node_uses_all_gpus():
    env = {**SLURM_ENV, "SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    layout = dist.detect(slurm_tasks="per_node", env=env)
    assert (layout.num_processes, layout.process_id, layout.local_device_ids) == (3, 2, None)
    assert layout.coordinator_address.startswith("gpu017:")


def test_slurm_nodelist_fallback_and_single_task():
    env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_NODELIST"}
    assert dist.detect(env=env).coordinator_address.startswith("ignored1:")
    assert dist.detect(env={**SLURM_ENV, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == Layout("slurm")


def test_every_task_of_a_job_derives_the_same_coordinator():
    addresses = {dist.detect(env={**SLURM_ENV, "SLURM_PROCID": str(i)}).coordinator_address
                 for i in range(24)}
    assert len(addresses) == 1
    other_job = dist.detect(env={**SLURM_ENV, "SLURM_JOB_ID": "123457"}).coordinator_address
    assert other_job != addresses.pop()


def test_precedence_flags_then_env_then_slurm():
    env = {**SLURM_ENV, dist.ENV_COORDINATOR: "127.0.0.1:999", dist.ENV_NUM_PROCESSES: "2",
           dist.ENV_PROCESS_ID: "1"}
    assert dist.detect(env=env) == Layout("env", 2, 1, "127.0.0.1:999")
    # Explicit values win over the env, the env fills in what is not given.
    assert dist.detect(process_id=0, env=env) == Layout("flags", 2, 0, "127.0.0.1:999")
    assert dist.detect("h:1", 4, 3, env=env) == Layout("flags", 4, 3, "h:1")
    assert dist.detect(env={}) == Layout("single")


def test_incomplete_or_inconsistent_explicit_layout_is_a_one_line_error():
    with pytest.raises(DistributedError, match="--process_id"):
        dist.detect("127.0.0.1:1234", 2, env={})
    with pytest.raises(DistributedError, match="outside 0..1"):
        dist.detect("127.0.0.1:1234", 2, 2, env={})
    with pytest.raises(DistributedError, match="host:port"):
        dist.detect("127.0.0.1", 2, 0, env={})
    assert dist.detect(num_processes=1, env={}) == Layout("flags")


def test_initialize_single_process_checks_the_device_count():
    # conftest gives this process 8 CPU devices; a single-process layout starts nothing.
    assert dist.initialize(env={}, expected_devices=8).source == "single"
    assert jax.process_count() == 1
    with pytest.raises(DistributedError, match="expected 4 devices .* sees 8"):
        dist.initialize(env={}, expected_devices=4)
