"""Fuzz campaign of vgcore's public functions (issue 17): generated hostile calls, outcome table.

    OMP_NUM_THREADS=1 python tests/fuzz_campaign.py [CALLS] [SEED]

The generators and rules are tests/fuzz_harness.py's (the checkout vgcore is
imported from), driven by NumPy's generator instead of hypothesis: per
function, calls accepted, refused with a ValueError / TypeError naming an
argument, and anything else (a violation: crash, unnamed error, mutated
input, NaN from finite input), with an example of each violation.
CAMPAIGN_SECONDS (default 560) bounds the wall time.  Not collected by pytest.
"""
import collections
import os
import sys
import time

import vgcore

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(vgcore.__file__)), "tests"))
import fuzz_harness as harness


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 17
    chooser = harness.RandomChooser(seed)
    pool = harness.stack_pool()
    table = collections.defaultdict(collections.Counter)
    problems = collections.Counter()
    examples = {}
    started = time.time()
    budget = float(os.environ.get("CAMPAIGN_SECONDS", "560"))
    slowest = []
    for index in range(calls):
        if time.time() - started > budget:
            print(f"time budget of {budget:.0f} s reached after {index} calls", file=sys.stderr)
            calls = index
            break
        before = time.time()
        call = harness.make_call(chooser, pool)
        outcome, problem = harness.run_call(call)
        slowest.append((time.time() - before, call.name))
        slowest = sorted(slowest, reverse=True)[:5]
        if problem is None:
            table[call.name][outcome] += 1
        else:
            table[call.name]["other"] += 1
            key = (call.name, problem.split(":")[0])
            problems[key] += 1
            examples.setdefault(key, (problem, repr(call.args)[:300], repr(call.kwargs)[:300]))
        if (index + 1) % 20000 == 0:
            print(f"... {index + 1} calls, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    elapsed = time.time() - started
    threads = os.environ.get("OMP_NUM_THREADS")
    print(f"{calls} calls in {elapsed:.0f} s (seed {seed}, OMP_NUM_THREADS={threads})")
    print(f"{'function':28s} {'accepted':>9s} {'refused, named':>15s} {'other':>7s}")
    for name in sorted(table):
        counts = table[name]
        print(f"{name:28s} {counts['accepted']:9d} {counts['refused']:15d} {counts['other']:7d}")
    total = collections.Counter()
    for counts in table.values():
        total.update(counts)
    print(f"{'total':28s} {total['accepted']:9d} {total['refused']:15d} {total['other']:7d}")
    print("violations:", dict(problems) if problems else "none")
    print("slowest calls:", [(round(t, 2), name) for t, name in slowest])
    for key, (problem, args, kwargs) in examples.items():
        print("--", key, problem, "\n   args", args, "\n   kwargs", kwargs)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
