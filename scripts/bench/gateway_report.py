#!/usr/bin/env python3
"""Helpers for scripts/bench-gateway.sh: parse load-generator output, compute medians, print the
side-by-side Markdown report.

Subcommands (all read files, none does IO on the network):

  parse KIND FILE        print `metric value` lines for one run's raw output
                         KIND: wrk | oha | h2load | h2log (h2load --log-file)
  median RESULTS SCENARIO TARGET METRIC
                         median of METRIC over the runs of SCENARIO/TARGET (empty if none)
  instance-ports JSON    from `GET /api/v1/instances?service=backend`: "pid http h2c tls" of the
                         first ready instance (nothing if none is ready yet)
  report RESULTS         the Markdown tables

RESULTS is a TSV file written by the bench script: scenario, target, run, metric, value.
Latencies are stored in microseconds, throughput in requests per second.
"""

import json
import re
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "haproxy", "flotilla"]
PROXIES = ["nginx", "haproxy", "flotilla"]

# ---------------------------------------------------------------------------------------------
# Parsing one run


def _wrk_duration_us(text):
    """'1.23ms' / '512.00us' / '1.01s' / '2.00m' -> microseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    scale = {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[m.group(2)]
    return float(m.group(1)) * scale


def parse_wrk(text):
    out = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    # `--latency` distribution: "     50%  312.00us"
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)\s*$", text, re.M)
        if m:
            out[key] = _wrk_duration_us(m.group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    out["errors"] = errors
    return out


def parse_oha(text):
    # oha may print warnings before the JSON document.
    start = text.find("{")
    doc = json.loads(text[start:]) if start >= 0 else {}
    summary = doc.get("summary", {})
    pct = doc.get("latencyPercentiles", {})
    out = {}
    if summary.get("requestsPerSec") is not None:
        out["rps"] = float(summary["requestsPerSec"])
    for key in ("p50", "p99", "p99.9"):
        if pct.get(key) is not None:
            out[key] = float(pct[key]) * 1e6  # seconds -> µs
    codes = doc.get("statusCodeDistribution", {}) or {}
    bad = sum(int(n) for code, n in codes.items() if not str(code).startswith("2"))
    # The requests still in flight when `-z` ends are "aborted due to deadline": not failures.
    errs = sum(int(n) for k, n in (doc.get("errorDistribution", {}) or {}).items()
               if "aborted due to deadline" not in k)
    out["errors"] = bad + errs
    return out


def parse_h2load(text):
    out = {}
    m = re.search(r"finished in [^,]+, ([\d.]+) req/s", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    if m:
        out["errors"] = int(m.group(5)) + int(m.group(6))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        out["errors"] = out.get("errors", 0) + int(m.group(3)) + int(m.group(4))
    # "time for request:  min  max  mean  sd  +/- sd"
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if m:
        out["mean"] = _wrk_duration_us(m.group(3))
    # Which protocol h2load actually spoke (it falls back to HTTP/1.1 silently with ALPN).
    m = re.search(r"Application protocol: (\S+)", text)
    if m:
        out["h2"] = 1.0 if m.group(1) in ("h2", "h2c") else 0.0
    return out


def parse_h2load_log(text):
    """`h2load --log-file` (fallback constant-rate runs without oha): one line per request,
    `start_us <TAB> status <TAB> duration_us`. Latency is measured from when each request was
    sent, so unlike oha's `--latency-correction` it does not fully avoid coordinated omission."""
    starts, durations, errors = [], [], 0
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            start, status, dur = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            continue
        starts.append(start)
        durations.append(dur)
        if not 200 <= status < 300:
            errors += 1
    if not durations:
        return {}
    durations.sort()

    def pct(p):
        return float(durations[min(len(durations) - 1, int(p / 100.0 * len(durations)))])

    span_s = max((max(starts) - min(starts)) / 1e6, 1e-6)
    return {"rps": len(durations) / span_s, "p50": pct(50), "p99": pct(99), "p99.9": pct(99.9),
            "errors": errors}


PARSERS = {"wrk": parse_wrk, "oha": parse_oha, "h2load": parse_h2load, "h2log": parse_h2load_log}

# ---------------------------------------------------------------------------------------------
# Results


def load(path):
    data = defaultdict(list)  # (scenario, target, metric) -> [values]
    runs = defaultdict(dict)  # (scenario, target, run) -> {metric: value}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5:
                continue
            scenario, target, run, metric, value = parts
            try:
                data[(scenario, target, metric)].append(float(value))
                runs[(scenario, target, run)][metric] = float(value)
            except ValueError:
                pass
    # CPU per request of the proxy: its CPU time over the requests of the whole run (the
    # throughput times the wall time, warm-up included, as the CPU time is).
    for (scenario, target, _run), m in runs.items():
        if m.get("rps") and m.get("wall_s") and "cpu_s" in m:
            data[(scenario, target, "cpu_us")].append(m["cpu_s"] * 1e6 / (m["rps"] * m["wall_s"]))
    return data


def med(data, scenario, target, metric):
    values = data.get((scenario, target, metric), [])
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else None


def fmt_value(v, unit):
    if v is None:
        return "—"
    if unit == "rps":
        return f"{v:,.0f}".replace(",", " ")
    if unit == "us1":
        return f"{v:.1f} µs"
    # µs, shown in ms above 10 ms for readability
    if abs(v) >= 10_000:
        return f"{v / 1000:.1f} ms"
    return f"{v:.0f} µs"


def cell(data, scenario, target, metric, unit, base_target="nginx"):
    if med(data, scenario, target, "rps") == 0:
        return "0 (no request completed)" if metric == "rps" else "—"
    v = med(data, scenario, target, metric)
    text = fmt_value(v, unit)
    base = med(data, scenario, base_target, metric)
    if v is not None and base and target != "direct":
        text += f" ({v / base:.2f}×)"
    return text


def errors_note(data, scenario):
    notes = []
    for t in TARGETS:
        if any(x == 0 for x in data.get((scenario, t, "rps"), [])):
            notes.append(f"{t}: a run completed no request")
        e = data.get((scenario, t, "errors"), [])
        if any(x > 0 for x in e):
            notes.append(f"{t}: {int(sum(e))} failed requests")
    return notes


def report(path):
    data = load(path)
    scenarios = sorted({s for (s, _t, _m) in data})
    lines = []
    header = "| measure | " + " | ".join(TARGETS) + " |"
    sep = "|---|" + "---|" * len(TARGETS)
    warnings = []

    def row(label, scenario, metric, unit):
        if not any((scenario, t, metric) in data for t in TARGETS):
            return
        lines.append(f"| {label} | " + " | ".join(cell(data, scenario, t, metric, unit) for t in TARGETS) + " |")
        warnings.extend(f"{scenario}: {n}" for n in errors_note(data, scenario))

    def added_row(scenario, metric):
        direct = med(data, scenario, "direct", metric)
        base = med(data, scenario, "nginx", metric)
        if direct is None:
            return
        cells = ["—"]
        base_added = base - direct if base is not None else None
        for t in PROXIES:
            v = med(data, scenario, t, metric)
            if v is None:
                cells.append("—")
                continue
            added = v - direct
            text = fmt_value(added, "us")
            if base_added and base_added > 0:
                text += f" ({added / base_added:.2f}×)"
            cells.append(text)
        lines.append(f"| added over direct, c=1 {metric} | " + " | ".join(cells) + " |")

    for proto, title in (("h1", "HTTP/1.1, cleartext"), ("tls", "HTTP/1.1 over TLS 1.3")):
        if not any(s.startswith(proto + ".") for s in scenarios):
            continue
        lines += [f"### {title}", "", header, sep]
        row("throughput, 50 connections (req/s)", f"{proto}.max", "rps", "rps")
        row("proxy CPU per request at that load", f"{proto}.max", "cpu_us", "us1")
        row("c=1 p50", f"{proto}.c1", "p50", "us")
        row("c=1 p99", f"{proto}.c1", "p99", "us")
        added_row(f"{proto}.c1", "p50")
        added_row(f"{proto}.c1", "p99")
        rates = sorted(
            {s for s in scenarios if s.startswith(proto + ".rate")},
            key=lambda s: int(s.split("rate")[1]),
        )
        for s in rates:
            pct = s.split("rate")[1]
            target_rate = med(data, s, "nginx", "target_rps")
            rate_text = f"{target_rate:,.0f}".replace(",", " ") if target_rate else "?"
            for metric in ("p50", "p99", "p99.9"):
                row(f"{pct} % of nginx max ({rate_text} req/s) {metric}", s, metric, "us")
            row(f"{pct} % of nginx max: achieved req/s", s, "rps", "rps")
            for t in TARGETS:
                got = med(data, s, t, "rps")
                if target_rate and got is not None and got < 0.95 * target_rate:
                    warnings.append(f"{s}: {t} sustained only {got:,.0f} of {target_rate:,.0f} req/s; "
                                    "its latencies at this rate include queueing")
        lines.append("")

    h2 = [s for s in scenarios if s.startswith("h2")]
    if h2:
        lines += ["### HTTP/2 (h2load)", "", header, sep]
        for s, label in (("h2c.max", "h2c (prior knowledge)"), ("h2tls.max", "h2 over TLS 1.3 (ALPN)")):
            row(f"{label}: req/s", s, "rps", "rps")
            row(f"{label}: proxy CPU per request", s, "cpu_us", "us1")
            row(f"{label}: mean latency", s, "mean", "us")
            for t in TARGETS:
                if (s, t, "h2") in data and min(data[(s, t, "h2")]) < 1:
                    warnings.append(f"{s}: {t} did not speak HTTP/2")
        lines.append("")

    lines.append("Cells: median over the runs; in parentheses the ratio to nginx (for latencies, lower "
                 "is better; for `added over direct`, the ratio of added latencies).")
    if warnings:
        lines.append("")
        lines.append("**Warnings:**")
        lines += [f"- {w}" for w in sorted(set(warnings))]
    print("\n".join(lines))


def instance_ports(path):
    with open(path) as f:
        doc = json.load(f)
    for item in doc.get("items", []):
        status = item.get("status", {})
        ports = status.get("ports", {})
        if status.get("ready") and all(p in ports for p in ("http", "h2c", "tls")):
            print(status.get("pid") or 0, ports["http"], ports["h2c"], ports["tls"])
            return


def main(argv):
    if len(argv) >= 3 and argv[0] == "parse":
        with open(argv[2], errors="replace") as f:
            text = f.read()
        try:
            values = PARSERS[argv[1]](text)
        except (ValueError, KeyError) as e:
            print(f"cannot parse {argv[2]}: {e}", file=sys.stderr)
            values = {}
        for k, v in values.items():
            print(f"{k}\t{v}")
    elif len(argv) == 5 and argv[0] == "median":
        v = med(load(argv[1]), argv[2], argv[3], argv[4])
        if v is not None:
            print(f"{v:.0f}")
    elif len(argv) == 2 and argv[0] == "instance-ports":
        instance_ports(argv[1])
    elif len(argv) == 2 and argv[0] == "report":
        report(argv[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
