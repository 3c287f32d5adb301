"""The deployment examples in deploy/: parsed always, and exercised with the real tools
where the machine has them (systemd-analyze, logrotate, a container builder)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from equalizer.config.model import Timeouts

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
INSTALLED_TWISTD = "/opt/equalizer/bin/twistd"
TIMEOUT = 60


def twistd() -> str:
    """The twistd next to this interpreter."""
    path = Path(sys.executable).with_name("twistd")
    if not path.exists():
        pytest.skip("no twistd script next to this interpreter")
    return str(path)


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit's sections, each a list of (key, value) in order (keys may repeat);
    continuation lines (a trailing backslash) joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, separator, value = line.partition("=")
        assert current is not None and separator, f"not a unit file line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in entries if name == key]


# -- the systemd unit ------------------------------------------------------------------------


UNIT = DEPLOY / "equalizer.service"


def test_unit_runs_twistd_in_the_foreground_reloads_with_hup_and_waits_for_the_drain() -> None:
    service = unit_entries(UNIT.read_text())["Service"]
    (start,) = values(service, "ExecStart")
    assert shlex.split(start)[:2] == [INSTALLED_TWISTD, "--nodaemon"]
    assert "equalizer" in shlex.split(start)
    assert values(service, "ExecReload")[-1] == "/bin/kill -HUP $MAINPID"
    assert float(values(service, "TimeoutStopSec")[0]) > Timeouts().shutdown
    assert values(service, "KillSignal") == ["SIGTERM"]
    assert values(service, "User") not in ([], ["root"])


def test_unit_check_command_accepts_the_shipped_configuration(tmp_path: Path) -> None:
    """The unit's ExecStartPre (--check) passes on config/equalizer.yml: start and reload
    would go ahead."""
    service = unit_entries(UNIT.read_text())["Service"]
    (check,) = values(service, "ExecStartPre")
    command = [twistd() if word == INSTALLED_TWISTD else word for word in shlex.split(check)]
    command[command.index("--config") + 1] = str(REPO / "config" / "equalizer.yml")
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("EQUALIZER_")}
    environment["PYTHONPATH"] = str(REPO)
    outcome = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True,
                             text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout.splitlines()[-1].startswith("configuration OK: ")


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own checks, with the install path pointed at this machine's twistd."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "equalizer.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_TWISTD, twistd()))
    outcome = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                             timeout=TIMEOUT, cwd=tmp_path)
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr
    assert outcome.stderr == "", outcome.stderr


# -- the container file -------------------------------------------------------------------------


CONTAINERFILE = DEPLOY / "Containerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """A Containerfile's instructions (upper case) and arguments, continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


KNOWN = {"FROM", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL",
         "ENTRYPOINT", "CMD", "ENV", "ARG", "LABEL"}


def test_containerfile_runs_as_a_user_checks_health_and_copies_what_exists() -> None:
    steps = instructions(CONTAINERFILE.read_text())
    assert {word for word, _ in steps} <= KNOWN
    assert steps[0][0] == "FROM"
    user = [argument for word, argument in steps if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    (health,) = [argument for word, argument in steps if word == "HEALTHCHECK"]
    assert "/health" in health
    for word, argument in steps:
        if word == "COPY":
            *sources, _ = shlex.split(argument)
            assert all((REPO / source).exists() for source in sources), argument
        if word in ("ENTRYPOINT", "CMD", "HEALTHCHECK") and "[" in argument:
            json.loads(argument[argument.index("["):])  # exec form is JSON
    (entrypoint,) = [argument for word, argument in steps if word == "ENTRYPOINT"]
    assert "--nodaemon" in entrypoint and "equalizer" in entrypoint
    assert [argument for word, argument in steps if word == "STOPSIGNAL"] == ["SIGTERM"]


def test_containerfile_builds(tmp_path: Path) -> None:
    """Built only where a builder is there and may fetch its base image and packages
    (EQUALIZER_TEST_CONTAINER_BUILD=1): the build reaches the network."""
    builder = shutil.which("podman") or shutil.which("docker")
    if builder is None or os.environ.get("EQUALIZER_TEST_CONTAINER_BUILD") != "1":
        pytest.skip("no container builder, or EQUALIZER_TEST_CONTAINER_BUILD is not 1")
    outcome = subprocess.run([builder, "build", "-f", str(CONTAINERFILE), "-t",
                              "equalizer-test", str(REPO)], capture_output=True, text=True,
                             timeout=1800)
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr


# -- the logrotate snippet -----------------------------------------------------------------------


LOGROTATE = DEPLOY / "equalizer.logrotate"
LOG = "/var/log/equalizer/equalizer.log"
PIDFILE = "/run/equalizer/equalizer.pid"


def test_logrotate_snippet_signals_usr1_after_rotating() -> None:
    text = LOGROTATE.read_text()
    assert f"{LOG} {{" in text
    postrotate = text.split("postrotate", 1)[1].split("endscript", 1)[0]
    assert "kill -USR1" in postrotate and PIDFILE in postrotate


def test_logrotate_rotates_and_sends_usr1(tmp_path: Path) -> None:
    """logrotate, forced, on a copy pointed at a temporary log and pidfile: the file is
    moved away and the process named by the pidfile gets SIGUSR1."""
    logrotate = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)
    if logrotate is None:
        pytest.skip("logrotate is not installed")
    log, pidfile = tmp_path / "equalizer.log", tmp_path / "equalizer.pid"
    log.write_text("a line\n")
    config = tmp_path / "equalizer.logrotate"
    config.write_text(LOGROTATE.read_text().replace(LOG, str(log)).replace(PIDFILE, str(pidfile)))
    waiter = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, "
         "{signal.SIGUSR1}); print('ready', flush=True); "
         "print(signal.Signals(signal.sigwait({signal.SIGUSR1})).name, flush=True)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert waiter.stdout.readline() == "ready\n"
        pidfile.write_text(str(waiter.pid))
        outcome = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"),
                                  str(config)], capture_output=True, text=True, timeout=TIMEOUT)
        assert outcome.returncode == 0, outcome.stderr
        assert waiter.stdout.readline() == "SIGUSR1\n"
        assert waiter.wait(TIMEOUT) == 0
    finally:
        if waiter.poll() is None:
            os.kill(waiter.pid, signal.SIGKILL)
            waiter.wait()
    assert not log.exists()
    assert (tmp_path / "equalizer.log.1").read_text() == "a line\n"
