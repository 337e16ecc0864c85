#!/usr/bin/env python3
"""API write latency of `flotilla server`, on its embedded store and on a 3-member etcd cluster
(Debian's etcd-server, members on loopback with their data on this machine's disk), in one run.

Each write is an apply (POST /api/v1/services) of a service with 0 replicas, a new spec each
time (a new revision: the service, its revision and an event are written). C clients, each on
its own keep-alive connection, send W writes one after the other. Before the server starts,
the same clients put keys straight into etcd (its JSON gateway): the floor under any apply
through it on this machine. Usage:
    FLOTILLA_BIN=target/release/flotilla ROUNDS=2 python3 scripts/bench_etcd.py
"""

import http.client
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FLOTILLA_BIN", os.path.join(ROOT, "target", "release", "flotilla"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
WRITES = int(os.environ.get("WRITES", "200"))  # per client
CLIENTS = [int(c) for c in os.environ.get("CLIENTS", "1,10,100").split(",")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, cond, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Etcd:
    def __init__(self, root):
        names = ["m1", "m2", "m3"]
        self.client = {n: f"http://127.0.0.1:{free_port()}" for n in names}
        peer = {n: f"http://127.0.0.1:{free_port()}" for n in names}
        initial = ",".join(f"{n}={peer[n]}" for n in names)
        self.procs = []
        for n in names:
            log = open(os.path.join(root, f"etcd-{n}.log"), "w")
            self.procs.append(subprocess.Popen([
                "etcd", "--name", n, "--data-dir", os.path.join(root, f"etcd-{n}"),
                "--listen-client-urls", self.client[n], "--advertise-client-urls", self.client[n],
                "--listen-peer-urls", peer[n], "--initial-advertise-peer-urls", peer[n],
                "--initial-cluster", initial, "--logger", "zap", "--log-level", "warn"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL))

    def healthy(self):
        import urllib.request
        try:
            return all(json.loads(urllib.request.urlopen(u + "/health", timeout=1).read()).get("health") == "true"
                       for u in self.client.values())
        except (OSError, ValueError):
            return False

    def endpoints(self):
        return ",".join(self.client.values())

    def requests(self):
        """gRPC KV requests every member answered so far, by method (Range, Txn, Put...)."""
        import re
        import urllib.request
        counts = {}
        pattern = re.compile(r'grpc_server_handled_total\{grpc_code="OK",grpc_method="(\w+)",'
                             r'grpc_service="etcdserverpb.KV",grpc_type="unary"\} (\d+)')
        for u in self.client.values():
            text = urllib.request.urlopen(u + "/metrics", timeout=5).read().decode()
            for m in pattern.finditer(text):
                counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
        return counts

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


class Server:
    """A `flotilla server` on its own data directory and address (`name`, or the next
    `server-N` under `root`), restartable on both."""

    def __init__(self, root, extra, name=None):
        self.root, self.extra = root, extra
        self.name = name or "server-" + str(len(os.listdir(root)))
        self.dir = os.path.join(root, self.name)
        self.api = f"127.0.0.1:{free_port()}"
        self.proc = None
        self.start()

    def start(self):
        env = dict(os.environ, FLOTILLA_LOG="warn", FLOTILLA_CONFIG_DIR=os.path.join(self.root, "config"))
        env.pop("FLOTILLA_TOKEN", None)
        log = open(self.dir + ".log", "a")
        self.proc = subprocess.Popen([BIN, "--data-dir", self.dir, "server", "--listen", self.api] + self.extra,
                                     env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        token = os.path.join(self.dir, "admin.token")
        wait("the admin token", lambda: os.path.exists(token) and open(token).read().strip())
        self.token = open(token).read().strip()
        self.ca = os.path.join(self.dir, "ca.crt")
        self.tls = ssl.create_default_context(cafile=self.ca)
        wait(f"{self.name}'s API", self.healthy)

    def conn(self, timeout=30):
        host, port = self.api.split(":")
        return http.client.HTTPSConnection(host, int(port), context=self.tls, timeout=timeout)

    def request(self, method, path, body=None, timeout=5):
        c = self.conn(timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def healthy(self):
        try:
            c = self.conn(5)
            c.request("GET", "/healthz")
            return c.getresponse().status == 200
        except OSError:
            return False

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def closed_loop(clients, writes, connect, send):
    """`clients` threads, each on its own connection (`connect()`), sending `writes` requests
    one after the other (`send(conn, client, n)` -> HTTP status): latency percentiles, rate
    and the count of answers other than 200/201."""
    latencies = []
    failures = []
    lock = threading.Lock()

    def client(i):
        c = connect()
        mine, failed = [], []
        for w in range(writes):
            t0 = time.perf_counter()
            status = send(c, i, w)
            mine.append(time.perf_counter() - t0)
            if status not in (200, 201):
                failed.append(status)
        with lock:
            latencies.extend(mine)
            failures.extend(failed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {"p50": p(0.50), "p99": p(0.99), "rate": len(latencies) / elapsed, "failed": len(failures)}


def load(server, clients, writes, tag):
    """Applies through the API: each client applies its own service, a new spec each time."""
    def send(c, i, w):
        body = json.dumps({"metadata": {"name": f"{tag}-{i}"},
                           "spec": {"command": "/bin/true", "replicas": 0, "env": {"N": str(w)}}})
        c.request("POST", "/api/v1/services", body=body,
                  headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        return r.status

    return closed_loop(clients, writes, server.conn, send)


def raw_etcd(etcd, clients, writes, tag):
    """etcd's own put latency at `clients` (its JSON gateway, one member, keep-alive): the
    floor under any apply through it on this machine."""
    import base64
    host, port = list(etcd.client.values())[0].replace("http://", "").split(":")

    def send(c, i, w):
        body = json.dumps({"key": base64.b64encode(f"/raw/{tag}-{i}".encode()).decode(),
                           "value": base64.b64encode(b"x" * 300).decode()})
        c.request("POST", "/v3/kv/put", body=body)
        r = c.getresponse()
        r.read()
        return r.status

    return closed_loop(clients, writes, lambda: http.client.HTTPConnection(host, int(port), timeout=30), send)


def main():
    results = {}
    for r in range(ROUNDS):
        for backend in ("embedded", "etcd"):
            root = tempfile.mkdtemp(prefix="flotilla-bench-etcd-")
            etcd = Etcd(root) if backend == "etcd" else None
            if etcd:
                wait("the etcd cluster", etcd.healthy)
            try:
                if etcd:
                    for c in CLIENTS:
                        writes = max(10, WRITES // max(1, c // 10))
                        res = raw_etcd(etcd, c, writes, f"r{r}c{c}")
                        results.setdefault(("raw-etcd", c), []).append(res)
                        print(f"round {r} raw-etcd {c:3} clients: p50 {res['p50']:.2f} ms, p99 {res['p99']:.2f} ms, "
                              f"{res['rate']:.0f} puts/s", flush=True)
                server = Server(root, ["--etcd", etcd.endpoints()] if etcd else [])
                try:
                    for c in CLIENTS:
                        writes = max(10, WRITES // max(1, c // 10))
                        before = etcd.requests() if etcd else {}
                        res = load(server, c, writes, f"r{r}c{c}")
                        results.setdefault((backend, c), []).append(res)
                        cost = ""
                        if etcd:
                            # What the applies cost etcd, with the controller's writes after
                            # them (let it catch up first).
                            time.sleep(1)
                            after = etcd.requests()
                            per = {k: (after[k] - before.get(k, 0)) / (c * writes) for k in after}
                            cost = ", etcd per apply: " + ", ".join(
                                f"{per[k]:.2f} {k}" for k in sorted(per) if per[k] > 0)
                        print(f"round {r} {backend:8} {c:3} clients: p50 {res['p50']:.2f} ms, p99 {res['p99']:.2f} ms, "
                              f"{res['rate']:.0f} writes/s, {res['failed']} failed{cost}", flush=True)
                finally:
                    server.stop()
            finally:
                if etcd:
                    etcd.stop()
    print("medians over the rounds:")
    for (backend, c), rs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {backend:8} {c:3} clients: p50 {statistics.median(x['p50'] for x in rs):.2f} ms, "
              f"p99 {statistics.median(x['p99'] for x in rs):.2f} ms, "
              f"{statistics.median(x['rate'] for x in rs):.0f} writes/s")


if __name__ == "__main__":
    main()
