"""Fuzz campaign of vgcore's public functions (issue 17): generated hostile calls, outcome table.

    OMP_NUM_THREADS=1 python tests/fuzz_campaign.py [CALLS] [SEED]

The generators and rules are tests/fuzz_harness.py's (the checkout vgcore is
imported from), driven by NumPy's generator instead of hypothesis: per
function, calls accepted, refused with a ValueError / TypeError naming an
argument, and anything else (a violation: crash, unnamed error, mutated
input, NaN from finite input), with an example of each violation.  It reads
no clock (speed is bench/'s business): a call that hangs stops the campaign
where it hangs, which is itself a finding (bound it from outside with
``timeout``).  Not collected by pytest.
"""
import collections
import os
import sys

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
    for index in range(calls):
        call = harness.make_call(chooser, pool)
        outcome, problem = harness.run_call(call)
        if problem is None:
            table[call.name][outcome] += 1
        else:
            table[call.name]["other"] += 1
            key = (call.name, problem.split(":")[0])
            problems[key] += 1
            examples.setdefault(key, (problem, repr(call.args)[:300], repr(call.kwargs)[:300]))
        if (index + 1) % 20000 == 0:
            print(f"... {index + 1} calls", file=sys.stderr, flush=True)
    threads = os.environ.get("OMP_NUM_THREADS")
    print(f"{calls} calls (seed {seed}, OMP_NUM_THREADS={threads})")
    print(f"{'function':28s} {'accepted':>9s} {'refused, named':>15s} {'other':>7s}")
    for name in sorted(table):
        counts = table[name]
        print(f"{name:28s} {counts['accepted']:9d} {counts['refused']:15d} {counts['other']:7d}")
    total = collections.Counter()
    for counts in table.values():
        total.update(counts)
    print(f"{'total':28s} {total['accepted']:9d} {total['refused']:15d} {total['other']:7d}")
    print("violations:", dict(problems) if problems else "none")
    for key, (problem, args, kwargs) in examples.items():
        print("--", key, problem, "\n   args", args, "\n   kwargs", kwargs)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
