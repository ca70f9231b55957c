"""layerd.tune_malloc: what it sets, that the environment wins, and that it does what it is for
(freed large blocks are reused instead of faulted in afresh). Each case runs in its own process,
since the settings are process-wide."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

#: Each round allocates three 2 MiB blocks and frees them, as a call allocates its request's
#: copies and its answer; prints the minor page faults of the last 100 rounds. By default glibc
#: trims the heap's free top above twice the largest block freed (4 MiB here), so the next round
#: faults every page in again.
FAULTS = """
import resource, sys, layerd
if sys.argv[1] == "tuned":
    layerd.tune_malloc()
def rounds(n):
    for _ in range(n):
        blocks = [bytearray(2 << 20) for _ in range(3)]   # zero-filled: every page is touched
        del blocks
rounds(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(100)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(code, *args, env=None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *args], env=environment, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_it_sets_both_thresholds_unless_the_environment_does():
    show = "import layerd; print(sorted(layerd.tune_malloc().items()))"
    assert run(show) == str([("MALLOC_MMAP_THRESHOLD_", 64 << 20), ("MALLOC_TRIM_THRESHOLD_", 256 << 20)])
    assert run(show, env={"MALLOC_TRIM_THRESHOLD_": "1048576"}) == str([("MALLOC_MMAP_THRESHOLD_", 64 << 20)])


def test_freed_large_blocks_are_reused_instead_of_faulted_in_again():
    plain, tuned = int(run(FAULTS, "plain")), int(run(FAULTS, "tuned"))
    # Untuned, at least one block's 512 pages are faulted in again each round.
    assert plain >= 100 * 256, plain
    assert tuned < 1000, tuned
