"""The load-and-faults run of bench/load_faults.py against the shared server, bounded for CI:
hundreds of concurrent mixed streams, more distinct specs than --max-steering-configs admits
at once, hostile bodies and clients that leave mid-stream; the server must answer every request
as expected and return to idle (no admitted config, no worker slot held). The script's kill -9
phase is covered by tests/test_batch_crash.py."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import API_KEY, ROOT


def test_load_and_faults_leave_the_server_idle(server):
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_faults.py"), "--base-url", server.base_url, "--api-key", API_KEY,
         "--requests", "240", "--concurrency", "96", "--distinct-specs", "80"],
        capture_output=True, text=True, timeout=900,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all checks passed" in run.stdout
    assert "worker slots in use 0" in run.stdout and "admitted configs 0" in run.stdout
