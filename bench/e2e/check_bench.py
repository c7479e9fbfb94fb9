#!/usr/bin/env python3
"""ctest bench.e2e.quick: `tools/vbridge bench --quick` runs end to end, its JSON has every section and its SVG
is well-formed, and the opt-in yardstick relays run when named. No figure is judged: timings belong in
bench/RESULTS.md, not in a pass/fail test.

    python3 bench/e2e/check_bench.py --build-dir build
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
SVG = "{http://www.w3.org/2000/svg}"

# JSON key -> the key that holds the figures when the section ran.
SECTIONS = {"docker": "paths", "idle_streams": "with_streams", "ports": "appear_ms", "file_events": "vbridge_ms"}
STREAM_METRICS = ("tput1", "tput1_rev", "tput8", "rtt_p50", "rtt_p99", "load_p50", "load_p99", "cpu_p50", "cpu_p99",
                  "conn")

YARDSTICKS = ("relay", "relay2", "splice")
BUILD_DIR = ""


class QuickBench(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="vbridge-bench-check-")
        cls.json_path = os.path.join(cls.tmp, "bench.json")
        cls.svg_path = os.path.join(cls.tmp, "bench.svg")
        argv = [sys.executable, os.path.join(REPO, "tools", "vbridge"), "bench", "--quick", "--build-dir", BUILD_DIR,
                "--json", cls.json_path, "--plot", cls.svg_path]
        cls.run_result = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                                        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        sys.stderr.write(cls.run_result.stdout)
        cls.doc = None
        if os.path.exists(cls.json_path):
            with open(cls.json_path, encoding="utf-8") as f:
                cls.doc = json.load(f)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self) -> None:
        self.assertEqual(self.run_result.returncode, 0,
                         f"vbridge bench --quick failed\n{self.run_result.stdout}\n{self.run_result.stderr[-4000:]}")
        self.assertIsNotNone(self.doc, "no JSON written")

    def test_human_table_and_targets_printed(self):
        out = self.run_result.stdout
        for text in ("unix sockets", "tcp sockets", "targets:", "took "):
            self.assertIn(text, out)

    def test_every_stream_path_has_every_metric_or_a_skip_note(self):
        labels = {e["label"]: e for e in self.doc["paths"]}
        for name in ("direct", "socat2", "ssh-L", "vbridge"):
            for fam in ("unix", "tcp"):
                entry = labels.get(f"{name}/{fam}")
                self.assertIsNotNone(entry, f"{name}/{fam} missing from the JSON")
                if entry["skip_reason"]:
                    self.assertNotEqual(name, "direct", "the baseline was skipped")
                    continue
                self.assertEqual(sorted(entry["metrics"]), sorted(STREAM_METRICS), f"{name}/{fam}")
                for bench, runs in entry["results"].items():
                    self.assertTrue(runs, f"{name}/{fam} {bench}: no raw run kept")
                if name != "direct":
                    self.assertEqual(sorted(entry["ratio_to_direct"]), sorted(STREAM_METRICS), f"{name}/{fam}")

    def test_yardsticks_run_only_when_named(self):
        names = {e["name"] for e in self.doc["paths"]}
        self.assertFalse(names & set(YARDSTICKS), "an opt-in yardstick ran without --paths naming it")

    def test_every_section_ran_or_says_why_not(self):
        for key, figures in SECTIONS.items():
            section = self.doc.get(key)
            self.assertIsInstance(section, dict, f"section {key} missing")
            self.assertNotIn("error", section, f"section {key}: {section.get('error')}")
            if not section["skip_reason"]:
                self.assertTrue(section.get(figures), f"section {key} ran but has no {figures}")

    def test_docker_section_compares_paths_to_direct(self):
        docker = self.doc["docker"]
        if docker["skip_reason"]:
            self.skipTest(docker["skip_reason"])
        direct = docker["paths"]["direct"]["requests"]
        self.assertEqual(sorted(direct), sorted(["/_ping fresh", "/_ping keep-alive", "/containers/json fresh",
                                                 "/containers/json keep-alive"]))
        vb = docker["paths"]["vbridge"]
        if not vb["skip_reason"]:
            self.assertIn("p50_ratio_to_direct", vb["requests"]["/_ping fresh"])

    def test_targets_listed_with_a_verdict_or_none(self):
        targets = self.doc["targets"]
        self.assertTrue(targets)
        for t in targets:
            self.assertIn(t["met"], (True, False, None), t)
            self.assertTrue(t["limit"], t)

    def test_svg_is_well_formed_with_bars(self):
        self.assertGreater(os.path.getsize(self.svg_path), 0)
        root = ET.parse(self.svg_path).getroot()
        self.assertEqual(root.tag, f"{SVG}svg")
        bars = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
        self.assertTrue(bars, "the plot has no bar")


class Yardsticks(unittest.TestCase):
    """The plainest relays (`--paths relay,relay2,splice`) carry every stream benchmark: a relay that lost or
    stalled bytes would leave a metric out or end its run with an error."""

    def test_every_yardstick_has_every_metric(self):
        with tempfile.TemporaryDirectory(prefix="vbridge-bench-yardsticks-") as tmp:
            json_path = os.path.join(tmp, "bench.json")
            argv = [sys.executable, os.path.join(REPO, "tools", "vbridge"), "bench", "--quick", "--build-dir",
                    BUILD_DIR, "--sections", "streams", "--families", "unix,tcp", "--paths", ",".join(YARDSTICKS),
                    "--json", json_path]
            run = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            self.assertEqual(run.returncode, 0, f"{run.stdout}\n{run.stderr[-4000:]}")
            with open(json_path, encoding="utf-8") as f:
                labels = {e["label"]: e for e in json.load(f)["paths"]}
        for name in YARDSTICKS:
            for fam in ("unix", "tcp"):
                entry = labels.get(f"{name}/{fam}")
                self.assertIsNotNone(entry, f"{name}/{fam} missing from the JSON")
                self.assertEqual(entry["skip_reason"], "", f"{name}/{fam}")
                self.assertEqual(sorted(entry["metrics"]), sorted(STREAM_METRICS), f"{name}/{fam}")
                for bench, runs in entry["results"].items():
                    errors = [r["error"] for r in runs if "error" in r]
                    self.assertFalse(errors, f"{name}/{fam} {bench}: {errors}")


def main() -> int:
    global BUILD_DIR
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=os.environ.get("VBRIDGE_BUILD_DIR", os.path.join(REPO, "build")))
    args, rest = ap.parse_known_args()
    BUILD_DIR = os.path.abspath(args.build_dir)
    result = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
