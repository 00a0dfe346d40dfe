"""Launcher detection from literal environments, rendezvous, and the layout check in initialize."""
import ipaddress
import sys

import pytest
import torch.distributed as dist

from launcher.env import LaunchEnv, detect
from launcher.init import initialize
from launcher.rendezvous import RendezvousError, rendezvous, slurm_port
from parallel.topology import TopologyError

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1"}
MPICH = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
# What an `sbatch` job step leaves in every process that `mpirun` (or torchrun) starts inside it.
SBATCH = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
          "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "1", "SLURM_JOB_ID": "777"}


def test_torchrun():
    assert detect(TORCHRUN) == LaunchEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1,
                                         master_addr="10.1.2.3", master_port=29500, launcher="torchrun")


def test_torchrun_without_group_rank_derives_the_node_from_the_rank():
    env = detect({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.launcher) == \
        (6, 8, 2, 4, 1, "torchrun")
    assert (env.master_addr, env.master_port) == (None, None)


def test_open_mpi():
    assert detect(OPENMPI) == LaunchEnv(rank=6, world_size=8, local_rank=2, local_world_size=4, node_rank=1,
                                        launcher="openmpi")


def test_mpich_and_intel_mpi():
    assert detect(MPICH) == LaunchEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1,
                                      launcher="mpich")


def test_pmix_with_pmix_size():
    env = detect({"PMIX_RANK": "2", "PMIX_SIZE": "4"})
    assert (env.rank, env.world_size, env.launcher) == (2, 4, "pmix")


def test_pmix_takes_the_size_from_slurm_ntasks():
    env = detect({"PMIX_RANK": "3", "SLURM_NTASKS": "6"})
    assert (env.rank, env.world_size, env.launcher) == (3, 6, "pmix")


def test_pmix_without_a_size_fails():
    with pytest.raises(ValueError, match="PMIX_SIZE"):
        detect({"PMIX_RANK": "0"})


def test_slurm():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                  "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "4242"})
    assert env == LaunchEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, launcher="slurm",
                            nodes=("gpu01", "gpu02"), job_id="4242")


def test_slurm_uneven_tasks_per_node():
    env = detect({"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                  "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "3,2", "SLURM_JOB_ID": "9"})
    assert (env.local_world_size, env.node_rank, env.nodes) == (2, 1, ("n1", "n2"))


def test_slurm_step_variables_win_over_the_job_ones():
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
                  "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]",
                  "SLURM_TASKS_PER_NODE": "4(x4)", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"})
    assert (env.nodes, env.local_world_size) == (("n3", "n4"), 1)


def test_no_variables_is_one_process():
    env = detect({})
    assert env == LaunchEnv()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_open_mpi_inside_sbatch_uses_the_mpi_rank():
    env = detect({**SBATCH, **OPENMPI})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.launcher) == \
        (6, 8, 2, 4, 1, "openmpi")


def test_mpich_inside_sbatch_uses_the_mpi_rank():
    env = detect({**SBATCH, **MPICH})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (3, 4, 1, 2, "mpich")


def test_torchrun_inside_sbatch_uses_torchrun():
    env = detect({**SBATCH, **TORCHRUN})
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.launcher) == (5, 8, 1, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 29500)


@pytest.mark.parametrize("environ, name", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1.5"},
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ({"PMI_RANK": "r1", "PMI_SIZE": "2"}, "PMI_RANK"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "n"}, "SLURM_NTASKS"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT"),
])
def test_non_integer_value_names_the_variable(environ, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b.*not an integer"):
        detect(environ)


def test_missing_world_size_is_named():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_SIZE is missing"):
        detect({"OMPI_COMM_WORLD_RANK": "0"})


# rendezvous


def test_slurm_port_is_deterministic_in_range_and_differs_by_step():
    port = slurm_port("12345")
    assert port == slurm_port("12345") == slurm_port("12345", "0")
    assert 20000 <= port < 60000
    assert slurm_port("12345", "1") != port
    assert 20000 <= slurm_port("12345", "1") < 60000
    assert slurm_port("12346") != port


def test_slurm_port_needs_a_job_id():
    with pytest.raises(RendezvousError, match="SLURM_JOB_ID"):
        slurm_port(None)


def test_explicit_master_addr_and_port_win():
    env = LaunchEnv(rank=1, world_size=4, launcher="slurm", master_addr="10.0.0.5", master_port=29500,
                    nodes=("gpu01",), job_id="1")
    assert rendezvous(env) == ("10.0.0.5", 29500)
    assert rendezvous(detect(TORCHRUN)) == ("10.1.2.3", 29500)


def test_world_of_one_needs_no_rendezvous():
    assert rendezvous(LaunchEnv()) == (None, None)
    assert rendezvous(LaunchEnv(launcher="slurm")) == (None, None)


def test_slurm_uses_the_first_node_and_a_port_from_the_job():
    env = detect({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
                  "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "12345"})
    addr, port = rendezvous(env, "3")
    assert ipaddress.ip_address(addr).is_loopback
    assert port == slurm_port("12345", "3")


def test_slurm_keeps_an_explicit_port():
    env = LaunchEnv(rank=0, world_size=2, launcher="slurm", master_port=31000, nodes=("localhost",), job_id="5")
    addr, port = rendezvous(env)
    assert ipaddress.ip_address(addr).is_loopback
    assert port == 31000


def test_slurm_without_a_node_list_fails():
    with pytest.raises(RendezvousError, match="MASTER_ADDR"):
        rendezvous(LaunchEnv(rank=0, world_size=2, launcher="slurm", job_id="5"))


@pytest.mark.parametrize("launcher", ["mpich", "openmpi", "pmix"])
def test_mpi_without_mpi4py_asks_for_master_addr_or_mpi4py(monkeypatch, launcher):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(RendezvousError) as info:
        rendezvous(LaunchEnv(launcher=launcher, world_size=4, rank=1))
    assert "MASTER_ADDR" in str(info.value)
    assert "mpi4py" in str(info.value)


def test_torchrun_without_master_addr_fails():
    env = detect({"RANK": "1", "WORLD_SIZE": "4"})
    assert env.world_size == 4
    with pytest.raises(RendezvousError, match="MASTER_ADDR"):
        rendezvous(env)


# initialize


def test_bad_layout_fails_before_any_process_group():
    assert not dist.is_initialized()
    with pytest.raises(TopologyError, match="world size 4 is not divisible by tp\\*pp=3\\*1"):
        initialize(tp=3, env=LaunchEnv(world_size=4))
    assert not dist.is_initialized()
