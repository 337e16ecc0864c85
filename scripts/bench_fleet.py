#!/usr/bin/env python3
"""Fleet benchmarks on one machine, with release builds and real processes.

- idle RSS of `flotilla agent` (no instances) and of `flotilla server` with 3 nodes;
- node loss: `kill -9` of a node's agent and of its instances → all six replicas ready on the
  other nodes again; ROUNDS rounds (default 10), each on the next node, the killed agent
  restarted in between. The lease is the default (6 s).

Each node is an agent on its own loopback address (127.78.0.N). Usage:
    FLOTILLA_BIN=target/release/flotilla ROUNDS=10 python3 scripts/bench_fleet.py
With FLOTILLA_AGENT_BIN (the path of `flotilla-agent`, such as the static one from
scripts/build-static.sh) the nodes run that binary instead of `flotilla agent`; IDLE_SECS (default
2) is how long they idle before their RSS is read.
"""

import json
import ssl
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FLOTILLA_BIN", os.path.join(ROOT, "target", "release", "flotilla"))
AGENT_BIN = os.environ.get("FLOTILLA_AGENT_BIN")
DEMO_DIR = os.path.dirname(os.path.abspath(BIN))
ROUNDS = int(os.environ.get("ROUNDS", "10"))
IDLE_SECS = float(os.environ.get("IDLE_SECS", "2"))  # how long the fleet idles before the RSS is read
NODES = 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid, field="VmRSS:"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait(what, cond, timeout=30.0, step=0.01):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise RuntimeError(f"timed out waiting for {what}")


class Fleet:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="flotilla-bench-fleet-")
        self.api = f"127.0.0.1:{free_port()}"
        self.env = dict(os.environ, PATH=DEMO_DIR + ":" + os.environ.get("PATH", ""),
                        FLOTILLA_LOG="warn", FLOTILLA_CONFIG_DIR=os.path.join(self.dir, "config"))
        self.env.pop("FLOTILLA_TOKEN", None)
        self.server = self.spawn("server", ["--data-dir", os.path.join(self.dir, "server"), "server", "--listen", self.api])
        token_file = os.path.join(self.dir, "server", "admin.token")
        wait("the admin token", lambda: os.path.exists(token_file) and open(token_file).read().strip())
        self.token = open(token_file).read().strip()
        self.ca = os.path.join(self.dir, "server", "ca.crt")
        wait("the cluster CA", lambda: os.path.exists(self.ca) and os.path.getsize(self.ca) > 0)
        self.tls = ssl.create_default_context(cafile=self.ca)
        wait("the API", self.healthy)
        self.join = self.cli("token", "create", "--join", "--ttl", "1h").strip()
        self.agents = {}
        for i in range(1, NODES + 1):
            self.start_agent(f"node-{i}")
        wait("every node Ready", lambda: len(self.ready_nodes()) == NODES)

    def spawn(self, name, args, env=None, binary=BIN):
        log = open(os.path.join(self.dir, name + ".log"), "a")
        return subprocess.Popen([binary] + args, env=dict(self.env, **(env or {})), stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)

    def start_agent(self, name):
        i = name.split("-")[1]
        args = ["--data-dir", os.path.join(self.dir, name), "agent", "--api", f"https://{self.api}",
                "--node", name, "--address", f"127.78.0.{i}"]
        if AGENT_BIN:
            args.remove("agent")
        self.agents[name] = self.spawn(name, args, {"FLOTILLA_TOKEN": self.join},
                                       binary=AGENT_BIN or BIN)

    def cli(self, *args):
        env = dict(self.env, FLOTILLA_API=self.api, FLOTILLA_TOKEN=self.token, FLOTILLA_CA=self.ca)
        return subprocess.run([BIN] + list(args), env=env, check=True, capture_output=True, text=True).stdout

    def healthy(self):
        try:
            with urllib.request.urlopen(f"https://{self.api}/healthz", timeout=1, context=self.tls) as r:
                return r.status == 200
        except OSError:
            return False

    def get(self, path):
        req = urllib.request.Request(f"https://{self.api}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10, context=self.tls) as r:
            return json.loads(r.read())

    def ready_nodes(self):
        return [n["metadata"]["name"] for n in self.get("/api/v1/nodes")["items"]
                if any(c["type"] == "Ready" and c["status"] for c in n["status"].get("conditions", []))]

    def ready(self):
        return [i for i in self.get("/api/v1/instances?service=web")["items"]
                if i["status"].get("ready") and not i["metadata"].get("deletionTimestamp")]

    def stop(self):
        for p in self.agents.values():
            # SIGINT: an agent stops its instances (on SIGTERM it leaves them running).
            p.send_signal(signal.SIGINT)
        for p in self.agents.values():
            p.wait(timeout=60)
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(timeout=30)


WEB = """
[service.web]
command = "flotilla-demo"
args = ["--listen", "${FLOTILLA_HOST}:${PORT}"]
replicas = 6
ports = ["http"]
stop = { grace_period = "2s" }
[service.web.probes.readiness]
http = { path = "/health" }
period = "200ms"
timeout = "200ms"
failure_threshold = 1
"""


def main():
    fleet = Fleet()
    try:
        time.sleep(IDLE_SECS)  # idle: registered, beating, nothing to run
        agent_rss = [rss_mib(p.pid) for p in fleet.agents.values()]
        agent_anon = [rss_mib(p.pid, "RssAnon:") for p in fleet.agents.values()]
        server_rss = rss_mib(fleet.server.pid)
        path = os.path.join(fleet.dir, "web.toml")
        with open(path, "w") as f:
            f.write(WEB)
        fleet.cli("apply", "-f", path)
        wait("six ready", lambda: len(fleet.ready()) == 6)
        losses = []
        after_expiry = []
        for r in range(ROUNDS):
            victim = f"node-{r % NODES + 1}"
            wait(f"{victim} to run instances", lambda: any(i["spec"]["node"] == victim for i in fleet.ready()))
            pids = [i["status"]["pid"] for i in fleet.ready() if i["spec"]["node"] == victim]
            age = [n.get("heartbeat", {}).get("ageMillis", 0) for n in fleet.get("/api/v1/nodes")["items"]
                   if n["metadata"]["name"] == victim][0] / 1000
            t0 = time.perf_counter()
            fleet.agents[victim].kill()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            fleet.agents[victim].wait()
            wait("six ready elsewhere",
                 lambda: (lambda rd: len(rd) == 6 and all(i["spec"]["node"] != victim for i in rd))(fleet.ready()),
                 timeout=60, step=0.005)
            losses.append(time.perf_counter() - t0)
            # The lease had 6 s - age left at the kill: what came after its expiry.
            after_expiry.append(losses[-1] - (6.0 - age))
            fleet.start_agent(victim)
            wait(f"{victim} Ready again", lambda: victim in fleet.ready_nodes())
            # Spread again for the next round: scale down and up.
            fleet.cli("apply", "-f", path)
        which = os.path.basename(AGENT_BIN) if AGENT_BIN else "flotilla agent"
        print(f"{which} idle RSS: median {statistics.median(agent_rss):.2f} MiB {[round(x, 2) for x in agent_rss]} "
              f"(goal ≤ 6 MiB), of which anonymous {statistics.median(agent_anon):.2f} MiB")
        print(f"server idle RSS with {NODES} nodes: {server_rss:.1f} MiB")
        print(f"node loss → six ready elsewhere, {len(losses)} rounds: median {statistics.median(losses):.2f} s, "
              f"max {max(losses):.2f} s {[round(x, 2) for x in losses]} (goal ≤ 10 s; lease 6 s)")
        print(f"  of which after the lease expired: median {statistics.median(after_expiry):.2f} s, "
              f"max {max(after_expiry):.2f} s")
    finally:
        fleet.stop()


if __name__ == "__main__":
    main()
