"""One writer per output: output_lock across processes, and what a killed holder leaves behind."""

import json
import socket
import subprocess
import sys
import time

import pytest

from pipeline import PipelineError
from pipeline.io import lock_path_for, output_lock

HOLD = "import sys, time; from pipeline.io import output_lock\nwith output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)"


def test_a_second_process_fails_naming_the_holder_and_gets_the_lock_once_it_is_killed(tmp_path):
    out = tmp_path / "sub dir" / "shard.parquet"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # bounded: the child prints at once or dies
        assert json.loads(lock_path_for(out).read_text()) == {"pid": holder.pid, "host": socket.gethostname()}
        with pytest.raises(PipelineError) as error:
            with output_lock(out):
                pytest.fail("took a lock another process holds")
        message = str(error.value)
        assert message.startswith(f"{tmp_path}/sub dir/shard.parquet.lock is held by pid {holder.pid} on host {socket.gethostname()}")
        assert "\n" not in message and str(out) in message
    finally:
        holder.kill()
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            with output_lock(out) as lock_path:
                assert json.loads(lock_path.read_text())["pid"] != holder.pid
            break
        except PipelineError:
            if time.monotonic() > deadline:
                pytest.fail("the lock of a killed process was not released within 10 s")
            time.sleep(0.1)
    assert not out.exists()  # the lock is beside the output, never the output itself


def test_the_lock_is_released_when_the_block_ends_even_by_an_error(tmp_path):
    out = tmp_path / "tokens"
    with pytest.raises(RuntimeError, match="boom"):
        with output_lock(out):
            raise RuntimeError("boom")
    with output_lock(out) as lock_path:
        assert lock_path == tmp_path / "tokens.lock"
