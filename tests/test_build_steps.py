"""Build steps: each records its seconds and the peak memory native allocations reach."""

import json
import subprocess
import sys

from imgsearch import artifacts

ALLOCATE = """
import json
import numpy as np
from imgsearch_tools.build_steps import BuildSteps, peak_rss_bytes
steps = BuildSteps()
# More than the peak so far, so the step must raise it whatever ran before.
size = peak_rss_bytes() + 256 * 2**20
with steps.step("small"):
    small = np.ones(1_000)
with steps.step("large") as entry:
    large = np.ones(size // 8)  # allocated by numpy's C code
    entry["detail"] = "kept"
with steps.step("freed"):
    del large
print(json.dumps([size / 2**20, *steps.steps]))
"""


def test_a_step_that_allocates_raises_the_peak_and_one_that_frees_lowers_the_resident_set():
    out = subprocess.run([sys.executable, "-c", ALLOCATE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    size_mib, small, large, freed = json.loads(out.stdout)
    assert [s["step"] for s in (small, large, freed)] == ["small", "large", "freed"]
    assert large["detail"] == "kept"
    assert large["raised_peak_mib"] >= 200 > small["raised_peak_mib"]
    assert large["rss_mib"] >= small["rss_mib"] + size_mib - 50
    assert large["peak_rss_mib"] >= large["rss_mib"] - 1  # two counters, read a moment apart
    assert freed["rss_mib"] <= large["rss_mib"] - 200
    assert freed["peak_rss_mib"] == large["peak_rss_mib"]
    assert all(s["seconds"] >= 0 for s in (small, large, freed))


def test_a_step_records_the_cpu_time_it_used():
    from imgsearch_tools.build_steps import BuildSteps, cpu_seconds

    steps = BuildSteps()
    with steps.step("busy"):
        started = cpu_seconds()
        while cpu_seconds() - started < 0.3:
            sum(range(10_000))
    with steps.step("idle"):
        pass
    busy, idle = steps.steps
    assert busy["cpu_seconds"] >= 0.3
    assert 0 <= idle["cpu_seconds"] < busy["cpu_seconds"]


def test_a_build_records_its_steps_in_the_manifest(artifact_root):
    manifest = json.loads((artifact_root / artifacts.CURRENT / artifacts.MANIFEST).read_text())
    names = [s["step"] for s in manifest["build_steps"]]
    assert names == ["read", "filters and catalogue", "keyword index", "rankers"]
    assert all(s["peak_rss_mib"] > 0 for s in manifest["build_steps"])
    assert all(s["cpu_seconds"] >= 0 for s in manifest["build_steps"])
