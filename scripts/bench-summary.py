#!/usr/bin/env python3
"""Prints the tables of BENCHMARKS.md from the runs that scripts/bench.sh keeps.

    python3 scripts/bench-summary.py target/bench-runs

A benchmark's figure in one run is criterion's median estimate
(`new/estimates.json`, `median.point_estimate`); the tables show the median over the runs,
the smallest and largest per-iteration mean of any sample of any run (`new/sample.json`,
`times[i] / iters[i]`), and the per-run medians. A ratio is ours / contender within one
run; the tables show the median of the per-run ratios and the per-run values.
"""

import glob
import json
import os
import re
import statistics
import sys

PEERS = ["ours", "moka", "singleflight", "tower_resilience", "passthrough"]


def fmt_ns(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def load(runs, group, bench):
    """Per run: (median, [per-sample means]) or None where the run lacks the benchmark."""
    out = []
    for run in runs:
        new = os.path.join(run, "criterion", group, bench, "new")
        if not os.path.isdir(new):
            out.append(None)
            continue
        with open(os.path.join(new, "estimates.json")) as f:
            median = json.load(f)["median"]["point_estimate"]
        with open(os.path.join(new, "sample.json")) as f:
            sample = json.load(f)
        per = [t / i for t, i in zip(sample["times"], sample["iters"])]
        out.append((median, per))
    return out


def med(values):
    return statistics.median(values)


def runs_of(data):
    return [d[0] for d in data if d is not None]


def group_table(runs, group, throughput=False):
    data = {p: load(runs, group, p) for p in PEERS}
    ours = data["ours"]
    print(f"\n### {group}\n")
    if throughput:
        print("| contender | calls/s (median) | time per call: median | min – max | per-run medians "
              "| our throughput ÷ contender's: median (per run) |")
    else:
        print("| contender | median | min – max | per-run medians | ours ÷ contender: median (per run) |")
    print("|---|---|---|---|---|" + ("---|" if throughput else ""))
    ratios = {}
    for peer in PEERS:
        d = data[peer]
        if not runs_of(d):
            continue
        medians = runs_of(d)
        samples = [x for r in d if r is not None for x in r[1]]
        per_run = " / ".join(fmt_ns(m) for m in medians)
        cells = [peer]
        if throughput:
            cells.append(f"{1e3 / med(medians):.2f} M/s")
        cells += [fmt_ns(med(medians)), f"{fmt_ns(min(samples))} – {fmt_ns(max(samples))}", per_run]
        if peer == "ours":
            cells.append("–")
        else:
            pairs = [(o[0], p[0]) for o, p in zip(ours, d) if o is not None and p is not None]
            rs = [(p / o) if throughput else (o / p) for o, p in pairs]
            ratios[peer] = (med(rs), rs)
            cells.append(f"**{med(rs):.2f}** ({' / '.join(f'{r:.2f}' for r in rs)})")
        print("| " + " | ".join(cells) + " |")
    return ratios


def inner_calls(runs):
    pattern = re.compile(
        r"inner calls (\S+)/(\S+): storms (\d+), min (\d+), median (\d+), max (\d+), exactly (\d+): (\d+)/(\d+)")
    totals = {}
    for run in runs:
        with open(os.path.join(run, "stdout.txt")) as f:
            for line in f:
                m = pattern.search(line)
                if not m:
                    continue
                group, peer = m.group(1), m.group(2)
                storms, lo, mid, hi, exact_n, exact = (int(m.group(i)) for i in (3, 4, 5, 6, 7, 8))
                t = totals.setdefault((group, peer), {"storms": 0, "exact": 0, "lo": lo, "hi": hi,
                                                      "medians": [], "expected": exact_n})
                t["storms"] += storms
                t["exact"] += exact
                t["lo"] = min(t["lo"], lo)
                t["hi"] = max(t["hi"], hi)
                t["medians"].append(mid)
    if totals:
        print("\n### inner calls per storm (all storms of all runs, warm-up included)\n")
        print("| group / contender | storms | exactly the number of keys | min – max | per-run medians |")
        print("|---|---|---|---|---|")
        for (group, peer), t in sorted(totals.items()):
            print(f"| {group} / {peer} | {t['storms']} | {t['exact']} of {t['storms']} "
                  f"(expected {t['expected']}) | {t['lo']} – {t['hi']} | "
                  f"{' / '.join(str(m) for m in t['medians'])} |")


def http_front(runs):
    print("\n### http_front, http_rs256_storm\n")
    print("| benchmark | median | min – max | per-run medians |")
    print("|---|---|---|---|")
    figures = {}
    for group, bench in [("http_front", b) for b in
                         ["replayed_hs256", "bare_hs256", "verify_hs256",
                          "replayed_rs256", "bare_rs256", "verify_rs256"]] + \
                        [("http_rs256_storm", b) for b in ["leader_alone", "leader_and_1000_followers"]]:
        d = load(runs, group, bench)
        medians = runs_of(d)
        if not medians:
            continue
        figures[bench] = d
        samples = [x for r in d if r is not None for x in r[1]]
        print(f"| {group}/{bench} | {fmt_ns(med(medians))} | {fmt_ns(min(samples))} – "
              f"{fmt_ns(max(samples))} | {' / '.join(fmt_ns(m) for m in medians)} |")
    need = ["leader_alone", "leader_and_1000_followers", "verify_rs256"]
    if all(k in figures for k in need):
        shares, costs = [], []
        for alone, storm, verify in zip(*(figures[k] for k in need)):
            if None in (alone, storm, verify):
                continue
            follower = (storm[0] - alone[0]) / 1000
            costs.append(follower)
            shares.append(100 * follower / verify[0])
        print(f"\nRS256 follower = (storm − alone) / 1000, per run: "
              f"{' / '.join(fmt_ns(c) for c in costs)}; "
              f"share of that run's verify_rs256: {' / '.join(f'{s:.2f} %' for s in shares)} "
              f"(median {med(shares):.2f} %)")
    for alg in ["hs256", "rs256"]:
        keys = [f"replayed_{alg}", f"bare_{alg}", f"verify_{alg}"]
        if all(k in figures for k in keys):
            over_bare, over_verify = [], []
            for rep, bare, ver in zip(*(figures[k] for k in keys)):
                if None in (rep, bare, ver):
                    continue
                over_bare.append(rep[0] / bare[0])
                over_verify.append(rep[0] / ver[0])
            print(f"replayed_{alg} ÷ bare_{alg}, per run: {' / '.join(f'{r:.2f}' for r in over_bare)}; "
                  f"÷ verify_{alg}: {' / '.join(f'{r:.2f}' for r in over_verify)}")
    for run in runs:
        with open(os.path.join(run, "stdout.txt")) as f:
            for line in f:
                if line.startswith("http_rs256_storm:"):
                    print(f"{os.path.basename(run)}: {line.strip()}")


# The client-authentication and DPoP cases of http_front, each with the case it adds to
# (None: no baseline).
AUTH = [
    ("replayed_hs256", None),
    ("replayed_hs256_basic", "replayed_hs256"),
    ("replayed_hs256_form", None),
    ("replayed_hs256_form_secret", "replayed_hs256_form"),
    ("replayed_hs256_dpop_es256", "replayed_hs256"),
    ("dpop_check_es256", None),
    ("dpop_check_rs256", None),
    ("verify_hs256", None),
    ("verify_rs256", None),
]


def client_auth(runs):
    data = {bench: load(runs, "http_front", bench) for bench, _ in AUTH}
    if not any(runs_of(data[b]) for b, _ in AUTH[1:7]):
        return
    print("\n### http_front: client authentication and DPoP\n")
    print("| benchmark | median | min – max | per-run medians | added to its baseline, per run |")
    print("|---|---|---|---|---|")
    for bench, base in AUTH:
        d = data[bench]
        medians = runs_of(d)
        if not medians:
            continue
        samples = [x for r in d if r is not None for x in r[1]]
        added = "–"
        if base is not None and runs_of(data[base]):
            diffs = [c[0] - b[0] for c, b in zip(d, data[base]) if c is not None and b is not None]
            added = f"{' / '.join(fmt_ns(x) for x in diffs)} (vs {base})"
        print(f"| {bench} | {fmt_ns(med(medians))} | {fmt_ns(min(samples))} – "
              f"{fmt_ns(max(samples))} | {' / '.join(fmt_ns(m) for m in medians)} | {added} |")
    for run in runs:
        with open(os.path.join(run, "stdout.txt")) as f:
            for line in f:
                if line.startswith("http_front/replayed_hs256_") and "leader" in line:
                    print(f"{os.path.basename(run)}: {line.strip()}")


def memory(runs):
    pattern = re.compile(r"memory (\S+): entries (\d+), .* ([\d.]+) bytes per entry")
    per = {}
    for run in runs:
        path = os.path.join(run, "memory.txt")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                m = pattern.search(line)
                if m:
                    per.setdefault(m.group(1), []).append((int(m.group(2)), float(m.group(3))))
    if not per:
        return
    print("\n### memory per live entry\n")
    print("| contender | entries | bytes per entry, per run | median |")
    print("|---|---|---|---|")
    for contender, values in per.items():
        print(f"| {contender} | {', '.join(sorted({str(n) for n, _ in values}))} | "
              f"{' / '.join(f'{b:.1f}' for _, b in values)} | {med([b for _, b in values]):.1f} B |")
    if "ours" in per and "moka" in per:
        rs = [o / m for (_, o), (_, m) in zip(per["ours"], per["moka"])]
        print(f"\nours ÷ moka, per run: {' / '.join(f'{r:.2f}' for r in rs)} (median {med(rs):.2f})")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "target/bench-runs"
    runs = sorted(glob.glob(os.path.join(root, "run*")), key=lambda p: int(p.rsplit("run", 1)[1]))
    if not runs:
        sys.exit(f"no runs under {root}: run scripts/bench.sh first")
    machine = os.path.join(root, "machine.txt")
    if os.path.exists(machine):
        with open(machine) as f:
            print("machine: " + " | ".join(line.strip() for line in f if line.strip()))
    for run in runs:
        loads = []
        for name in ("loadavg-before.txt", "loadavg-after.txt"):
            path = os.path.join(run, name)
            if os.path.exists(path):
                with open(path) as f:
                    loads.append(" ".join(f.read().split()[:3]))
        print(f"{os.path.basename(run)}: load average before / after: {' / '.join(loads)}")
    for group in ["hot_hit", "miss", "storm_one_key", "storm_1000_keys"]:
        group_table(runs, group)
    group_table(runs, "hot_hit_contended", throughput=True)
    inner_calls(runs)
    http_front(runs)
    client_auth(runs)
    memory(runs)


if __name__ == "__main__":
    main()
