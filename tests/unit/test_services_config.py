"""What `ulens services up` and docker-compose.yml configure Redis with (README, "Durability").

The behaviour itself (AOF on, a kill -9 loses nothing, a change of setting keeps the data)
is tested against real redis-servers in tests/integration/test_services_lifecycle.py and
tests/faults/test_service_faults.py."""
from pathlib import Path

import pytest
import yaml

import config as cfg
from ulens import services as svc

REPO = Path(__file__).resolve().parents[2]


def conf_lines(appendfsync=None) -> list[str]:
    s = cfg.load(env={}).services
    if appendfsync is not None:
        s = cfg.load(env={}).replace(services={"redis_appendfsync": appendfsync}).services
    return svc._redis_conf(s, Path("/data")).splitlines()


def test_shipped_redis_is_durable():
    lines = conf_lines()
    assert cfg.load(env={}).services.redis_appendfsync == "everysec"
    assert {"appendonly yes", "appendfsync everysec", "aof-use-rdb-preamble yes",
            "no-appendfsync-on-rewrite no", "maxmemory-policy noeviction"} <= set(lines)


@pytest.mark.parametrize("setting, want, absent", [
    ("always", {"appendonly yes", "appendfsync always"}, set()),
    ("off", {"appendonly no"}, {"appendfsync everysec", "aof-use-rdb-preamble yes"}),
])
def test_each_setting(setting, want, absent):
    lines = set(conf_lines(setting))
    assert want <= lines and not absent & lines
    assert "save 300 1 60 1000" in lines       # snapshots in every mode


def test_docker_compose_redis_is_durable():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    cmd = compose["services"]["redis"]["command"]
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "redis-server"
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] == "everysec"
    assert opts["--maxmemory-policy"] == "noeviction"


def test_a_spawned_service_is_alive_at_once(tmp_path):
    """`up` waits for a service by asking whether its pid still runs it (_alive); right after
    Popen, /proc/PID/cmdline can still read empty (the kernel inside exec: 11 of 20 here)."""
    import os
    import signal
    pids = []
    try:
        for i in range(20):
            pids.append(svc._spawn(["sleep", "30"], tmp_path / "log", tmp_path / f"{i}.pid", tmp_path))
            assert svc._alive(pids[-1], "sleep"), i
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_port_held_by_our_dying_process_is_waited_for(monkeypatch):
    """After a kill -9 the main thread shows as a zombie while the other threads still hold
    the listening socket (20 of 30 redis-servers): `up` right then waits instead of
    reporting a foreign process; a port held by anything else is reported at once."""
    import os
    answers = iter([True, True, True, False])
    monkeypatch.setattr(svc, "_port_open", lambda port: next(answers))
    svc._check_port_free(1234, "Redis", last_pid=os.getpid())     # still in /proc: waited for
    monkeypatch.setattr(svc, "_port_open", lambda port: True)
    with pytest.raises(svc.PortInUse):
        svc._check_port_free(1234, "Redis")                        # nothing of ours was there
    with pytest.raises(svc.PortInUse):
        svc._check_port_free(1234, "Redis", last_pid=2 ** 22 + 1)  # ours, gone: someone else's now
