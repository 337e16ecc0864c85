#!/usr/bin/env python3
"""Idle RSS of `flotilla up` (no services) for two or more builds, interleaved rounds.

Usage: ROUNDS=6 python3 scripts/idle_ab.py OLD/flotilla NEW/flotilla
"""
import sys, os, time, statistics
HERE = os.path.dirname(os.path.abspath(__file__))
import importlib.util
def load(binpath):
    os.environ["FLOTILLA_BIN"] = binpath
    spec = importlib.util.spec_from_file_location("bc"+str(abs(hash(binpath))), os.path.join(HERE, "bench_core.py"))
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
bins = sys.argv[1:]
mods = [load(b) for b in bins]
res = {b: [] for b in bins}
anon = {b: [] for b in bins}
for r in range(int(os.environ.get("ROUNDS","5"))):
    for b, m in zip(bins, mods):
        m.BIN = b
        up = m.Up("")
        time.sleep(3)
        res[b].append(up.rss_kib()/1024)
        a = 0
        for line in open(f"/proc/{up.proc.pid}/smaps_rollup"):
            if line.startswith("Anonymous:"): a = int(line.split()[1])/1024
        anon[b].append(a)
        up.stop()
for b in bins:
    print(b, "rss median %.2f" % statistics.median(res[b]), [round(x,2) for x in res[b]], "anon median %.2f" % statistics.median(anon[b]))
