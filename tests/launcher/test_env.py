"""Launcher detection from literal environments, rendezvous, and the layout check in initialize."""
import ipaddress
import sys

import pytest
import torch.distributed as dist

from launcher.env import LaunchEnv, detect
from launcher.init import initialize
from launcher.rendezvous import RendezvousError, rendezvous, slurm_port
from parallel.topology import TopologyError

# Every launcher's five numbers (rank, world size, local rank, local world size, node rank)
# differ from each other, and each differs from the same number of every other launcher here:
# reading the wrong variable, or another launcher's, gives a wrong answer, never the right one by
# coincidence (SLURM_LOCALID equal to SLURM_NODEID once hid a local rank read from the node id).
TORCHRUN = {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "3",
            "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "9", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "OMPI_COMM_WORLD_NODE_RANK": "1"}
MPICH = {"PMI_RANK": "15", "PMI_SIZE": "18", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "6"}
PMIX = {"PMIX_RANK": "37", "PMIX_SIZE": "40", "PMIX_LOCAL_RANK": "5", "PMIX_LOCAL_SIZE": "8", "PMIX_NODE_RANK": "4"}
SLURM = {"SLURM_PROCID": "51", "SLURM_NTASKS": "54", "SLURM_LOCALID": "6", "SLURM_NODEID": "5",
         "SLURM_JOB_NODELIST": "gpu[01-06]", "SLURM_TASKS_PER_NODE": "9(x6)", "SLURM_JOB_ID": "4242"}
LAUNCHERS = {"torchrun": TORCHRUN, "openmpi": OPENMPI, "mpich": MPICH, "pmix": PMIX, "slurm": SLURM}
# (rank, world size, local rank, local world size, node rank) of each, worked out by hand
EXPECTED = {"torchrun": (13, 16, 1, 4, 3), "openmpi": (5, 9, 2, 3, 1), "mpich": (15, 18, 3, 6, 2),
            "pmix": (37, 40, 5, 8, 4), "slurm": (51, 54, 6, 9, 5)}
# What an `sbatch` job step leaves in every process that `mpirun` (or torchrun) starts inside it:
# the job step's one task, whose numbers are none of the launchers' above.
SBATCH = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
          "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "1", "SLURM_JOB_ID": "777"}


def _fields(env: LaunchEnv) -> tuple:
    """(rank, world size, local rank, local world size, node rank)"""
    return env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank


def test_no_two_numbers_of_the_literal_environments_coincide():
    """The premise of the tests below, checked so that an edit of the literals cannot lose it."""
    for name, values in EXPECTED.items():
        assert len(set(values)) == 5, f"{name}: {values}"
    for i in range(5):
        column = [values[i] for values in EXPECTED.values()]
        assert len(set(column)) == len(column), f"field {i} repeats across launchers: {column}"
    sbatch = (0, 1, 0, 1, 0)
    assert all(values[i] != sbatch[i] for values in EXPECTED.values() for i in range(5))


def test_torchrun():
    assert _fields(detect(TORCHRUN)) == EXPECTED["torchrun"]
    assert detect(TORCHRUN) == LaunchEnv(*EXPECTED["torchrun"], master_addr="10.1.2.3", master_port=29500,
                                         launcher="torchrun")


def test_torchrun_without_group_rank_derives_the_node_from_the_rank():
    env = detect({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.launcher) == \
        (6, 8, 2, 4, 1, "torchrun")
    assert (env.master_addr, env.master_port) == (None, None)


def test_open_mpi():
    assert _fields(detect(OPENMPI)) == EXPECTED["openmpi"]
    assert detect(OPENMPI) == LaunchEnv(*EXPECTED["openmpi"], launcher="openmpi")


def test_mpich_and_intel_mpi():
    assert _fields(detect(MPICH)) == EXPECTED["mpich"]
    assert detect(MPICH) == LaunchEnv(*EXPECTED["mpich"], launcher="mpich")


def test_pmix():
    assert _fields(detect(PMIX)) == EXPECTED["pmix"]
    assert detect(PMIX) == LaunchEnv(*EXPECTED["pmix"], launcher="pmix")


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
    assert _fields(detect(SLURM)) == EXPECTED["slurm"]
    assert detect(SLURM) == LaunchEnv(*EXPECTED["slurm"], launcher="slurm",
                                      nodes=tuple(f"gpu{i:02d}" for i in range(1, 7)), job_id="4242")


def test_slurm_uneven_tasks_per_node():
    # node 1 of three runs 3 tasks (nodes 0 and 2 run 2 and 1): the count of the right node
    env = detect({"SLURM_PROCID": "4", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
                  "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2,3,1", "SLURM_JOB_ID": "9"})
    assert _fields(env) == (4, 6, 2, 3, 1)
    assert env.nodes == ("n1", "n2", "n3")


def test_slurm_step_variables_win_over_the_job_ones():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
                  "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]",
                  "SLURM_TASKS_PER_NODE": "4(x4)", "SLURM_STEP_TASKS_PER_NODE": "3(x2)"})
    assert (env.nodes, env.local_world_size) == (("n3", "n4"), 3)
    assert _fields(env) == (5, 6, 2, 3, 1)


def test_no_variables_is_one_process():
    env = detect({})
    assert env == LaunchEnv()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize("launcher", ["openmpi", "mpich", "pmix", "torchrun"])
def test_a_launcher_inside_sbatch_uses_its_own_rank(launcher):
    """mpirun or torchrun inside an sbatch job: the job step's SLURM variables are set too."""
    env = detect({**SBATCH, **LAUNCHERS[launcher]})
    assert (*_fields(env), env.launcher) == (*EXPECTED[launcher], launcher)
    assert env == detect(LAUNCHERS[launcher])


@pytest.mark.parametrize("launcher", ["openmpi", "mpich", "pmix", "torchrun"])
def test_a_launcher_beside_a_full_slurm_environment_reads_its_own(launcher):
    """Beside SLURM variables of other (non-trivial) values, each launcher still reads its own."""
    assert detect({**SLURM, **LAUNCHERS[launcher]}) == detect(LAUNCHERS[launcher])
    assert _fields(detect({**SLURM, **LAUNCHERS[launcher]})) == EXPECTED[launcher]


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
