"""Random stops, kills, pauses and restarts of both agents under constant client traffic (tools/chaos.py).

The tool keeps a private agent pair busy with `vbridge-loadgen` clients and, every 0.05-1.5 s, sends SIGTERM
or SIGKILL to either agent, SIGTERM to both together, or pauses one (SIGSTOP) for up to 3 s; a stopped agent
is started again at once. It fails on an agent that exits unasked, a nonzero exit after SIGTERM, a stop or a
client that hangs, or a sanitizer report in an agent's log (the ASan step of tools/test.sh runs this suite
with the agents instrumented). VBRIDGE_CHAOS_SECONDS sets the length (default 60); the seed is fixed, so a
failure names the same sequence of actions when run again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unittest

from fixtures import build_dir

CHAOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "chaos.py")


class ChaosTest(unittest.TestCase):
    def test_agents_survive_random_stops_kills_and_pauses_under_traffic(self) -> None:
        seconds = float(os.environ.get("VBRIDGE_CHAOS_SECONDS", "60"))
        result = subprocess.run([sys.executable, CHAOS, "--build-dir", build_dir(), "--seconds", f"{seconds:g}",
                                 "--seed", "1"], capture_output=True, text=True, timeout=seconds + 300)
        print(result.stdout, end="")
        self.assertEqual(result.returncode, 0, f"tools/chaos.py found problems:\n{result.stdout}{result.stderr}")


if __name__ == "__main__":
    unittest.main()
