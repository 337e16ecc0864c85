#!/usr/bin/env python3
"""Restarting the agent with workloads running (`flotilla up`, INSTANCES instances of the demo
service with an HTTP readiness probe), ROUNDS times, alternating SIGTERM (a restart by systemd)
and kill -9 (a crash):

  adopt      from the new `up`'s start (its exec) to the last instance re-adopted and probed
             ready again (the agent's "re-adopted process probed" log lines), median and max;
             and the same from the agent's own start (`since_agent_start_ms`).
  memory     per instance, what keeps it alive without its agent (its flotilla-shim): RSS,
             private (dirty) memory and PSS, medians over the instances.

Every round checks that every pid is the same as before the restart.

Usage:
    FLOTILLA_BIN=target/release/flotilla python3 scripts/bench_adopt.py
    (DEMO_DIR: where flotilla-demo is, if not beside FLOTILLA_BIN)
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.environ.get("FLOTILLA_BIN", "target/release/flotilla")
DEMO_DIR = os.environ.get("DEMO_DIR", os.path.dirname(os.path.abspath(BIN)))
ROUNDS = int(os.environ.get("ROUNDS", "10"))
INSTANCES = int(os.environ.get("INSTANCES", "20"))


def wait(what, timeout, f):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = f()
        if v:
            return v
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


class Up:
    def __init__(self, dir):
        self.dir = dir
        self.env = dict(os.environ, FLOTILLA_CONFIG_DIR=os.path.join(dir, "config"),
                        PATH=DEMO_DIR + ":" + os.environ.get("PATH", ""),
                        FLOTILLA_LOG_FORMAT="json", FLOTILLA_LOG="info")
        self.n = 0

    def start(self):
        self.n += 1
        self.log = os.path.join(self.dir, f"up-{self.n}.log")
        out = open(self.log, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([BIN, "up", "-f", os.path.join(self.dir, "flotilla.toml")],
                                     env=self.env, stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL)

    def lines(self):
        try:
            with open(self.log) as f:
                text = f.read()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def instances(self):
        ctx_dir = os.path.join(self.dir, "config", "contexts")
        try:
            ctx = json.load(open(os.path.join(ctx_dir, os.listdir(ctx_dir)[0])))
            token = open(ctx["tokenFile"]).read().strip()
            req = urllib.request.Request(ctx["api"] + "/api/v1/instances",
                                         headers={"Authorization": f"Bearer {token}"})
            return json.load(urllib.request.urlopen(req, timeout=2))["items"]
        except (OSError, ValueError, IndexError, KeyError):
            return []


def smaps(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return out


def main():
    dir = tempfile.mkdtemp(prefix="flotilla-adopt-")
    with open(os.path.join(dir, "flotilla.toml"), "w") as f:
        f.write(f'''[up]
api = "127.0.0.1:0"
gateway = "127.0.0.1:0"
metrics = "127.0.0.1:0"
data_dir = "data"

[service.web]
command = "flotilla-demo"
args = ["--port", "${{PORT}}"]
replicas = {INSTANCES}
ports = ["http"]

[service.web.probes.readiness]
http = {{ path = "/health" }}
period = "1s"
''')
    up = Up(dir)
    up.start()
    wait("every instance ready", 120, lambda: len(
        [i for i in up.instances() if i["status"].get("ready")]) == INSTANCES)
    pids = {i["metadata"]["name"]: i["status"]["pid"] for i in up.instances()}
    wall, agent = [], []
    try:
        for r in range(ROUNDS):
            how = signal.SIGTERM if r % 2 == 0 else signal.SIGKILL
            up.proc.send_signal(how)
            up.proc.wait(timeout=60)
            up.start()

            def probed():
                lines = [l for l in up.lines()
                         if l.get("fields", {}).get("message") == "re-adopted process probed"
                         or l.get("message") == "re-adopted process probed"]
                return lines if len(lines) >= INSTANCES else None
            lines = wait("every instance re-adopted and probed", 60, probed)
            wall.append((time.monotonic() - up.t0) * 1000)
            ms = [l.get("fields", l).get("since_agent_start_ms", 0) for l in lines]
            agent.append(max(ms))
            now = {i["metadata"]["name"]: i["status"]["pid"] for i in up.instances()}
            if now != pids:
                raise SystemExit(f"round {r}: pids changed: {pids} → {now}")
        shims = [int(p) for p in os.listdir("/proc") if p.isdigit()
                 and open(f"/proc/{p}/cmdline", "rb").read().startswith(b"flotilla-shim\0")
                 and dir.encode() in open(f"/proc/{p}/cmdline", "rb").read()]
        mem = [smaps(p) for p in shims]
    finally:
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(timeout=120)
        shutil.rmtree(dir, ignore_errors=True)
    med = statistics.median
    print(f"{INSTANCES} instances, {ROUNDS} restarts (SIGTERM and kill -9 alternating); pids unchanged every round")
    print(f"adopt  up start → all re-adopted and probed: median {med(wall):.0f} ms, max {max(wall):.0f} ms")
    print(f"adopt  agent start → all re-adopted and probed: median {med(agent):.0f} ms, max {max(agent):.0f} ms")
    print(f"memory per shim ({len(mem)}): RSS {med([m['Rss'] for m in mem]) / 1024:.2f} MiB, "
          f"private {med([m['Private_Dirty'] + m.get('Private_Clean', 0) for m in mem]) / 1024:.2f} MiB, "
          f"PSS {med([m['Pss'] for m in mem]) / 1024:.2f} MiB")
    print(f"binary {os.path.getsize(BIN) / 1048576:.1f} MiB ({BIN})")


if __name__ == "__main__":
    main()
