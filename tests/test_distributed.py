"""nodepert_dist.distributed: explicit/env layouts, jax's own cluster detection (SLURM and Open
MPI faked with environment variables only), the device-count check."""

import jax
import pytest

from nodepert_dist import distributed as dist
from nodepert_dist.distributed import DistributedError, Layout

# What `srun` sets in task 13 of 24 (3 nodes x 8 GPUs), job 123456.
SLURM_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_NODELIST": "gpu[017-018],gpu020",
    "SLURM_JOB_NODELIST": "gpu[017-018],gpu020",
    "SLURM_PROCID": "13",
    "SLURM_NTASKS": "24",
    "SLURM_LOCALID": "5",
    "SLURM_STEP_NUM_NODES": "3",
}
SLURM_PORT = 123456 % 4096 + 61440  # jax's rule: the job id in the top 4096 ports
# What Open MPI's mpirun sets in rank 2 of 4 (jax parses the launcher's address and job id).
OMPI_ENV = {
    "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
}
OMPI_PORT = (1531576320 // 4096) % 4096 + 61440


def test_slurm_one_process_per_gpu_from_jax_detection():
    assert dist.detect(env=SLURM_ENV) == Layout(
        "slurm",
        num_processes=24,
        process_id=13,
        coordinator_address=f"gpu017:{SLURM_PORT}",
        local_device_ids=(5,),
    )


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
    assert dist.detect(env={**SLURM_ENV, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == Layout(
        "slurm"
    )
    addresses = {
        dist.detect(env={**SLURM_ENV, "SLURM_PROCID": str(i)}).coordinator_address
        for i in range(24)
    }
    assert addresses == {f"gpu017:{SLURM_PORT}"}
    # The batch script outside `srun` has no step node list: not a multi-process layout.
    no_step = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_NODELIST"}
    assert dist.detect(env=no_step) == Layout("single")


def test_open_mpi_from_jax_detection():
    assert dist.detect(env=OMPI_ENV) == Layout(
        "ompi",
        num_processes=4,
        process_id=2,
        coordinator_address=f"10.96.0.1:{OMPI_PORT}",
        local_device_ids=(1,),
    )


def test_precedence_flags_then_env_then_cluster():
    env = {
        **SLURM_ENV,
        dist.ENV_COORDINATOR: "127.0.0.1:999",
        dist.ENV_NUM_PROCESSES: "2",
        dist.ENV_PROCESS_ID: "1",
    }
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
    with pytest.raises(DistributedError, match="is not HOST:PORT"):
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


# ----------------------------------------------------------------------------- issue 17: layouts


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("machine2-[3-5]-vm1", "machine2-3-vm1"),  # text after a range
        ("rack[1-2]-n[07-08]", "rack1-n07"),  # several ranges in one name
        ("login,gpu[017-018]", "login"),  # a comma list of mixed forms
        ("gpu[017-018],gpu020", "gpu017"),
        ("n[009,011-012]-ib,n3", "n009-ib"),  # a list inside the brackets, then text
        ("node007", "node007"),  # zero padding kept
    ],
)
def test_slurm_coordinator_is_the_first_host_of_every_hostlist_form(nodelist, first):
    env = {**SLURM_ENV, "SLURM_STEP_NODELIST": nodelist}
    assert dist.detect(env=env).coordinator_address == f"{first}:{SLURM_PORT}"


def test_slurm_bad_hostlist_is_a_one_line_error():
    with pytest.raises(DistributedError, match=r"SLURM_STEP_NODELIST='gpu\[1-' is not a hostlist"):
        dist.detect(env={**SLURM_ENV, "SLURM_STEP_NODELIST": "gpu[1-"})


# Open MPI 5 (PRRTE/PMIx) sets the rank variables but no mpirun URI.
OMPI5_ENV = {
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "PMIX_RANK": "1",
    "PMIX_NAMESPACE": "prterun-h-1@1",
    "PMIX_SERVER_URI41": "prterun-h-1@0.0;tcp4://127.0.0.1:40000",
}


def test_open_mpi_5_is_refused_in_one_line_or_completed_by_a_coordinator():
    with pytest.raises(DistributedError) as e:
        dist.detect(env=OMPI5_ENV)
    msg = str(e.value)
    assert "Open MPI 5" in msg and "process 1 of 4" in msg and "--coordinator_address" in msg
    assert "\n" not in msg
    # Given the coordinator (flag or env), the launcher supplies the rank, count and GPU.
    assert dist.detect("node1:5000", env=OMPI5_ENV) == Layout(
        "flags+ompi5", 4, 1, "node1:5000", local_device_ids=(1,)
    )
    env = {**OMPI5_ENV, dist.ENV_COORDINATOR: "node1:5000"}
    assert dist.detect(env=env) == Layout("env+ompi5", 4, 1, "node1:5000", local_device_ids=(1,))


def test_mpich_and_intel_mpi_hydra_are_refused_in_one_line():
    env = {"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "3", "PMI_FD": "6"}
    with pytest.raises(
        DistributedError,
        match=r"MPICH/Intel MPI .*process 3 of 8 .*"
        r"--coordinator_address=HOST:PORT",
    ):
        dist.detect(env=env)
    assert dist.detect("h:1", env=env) == Layout("flags+pmi", 8, 3, "h:1", local_device_ids=(3,))
    # A single rank is a single process.
    assert dist.detect(env={"PMI_RANK": "0", "PMI_SIZE": "1"}) == Layout("pmi")


def test_pmix_alone_names_the_count_and_coordinator_it_lacks():
    with pytest.raises(
        DistributedError,
        match=r"PMIx .*process 2 of an unknown number .*"
        r"--coordinator_address=HOST:PORT --num_processes=N",
    ):
        dist.detect(env={"PMIX_RANK": "2", "PMIX_NAMESPACE": "ns"})


def test_srun_with_pmi_or_pmix_uses_slurm_for_the_same_processes():
    env = {**SLURM_ENV, "PMIX_RANK": "13", "PMI_RANK": "13", "PMI_SIZE": "24"}
    assert dist.detect(env=env) == dist.detect(env=SLURM_ENV)
    # mpirun (Open MPI 5) inside an allocation: SLURM's variables describe other processes.
    env = {**SLURM_ENV, **OMPI5_ENV}
    with pytest.raises(DistributedError, match="Open MPI 5"):
        dist.detect(env=env)


TORCHRUN_ENV = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}


def test_torchrun_style_variables_are_used():
    assert dist.detect(env=TORCHRUN_ENV) == Layout(
        "torchrun", 8, 5, "node0:29500", local_device_ids=(1,)
    )
    # torchrun's agent serves its own store on MASTER_PORT: the coordinator takes the next port.
    env = {**TORCHRUN_ENV, "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "x"}
    assert dist.detect(env=env).coordinator_address == "node0:29501"
    no_master = {k: v for k, v in TORCHRUN_ENV.items() if not k.startswith("MASTER")}
    with pytest.raises(DistributedError, match=r"torchrun-style .*process 5 of 8"):
        dist.detect(env=no_master)


def test_ipv6_coordinator_from_open_mpi_is_bracketed():
    env = {
        **OMPI_ENV,
        "OMPI_MCA_orte_hnp_uri": "1314521088.0;tcp6://[fe80::b9b:ac5d:9cf0:b858,2620:10d:c083:150e::3000:2]:43370",
    }
    port = (1314521088 // 4096) % 4096 + 61440
    # The link-local address (no interface) cannot be reached from another host: the next one.
    assert dist.detect(env=env).coordinator_address == f"[2620:10d:c083:150e::3000:2]:{port}"
    only_link_local = {**OMPI_ENV, "OMPI_MCA_orte_hnp_uri": "1314521088.0;tcp6://[fe80::1]:43370"}
    with pytest.raises(DistributedError, match="no address another host can reach"):
        dist.detect(env=only_link_local)
    assert (
        dist.detect(env={**TORCHRUN_ENV, "MASTER_ADDR": "fd00::5"}).coordinator_address
        == "[fd00::5]:29500"
    )


@pytest.mark.parametrize(
    "address",
    ["fe80::1:1234", "[::1]", "[zz::1]:80", "node 1:80", "node1:0", "node1:65536", ":80", "node1:"],
)
def test_coordinator_addresses_the_layout_cannot_use_are_refused_in_one_line(address):
    with pytest.raises(
        DistributedError,
        match=r"coordinator address .* pass "
        r"--coordinator_address=HOST:PORT",
    ) as e:
        dist.detect(address, 2, 1, env={})
    assert "\n" not in str(e.value)


def test_ipv6_coordinator_addresses_in_brackets_are_accepted():
    assert dist.detect("[::1]:1234", 2, 1, env={}).coordinator_address == "[::1]:1234"
    assert (
        dist.detect("[fe80::1%eth0]:1234", 2, 1, env={}).coordinator_address
        == "[fe80::1%eth0]:1234"
    )


@pytest.mark.parametrize(
    "visible, extra, expected",
    [
        ("6,7", {}, (0, 1)),  # the scheduler bound 2 GPUs to this task: both
        ("GPU-1a2b,GPU-3c4d", {}, (0, 1)),  # UUIDs: positions among what the task sees
        ("GPU-1a2b", {}, (0,)),
        ("0,1,2,3,4,5,6,7", {"SLURM_LOCALID": "5"}, (5,)),  # the whole node visible: local rank
        ("2,3", {"SLURM_LOCALID": "1", "SLURM_GPUS_PER_TASK": "2"}, (0, 1)),  # --gpus-per-task
    ],
)
def test_gpu_binding_follows_what_the_process_can_see(visible, extra, expected):
    env = {**SLURM_ENV, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": visible, **extra}
    assert dist.detect(env=env).local_device_ids == expected


def test_detect_reads_only_the_environment_it_is_given(monkeypatch):
    class Untouchable(dict):
        def __getattribute__(self, name):
            raise AssertionError(f"os.environ.{name} used")

        def __getitem__(self, key):
            raise AssertionError(f"os.environ[{key!r}] read")

    import os

    with monkeypatch.context() as m:
        m.setattr(os, "environ", Untouchable())
        layout = dist.detect(env={**SLURM_ENV, "CUDA_VISIBLE_DEVICES": "6,7"})
        single = dist.detect(env={})
    assert layout.local_device_ids == (0, 1) and single == Layout("single")


def test_training_under_open_mpi_5_stops_with_the_launcher_line_not_a_single_process(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODEPERT_", "SLURM_"))}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodepert_dist.train",
            f"--workdir={tmp_path / 'w'}",
            f"--data_dir={tmp_path / 'no-data'}",
            "--num_epochs=1",
        ],
        env={**env, **OMPI5_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("error: Open MPI 5 (PRRTE/PMIx) started this as process 1 of 4")
    )
    assert not (tmp_path / "w").exists()  # nothing started: no lock, no run
