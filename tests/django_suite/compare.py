"""Per-app comparison of a plain and a load-balanced run of Django's test suite.

Usage: python compare.py plain.json lb.json [apps...]; exit 1 if verify found differences (or did
not run), or if fewer than DJSUITE_MIN_RATIO percent (default 0) of the tests that pass plain pass
through the load balancer.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter


def app_of(test_id: str) -> str:
    return test_id.split(".", 1)[0].split(" ")[-1].lstrip("(")


def load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        sys.exit(f"compare.py: cannot read {path} ({exc}); did that run finish? See its log next to it.")


def lb_outcome(test_id: str, lb_tests: dict) -> list:
    if test_id in lb_tests:
        return lb_tests[test_id]
    # Not run: a class-level error (setUpClass ...) is recorded under an id naming the class.
    cls = test_id.rsplit(".", 1)[0]
    for other, outcome in lb_tests.items():
        if other.startswith("setUpClass (") and cls in other or other.endswith(f"({cls})"):
            return ["error", f"[class] {outcome[1]}"]
    return ["missing", "not run through the load balancer"]


# (cause, test) for each lost test: heuristics on the error, for aiming the work (issue 19).
CAUSES = (
    ("EXPLAIN of a SELECT ... FOR UPDATE refused as a write (PostgreSQL); the refusal ends the test class's "
     "load-balanced transaction", lambda t, d: ".test_explain." in t and "TransactionError" in d
     or ".test_explain." in t and "TransactionManagementError" in d),
    ("a test's own routing to another alias (DATABASE_ROUTERS, using=, refresh_from_db(using=)): the "
     "load-balanced model goes through the load balancer", lambda t, d: any(
         word in t for word in ("routing", "using", "MultiDb", "multidb"))),
    ("query counting/capture on 'default' (assertNumQueries, CaptureQueriesContext): the queries ran on "
     "the load-balanced alias", lambda t, d: "queries executed" in d or d.startswith(("AssertionError: 0 != ",
                                                                                   "[subtest] AssertionError: 0 != "))
     or "IndexError: list index out of range" in d),
    ("plain transaction.atomic(): load-balanced writes are not part of it (warning as error, no rollback, "
     "a broken load-balanced transaction)", lambda t, d: "LoadBalancerTransactionWarning" in d
     or "transaction.atomic() on 'default'" in d or "TransactionManagementError" in d),
)


def cause_of(test_id: str, detail: str) -> str:
    for name, matches in CAUSES:
        if matches(test_id, detail):
            return name
    return "other: " + detail.split(":", 1)[0]


def print_causes(lost: list) -> None:
    groups: dict = {}
    for test_id, (_outcome, detail) in lost:
        groups.setdefault(cause_of(test_id, detail), []).append((test_id, detail))
    print("\nby cause (heuristic):")
    for name, tests in sorted(groups.items(), key=lambda item: -len(item[1])):
        example, detail = tests[0]
        print(f"  {len(tests):>4}  {name}\n        e.g. {example}: {detail[:160]}")


def main(argv: list) -> int:
    plain, lb = load(argv[1]), load(argv[2])
    apps = argv[3:] or sorted({app_of(t) for t in plain["tests"]})
    passing = {t for t, (outcome, _d) in plain["tests"].items() if outcome == "ok"}
    rows, lost = [], []
    for app in apps:
        mine = sorted(t for t in passing if app_of(t) == app)
        ok = [t for t in mine if lb_outcome(t, lb["tests"])[0] == "ok"]
        lost += [(t, lb_outcome(t, lb["tests"])) for t in mine if t not in ok]
        rows.append((app, len(mine), len(ok)))
    total_plain, total_lb = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"\n{'app':<20} {'plain':>6} {'lb':>6} {'ratio':>7}")
    for app, n_plain, n_lb in rows + [("TOTAL", total_plain, total_lb)]:
        ratio = f"{100.0 * n_lb / n_plain:6.1f}%" if n_plain else "     -"
        print(f"{app:<20} {n_plain:>6} {n_lb:>6} {ratio:>7}")
    print(f"\n{len(lost)} test(s) pass plain and fail through the load balancer:")
    for test_id, (outcome, detail) in lost:
        print(f"  {test_id}: {outcome}: {detail}")
    causes = Counter(detail.split(":", 1)[0] if outcome != "missing" else "missing" for _t, (outcome, detail) in lost)
    print_causes(lost)
    print("\nby error class: " + ", ".join(f"{name} {count}" for name, count in causes.most_common()))
    minimum = float(os.environ.get("DJSUITE_MIN_RATIO") or 0)
    if total_plain and 100.0 * total_lb / total_plain < minimum:
        print(f"\nthe bar is {minimum}%: {100.0 * total_lb / total_plain:.1f}% of the tests that pass plain pass "
              "through the load balancer")
        return 1
    verify = lb.get("verify")
    if verify is None:
        print("\nverify: did not run (the load-balanced run ended before its databases were torn down)")
        return 1
    print(f"\nverify of the copies at the end of the load-balanced run: exit code {verify['exit_code']}")
    if verify["exit_code"] != 0:
        print(verify["output"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
