"""The test set-up: `scripts/test` installs what the suite needs before it runs pytest, and pytest run without
the browser stops at collection when the selected tests need it.

The script runs in a copy of its own tree, with stand-ins for apt-get, sudo, python3.10 and the project's python
on a PATH of their own, and in a user namespace (`unshare`) as root or as another user: it installs nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BASH = shutil.which("bash")
MISSING = "/nonexistent/chromium"
# The project's python, stood in for: it shows what scripts/test hands to pytest.
FAKE_PYTHON = """echo "ran: $*"
echo "CELLAR_OMERO_PYTHON=${CELLAR_OMERO_PYTHON-}"
echo "CELLAR_OMERO_SKIP=${CELLAR_OMERO_SKIP-}"
"""


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CELLAR_CHROMIUM=MISSING)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_without_the_browser_pytest_stops_at_collection_with_one_message(workers):
    r = _pytest("tests/test_viewer.py", "-k", "page_filter or palette_lookup", *workers)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert (f"{MISSING} is not installed and 1 selected test needs it: run scripts/test, which installs Debian's "
            "chromium, or apt-get install chromium") in out
    assert "1 error" in out and " passed" not in out and "Traceback" not in out, out


def test_tests_that_need_no_browser_run_without_it():
    r = _pytest("tests/test_viewer.py", "-k", "palette_lookup")  # the page tests are collected, then deselected
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout and "error" not in r.stdout.lower(), r.stdout


@pytest.mark.parametrize("python, fragment", [
    ("/nonexistent/python", "OMERO's python /nonexistent/python does not run: "),
    (sys.executable, f"OMERO's python {sys.executable} cannot import omero.hdfstorageV2 and tables: "),
])
def test_a_named_omero_python_that_does_not_work_fails_the_reader_test(python, fragment):
    env = dict(os.environ, CELLAR_OMERO_PYTHON=python)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_export.py", "-k",
                        "omero_reads"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "1 failed" in r.stdout and fragment in r.stdout, r.stdout + r.stderr


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!{BASH}\n{body}")
    path.chmod(0o755)


def _tree(tmp: Path, tools: dict[str, str]) -> tuple[Path, Path]:
    """A copy of scripts/test in a tree of its own, with a stand-in .venv/bin/python, and a bin/ directory that
    holds the only commands on PATH: a few real ones the script and the stand-ins use, and `tools` (name: the
    stand-in's bash). Returns the tree and bin/."""
    (tmp / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "test", tmp / "scripts" / "test")
    (tmp / ".venv" / "bin").mkdir(parents=True)
    _stub(tmp / ".venv" / "bin" / "python", FAKE_PYTHON)
    bin_ = tmp / "bin"
    bin_.mkdir()
    for name in ("dirname", "id", "env", "sort", "rm", "flock", "mkdir", "cat", "chmod", "touch", "grep"):
        (bin_ / name).symlink_to(shutil.which(name))
    for name, body in tools.items():
        _stub(bin_ / name, body)
    return tmp, bin_


def _run(tree: Path, bin_: Path, as_root: bool, *args: str, **env: str) -> subprocess.CompletedProcess:
    user = ["--map-root-user"] if as_root else []  # in a user namespace: root there, or the overflow user
    env = {"PATH": str(bin_), "HOME": str(tree), **env}
    return subprocess.run([shutil.which("unshare"), "--user", *user, BASH, str(tree / "scripts" / "test"), *args],
                          cwd="/", env=env, capture_output=True, text=True, timeout=60)


def test_as_root_it_installs_chromium_with_apt_then_runs_pytest_with_its_arguments(tmp_path):
    chromium = tmp_path / "chromium"
    # apt-get's stand-in logs its arguments and "installs" the browser
    tree, bin_ = _tree(tmp_path, {"apt-get": f'echo "apt-get $*" >> {tmp_path}/log\n'
                                             f'if [ "$1" = install ]; then touch {chromium}; chmod +x {chromium}; fi\n'})
    r = _run(tree, bin_, True, "tests/test_cli.py", "-k", "foo", CELLAR_CHROMIUM=str(chromium),
             CELLAR_OMERO_PYTHON="/some/python")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "log").read_text().splitlines() == ["apt-get update -qq", "apt-get install -y -qq chromium"]
    assert r.stdout.splitlines() == [
        "scripts/test: installing Debian's chromium with apt-get (for the viewer's page tests)",
        "ran: -m pytest -n auto tests/test_cli.py -k foo",
        "CELLAR_OMERO_PYTHON=/some/python",
        "CELLAR_OMERO_SKIP="]


def test_a_user_with_sudo_installs_through_it_and_a_browser_still_missing_stops_the_run(tmp_path):
    tree, bin_ = _tree(tmp_path, {"sudo": f'echo "sudo $*" >> {tmp_path}/log\n'})
    r = _run(tree, bin_, False, CELLAR_CHROMIUM=MISSING)
    assert r.returncode == 1
    assert (tmp_path / "log").read_text().splitlines() == [
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"]
    assert r.stdout == "scripts/test: installing Debian's chromium with apt-get through sudo (for the viewer's page tests)\n"
    assert r.stderr == f"scripts/test: apt-get installed chromium, but {MISSING} is still missing\n"


def test_a_user_without_sudo_is_told_the_command_to_run_before_pytest(tmp_path):
    tree, bin_ = _tree(tmp_path, {})
    r = _run(tree, bin_, False, CELLAR_CHROMIUM=MISSING)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"scripts/test: {MISSING} is missing and only root can install it: run 'apt-get update && "
                        "apt-get install -y chromium' as root, then scripts/test again\n")


def test_when_all_is_set_up_it_prints_nothing_of_its_own(tmp_path):
    tree, bin_ = _tree(tmp_path, {})
    (tree / ".venv-omero" / "bin").mkdir(parents=True)
    _stub(tree / ".venv-omero" / "bin" / "python", "exit 0\n")  # imports omero and tables
    r = _run(tree, bin_, True, "-x", CELLAR_CHROMIUM=shutil.which("id"))
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines() == ["ran: -m pytest -n auto -x", f"CELLAR_OMERO_PYTHON={tree}/.venv-omero/bin/python",
                                     "CELLAR_OMERO_SKIP="]


def test_without_python_3_10_the_omero_test_is_skipped_loudly(tmp_path):
    # no python3.10 on PATH, no pyenv, an empty HOME
    tree, bin_ = _tree(tmp_path, {})
    r = _run(tree, bin_, True, CELLAR_CHROMIUM=shutil.which("id"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["ran: -m pytest -n auto", "CELLAR_OMERO_PYTHON="]
    reason = lines[2].removeprefix("CELLAR_OMERO_SKIP=")
    assert reason.startswith("NO PYTHON 3.10 ON THIS MACHINE") and "OMERO's own reader" in reason
    assert r.stderr == f"scripts/test: WARNING: {reason}\n"


def _python310(tmp: Path, pip_fails: bool = False) -> dict[str, str]:
    """python3.10's stand-in: it makes a venv whose python logs its arguments, and imports omero once pip has
    installed it (or fails the install)."""
    venv_python = (f'echo "$*" >> {tmp}/log\n'
                   + (f'if [ "$3" = install ] && grep -q omero-py <<< "$*"; then exit 1; fi\n' if pip_fails else "")
                   + f'if [ "$1" = -c ]; then grep -q omero-py {tmp}/log; fi\n')
    return {"python3.10": f'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"\n'
                          f"cat > \"$3/bin/python\" <<'EOF'\n#!{BASH}\n{venv_python}EOF\n"
                          'chmod +x "$3/bin/python"; fi\n'}


def _broken_omero_venv(tree: Path) -> None:
    (tree / ".venv-omero" / "bin").mkdir(parents=True)
    _stub(tree / ".venv-omero" / "bin" / "python", "exit 1\n")  # a build that was stopped halfway


def _without_waiting(stdout: str) -> list[str]:
    # whether pytest's stand-in outlasts the background build is up to the scheduler
    return [line for line in stdout.splitlines() if not line.startswith("scripts/test: waiting for the .venv-omero")]


def test_a_broken_omero_environment_is_rebuilt_in_the_background_with_python_3_10(tmp_path):
    tree, bin_ = _tree(tmp_path, _python310(tmp_path))
    _broken_omero_venv(tree)
    r = _run(tree, bin_, True, CELLAR_CHROMIUM=shutil.which("id"))
    assert r.returncode == 0, r.stderr
    lines = _without_waiting(r.stdout)
    assert lines[0].startswith(f"scripts/test: building .venv-omero with {bin_}/python3.10 in the background"), lines
    assert lines[1:] == ["ran: -m pytest -n auto", f"CELLAR_OMERO_PYTHON={tree}/.venv-omero/bin/python",
                         "CELLAR_OMERO_SKIP="]
    assert (tmp_path / "log").read_text().splitlines() == [
        "-m pip install --quiet --upgrade pip", "-m pip install --quiet omero-py>=5.23,<6 tables",
        "-c import omero.hdfstorageV2, tables"]


def test_a_failed_build_fails_the_run_and_names_its_log(tmp_path):
    tree, bin_ = _tree(tmp_path, _python310(tmp_path, pip_fails=True))
    _broken_omero_venv(tree)
    r = _run(tree, bin_, True, CELLAR_CHROMIUM=shutil.which("id"))
    assert r.returncode == 1
    assert "ran: -m pytest -n auto" in r.stdout  # the tests ran all the same
    assert r.stderr == "scripts/test: building .venv-omero failed: see .venv-omero.log\n"


def test_while_another_run_builds_the_environment_none_is_started(tmp_path):
    tree, bin_ = _tree(tmp_path, _python310(tmp_path))
    _broken_omero_venv(tree)
    with open(tree / ".venv-omero.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the other run's build holds it
        r = _run(tree, bin_, True, CELLAR_CHROMIUM=shutil.which("id"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "scripts/test: .venv-omero is being built by another run (log: .venv-omero.log): OMERO's reader test waits "
        "for it", "ran: -m pytest -n auto", f"CELLAR_OMERO_PYTHON={tree}/.venv-omero/bin/python", "CELLAR_OMERO_SKIP="]
    assert not (tmp_path / "log").exists()
