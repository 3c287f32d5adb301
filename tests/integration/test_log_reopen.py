"""SIGUSR1 on a daemonized ``twistd equalizer`` reopens its log file, as logrotate's
``postrotate kill -USR1`` expects, and the process stays alive (issue 13, section 3).

The daemon is not our child: it is found by its pidfile and stopped by that PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest_twisted
import yaml

from tests.integration.harness import (
    LOOPBACK,
    REPO,
    equalizer_config,
    free_port,
    get_json,
    twistd_command,
    wait_until,
)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to an init that does not reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1]
                           for line in status)
    except FileNotFoundError:
        return False


def start_daemon(directory: Path, document: dict) -> int:
    """``twistd --pidfile --logfile equalizer --config FILE`` (a daemon); its PID."""
    config = directory / "equalizer.yml"
    config.write_text(yaml.safe_dump(document))
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("EQUALIZER_")}
    env["PYTHONPATH"] = REPO
    parent = subprocess.run(
        [*twistd_command(), f"--pidfile={directory / 'twistd.pid'}",
         f"--logfile={directory / 'eq.log'}", "equalizer", "--config", str(config)],
        cwd=directory, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=60)
    assert parent.returncode == 0, (parent.stdout, parent.stderr)
    return int((directory / "twistd.pid").read_text())


@pytest_twisted.ensureDeferred
async def test_sigusr1_reopens_the_log_file_of_a_daemon(tmp_path, http, backends):
    """After the log file is moved away, SIGUSR1 makes the daemon write to a new file of the
    same name, with new lines; the daemon stays alive and still answers, and SIGTERM by
    the pidfile's PID then stops it and removes the pidfile."""
    admin_port = free_port()
    document = equalizer_config(
        [backends("b1").url],
        proxy={"listen": f"tcp:{free_port()}:interface={LOOPBACK}"},
        admin={"listen": f"tcp:{admin_port}:interface={LOOPBACK}"})
    admin = f"http://{LOOPBACK}:{admin_port}"
    pid = start_daemon(tmp_path, document)
    log_file, moved = tmp_path / "eq.log", tmp_path / "eq.log.1"
    try:
        await wait_until(lambda: log_file.exists() and "proxy listening" in log_file.read_text(),
                         message="the daemon's start-up lines")
        log_file.rename(moved)
        os.kill(pid, signal.SIGUSR1)
        await wait_until(lambda: log_file.exists() and "reopening" in log_file.read_text(),
                         message="a new log file after SIGUSR1")
        assert alive(pid)
        status, body = await get_json(http, admin + "/health")
        assert status == 200 and body["status"] == "ok"
        assert f"SIGUSR1: reopening log file {log_file}" in log_file.read_text()
        assert "reopening" not in moved.read_text()
        os.kill(pid, signal.SIGHUP)  # anything that logs: it goes to the new file
        await wait_until(lambda: "configuration reloaded" in log_file.read_text(),
                         message="a later line in the new file")
        assert "configuration reloaded" not in moved.read_text()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    await wait_until(lambda: not alive(pid), 15, message="the daemon to exit")
    assert not (tmp_path / "twistd.pid").exists()
    assert "Traceback" not in log_file.read_text() + moved.read_text()
