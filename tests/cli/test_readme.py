"""Every ```sh block of README.md runs as pasted, against `receiver serve --simulator` as
`make run` starts it (its own Redis, open mode on loopback, the simulator playing every
provider at its default pace).

A block that cannot run here says so on the line before it, ``<!-- not run: why -->``, and is
skipped by name and counted; every other one runs. The blocks of one ``## `` section run in
one bash session, in order, with ``set -euo pipefail`` (a variable set in one block is there
for the next). Two things differ from a reader's terminal, both stated here: the service is
on a free port instead of 8000 (``localhost:8000`` in a block becomes ``localhost:PORT``, and
the CLI gets ``RECEIVER_URL``), and ``curl`` is ``curl --fail-with-body``, so that an HTTP
error a reader would see on the screen fails the block instead of scrolling past.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from receiver.cli.redis_server import free_port
from tests.conftest import serve_process

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent  # .venv/bin: where `receiver` is, as after activate
NOT_RUN = re.compile(r"<!-- not run: (?P<why>\S.*?) -->")
LANGUAGES = {"sh", "json", "js", "python", "toml"}  # a new kind of block must be decided on here
# What runs and what is marked, per section: a new block, marked or not, changes these.
RUN = {"Quickstart": 1, "Submitting tasks": 4, "Images that last": 1, "Live events": 1}
SKIPPED = {"Quickstart": 1, "Development": 1}
# Seconds a block may take; a section gets this times its blocks (4 of them: within
# pytest-timeout's 120 s, so a block that hangs is named, with its output).
BLOCK_TIMEOUT = 25.0
# A little slower than the simulator's default (0.3 s, what `make run` plays): `receiver
# cancel` right after a submit must land while the task runs (about 2.5 s at this pace; the
# CLI starts in about 0.4 s, more on a loaded machine).
STEP_INTERVAL = "0.5"
# Only these of ours reach the service and the blocks: no developer setting leaks in.
PASSED_ON = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "USER")


@dataclass(frozen=True)
class Block:
    section: str
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # why, from its marker


def fences(text: str) -> Iterator[tuple[str, str, int, list[str], str]]:
    """(section, language, fence line, body lines, the line before the fence) per block."""
    lines = text.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")),
                       None)
            assert end is not None, f"README.md:{i + 1}: a block that never ends"
            yield section, line[3:].strip(), i + 1, lines[i + 1:end], lines[i - 1] if i else ""
            i = end
        i += 1


def sh_blocks(text: str) -> list[Block]:
    blocks = []
    for section, language, line, body, before in fences(text):
        assert language in LANGUAGES, f"README.md:{line}: a ```{language} block: run it or not?"
        if language == "sh":
            marker = NOT_RUN.fullmatch(before.strip())
            blocks.append(Block(section, line, "\n".join(body),
                                marker.group("why") if marker else None))
    return blocks


BLOCKS = sh_blocks(README.read_text())
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS if b.not_run is None))


def test_every_sh_block_is_run_or_marked_not_run() -> None:
    text = README.read_text()
    run = Counter(b.section for b in BLOCKS if b.not_run is None)
    skipped = Counter(b.section for b in BLOCKS if b.not_run is not None)
    assert dict(run) == RUN, "a ```sh block was added or removed: update RUN (and run it)"
    assert dict(skipped) == SKIPPED, "a block marked not run was added or removed: SKIPPED"
    # a marker stands right before the block it skips, never loose (or before another kind)
    assert len(NOT_RUN.findall(text)) == sum(SKIPPED.values())
    # what runs uses the service the test started: it neither installs nor serves
    for block in BLOCKS:
        if block.not_run is None:
            assert not re.search(r"^\s*(make|receiver serve)\b", block.code, re.M), block


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ON if k in os.environ}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {**env, **extra}


def child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass(frozen=True)
class Service:
    port: int
    log: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`receiver serve --simulator` (`make run`) on a free loopback port; stopped with
    SIGTERM at the end, its Redis and simulator with it."""
    root = tmp_path_factory.mktemp("readme")
    port = free_port()
    env = clean_env(RECEIVER_DATA_DIR=str(root / "data"), PORT=str(port),
                    SIMULATOR_STEP_INTERVAL=STEP_INTERVAL)
    proc = serve_process(port, env, root / "serve.log", "--simulator", inherit=False)
    children = child_pids(proc.pid)
    try:
        assert len(children) == 2, children  # redis-server and the simulator
        yield Service(port, root / "serve.log")
    finally:
        proc.terminate()
        proc.wait(60)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if alive(pid)], "a child outlived the service"


def block_marker(block: Block) -> str:
    return f"@@@ README.md:{block.line} @@@"


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_as_pasted(section: str, service: Service,
                                       tmp_path: Path) -> None:
    blocks = [b for b in BLOCKS if b.section == section and b.not_run is None]
    script = [
        "set -euo pipefail",
        'curl() { command curl --fail-with-body "$@"; }  # an HTTP error fails the block',
    ]
    for block in blocks:
        code = block.code.replace("localhost:8000", f"localhost:{service.port}")
        assert ":8000" not in code, f"README.md:{block.line} names port 8000 another way"
        script += [f"printf '\\n%s\\n' {shlex.quote(block_marker(block))}", code]
    path = tmp_path / "section.sh"
    path.write_text("\n".join(script) + "\n")
    env = clean_env(RECEIVER_URL=f"http://127.0.0.1:{service.port}")
    proc = subprocess.Popen(["bash", str(path)], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=BLOCK_TIMEOUT * len(blocks))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    finally:  # a block's leftovers (none expected): only the group of the bash we started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = output.decode(errors="replace")
    if timed_out or proc.returncode != 0:
        started = [b for b in blocks if block_marker(b) in text] or blocks[:1]
        failed = started[-1]
        since = text.rpartition(block_marker(failed))[2]
        how = "timed out" if timed_out else f"exit status {proc.returncode}"
        log_tail = "\n".join(service.log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"README.md:{failed.line} ({section}) {how}\n--- the block:\n"
                    f"{failed.code}\n--- its output:\n{since.strip()}\n"
                    f"--- the service's log, last lines:\n{log_tail}", pytrace=False)
