"""Who am I and where is everyone, from the launcher's environment variables."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "single"


def _int(env, name, default=0):
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect(env=None) -> LaunchEnv:
    """torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR), else one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        local_world = _int(env, "LOCAL_WORLD_SIZE", 1)
        return LaunchEnv(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE", 1),
                         local_rank=_int(env, "LOCAL_RANK"), local_world_size=local_world,
                         node_rank=_int(env, "GROUP_RANK", _int(env, "RANK") // max(local_world, 1)),
                         master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT", 0) or None,
                         launcher="torchrun")
    return LaunchEnv()
