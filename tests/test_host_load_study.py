"""benchmarks/host_load_study.py on the CPU: the bench runs held to one core beside a spinning process,
`regional-uncopied` compiles and matches eager, and no spinning process outlives the study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parent.parent / "benchmarks" / "host_load_study.py"


def _processes_running(marker: str) -> list[int]:
    """PIDs whose command line holds `marker` (the spinning processes are forks: they keep the study's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone while we looked
            continue
    return found


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="!!! NO CPU AFFINITY ON THIS OS: study SKIPPED !!!")
def test_the_study_runs_the_bench_on_shared_cores_and_leaves_no_spinning_process(tmp_path, comfy_path):
    out = tmp_path / "study.json"
    marker = str(tmp_path)  # only this run's processes carry it
    cmd = [sys.executable, str(STUDY), "--cores", "1", "--hogs", "1", "--", "--model", "tiny-sd15", "--steps", "1",
           "--runs", "1", "--res", "64", "--variants", "eager,regional-uncopied", "--json", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench held to cores [" in proc.stdout and "1 spinning process(es)" in proc.stdout
    rows = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    uncopied = rows["regional-uncopied"]
    assert uncopied["ok"] and "mode=O3:regional" in uncopied["model_state"], uncopied
    assert uncopied["rel_err_vs_eager"] < 1e-4  # float32 on the CPU: the same arithmetic
    assert not _processes_running(marker), "a spinning process outlived the study"


def test_the_uncopied_variant_must_come_last():
    proc = subprocess.run([sys.executable, str(STUDY), "--hogs", "0", "--", "--model", "tiny-sd15", "--variants",
                           "eager,regional-uncopied,diffboost=O3:regional"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "name it last" in proc.stderr
