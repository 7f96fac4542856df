"""Run one test in a fresh interpreter when it measures process-wide state.

Some tests assert on what a whole process holds (OS threads of gloo groups, Megatron's
process-wide MoE trackers). Earlier in-process tests of the same pytest session leave such state
behind, so in the full suite these tests failed for reasons that are not theirs. ``rerun_isolated``
re-runs the calling test alone in a new ``pytest`` process and reports its result; inside that
process it returns False and the test body runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

_ENV = "MEGASPAN_TEST_ISOLATED"


def rerun_isolated(request, timeout: float = 600.0) -> bool:
    """True (after asserting the isolated run passed) in the parent; False in the isolated child."""
    if os.environ.get(_ENV) == "1":
        return False
    node = request.node.nodeid
    env = {**os.environ, _ENV: "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", node],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=request.config.rootpath,
    )
    assert out.returncode == 0, f"isolated run of {node} failed:\n{out.stdout[-4000:]}{out.stderr[-2000:]}"
    return True
