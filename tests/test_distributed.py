"""nodepert_dist.distributed: explicit/env layouts, jax's own cluster detection (SLURM and Open
MPI faked with environment variables only), the device-count check."""

import jax
import pytest

from nodepert_dist import distributed as dist
from nodepert_dist.distributed import DistributedError, Layout

# What `srun` sets in task 13 of 24 (3 nodes x 8 GPUs), job 123456.
SLURM_ENV = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[017-018],gpu020",
             "SLURM_JOB_NODELIST": "gpu[017-018],gpu020", "SLURM_PROCID": "13",
             "SLURM_NTASKS": "24", "SLURM_LOCALID": "5", "SLURM_STEP_NUM_NODES": "3"}
SLURM_PORT = 123456 % 4096 + 61440  # jax's rule: the job id in the top 4096 ports
# What Open MPI's mpirun sets in rank 2 of 4 (jax parses the launcher's address and job id).
OMPI_ENV = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
            "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
OMPI_PORT = (1531576320 // 4096) % 4096 + 61440


def test_slurm_one_process_per_gpu_from_jax_detection():
    assert dist.detect(env=SLURM_ENV) == Layout(
        "slurm", num_processes=24, process_id=13, coordinator_address=f"gpu017:{SLURM_PORT}",
        local_device_ids=(5,))


def test_slurm_gpu_bound_to_the_task_is_device_zero():
    assert dist.detect(env={**SLURM_ENV, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids == (0,)
    layout = dist.detect(env={**SLURM_ENV, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert layout.local_device_ids == (5,)


def test_slurm_one_process_per_node_uses_all_gpus():
    env = {**SLURM_ENV, "SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    layout = dist.detect(slurm_tasks="per_node", env=env)
    assert (layout.num_processes, layout.process_id, layout.local_device_ids) == (3, 2, None)
    assert layout.coordinator_address == f"gpu017:{SLURM_PORT}"


def test_slurm_single_task_and_every_task_derives_the_same_coordinator():
    assert dist.detect(env={**SLURM_ENV, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == Layout("slurm")
    addresses = {dist.detect(env={**SLURM_ENV, "SLURM_PROCID": str(i)}).coordinator_address
                 for i in range(24)}
    assert addresses == {f"gpu017:{SLURM_PORT}"}
    # The batch script outside `srun` has no step node list: not a multi-process layout.
    no_step = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_NODELIST"}
    assert dist.detect(env=no_step) == Layout("single")


def test_open_mpi_from_jax_detection():
    assert dist.detect(env=OMPI_ENV) == Layout(
        "ompi", num_processes=4, process_id=2, coordinator_address=f"10.96.0.1:{OMPI_PORT}",
        local_device_ids=(1,))


def test_precedence_flags_then_env_then_cluster():
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
    with pytest.raises(DistributedError, match="--slurm_tasks"):
        dist.detect(slurm_tasks="per_rack", env=SLURM_ENV)


def test_initialize_single_process_checks_the_device_count():
    # conftest gives this process 8 CPU devices; a single-process layout starts nothing.
    assert dist.initialize(env={}, expected_devices=8).source == "single"
    assert jax.process_count() == 1
    with pytest.raises(DistributedError, match="expected 4 devices .* sees 8"):
        dist.initialize(env={}, expected_devices=4)


def test_mesh_must_keep_devices_in_process_order():
    from types import SimpleNamespace
    from nodepert_dist import mesh as mesh_lib
    ok = [SimpleNamespace(process_index=p) for p in (0, 0, 1, 1)]
    mesh_lib.check_process_order(ok)
    with pytest.raises(ValueError, match=r"not in process order .*\[0, 1, 0, 1\]"):
        mesh_lib.check_process_order([SimpleNamespace(process_index=p) for p in (0, 1, 0, 1)])
    mesh_lib.make_mesh()  # this process's mesh passes the check
