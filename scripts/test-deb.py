#!/usr/bin/env python3
"""The .deb's life on a machine, as root: install, run, reload, upgrade, remove, purge.

    scripts/test-deb.py [--binary PATH]

Builds two packages of the same binary (versions V and V+1) with scripts/build-deb.sh, checks
the units with `systemd-analyze verify`, installs the first with `dpkg -i`, and runs
flotilla.service the way systemd would where no systemd runs here: its ExecStart, with a
NOTIFY_SOCKET this script listens on (READY=1 must arrive) and its Environment. It adds a
service to the conffile and sends SIGHUP (ExecReload): the service runs. Then the upgrade as
systemd does it: `dpkg -i` of V+1 (the modified conffile kept), SIGTERM to the main process
(KillMode=process), ExecStart again: the instance keeps its pid. Ctrl-C stops it; `dpkg -r`
removes the binary and keeps the configuration; `dpkg -P` removes both and /var/lib/flotilla.
Exits non-zero, with what went wrong, at the first failed check.
"""
import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = ["flotilla.service", "flotilla-agent.service", "flotilla-server.service"]


def run(*cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def fail(msg):
    print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def ok(msg):
    print(f"ok: {msg}")


def wait(what, timeout, f):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = f()
        if v:
            return v
        time.sleep(0.05)
    fail(f"timed out waiting for {what}")


def unit_field(unit, field):
    """The values of `field=` in an installed unit."""
    out = []
    with open(f"/lib/systemd/system/{unit}") as f:
        for line in f:
            if line.startswith(field + "="):
                out.append(line.split("=", 1)[1].strip())
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Service:
    """flotilla.service run as systemd would run it (ExecStart, Environment, NOTIFY_SOCKET)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.sock_path = os.path.join(tmp, f"notify-{time.monotonic_ns()}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.settimeout(0.1)
        env = dict(os.environ)
        for e in unit_field("flotilla.service", "Environment"):
            k, v = e.split("=", 1)
            env[k] = v
        env["NOTIFY_SOCKET"] = self.sock_path
        self.env = env
        cmd = shlex.split(unit_field("flotilla.service", "ExecStart")[0])
        self.log = open(os.path.join(tmp, "service.log"), "a")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        self.messages = []

    def notified(self, what):
        def got():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
            return any(what in m for m in self.messages)
        wait(f"{what} from the service ({self.messages})", 60, got)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig):
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            fail(f"the service did not exit after {sig}")
        self.sock.close()
        return code


def cli(env, *args):
    return run("/usr/bin/flotilla", *args, env=env, check=False)


def instances(env):
    r = cli(env, "get", "instances", "-o", "json")
    if r.returncode != 0:
        return []
    try:
        return json.loads(r.stdout).get("items", [])
    except ValueError:
        return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", help="the flotilla binary to package (default: a static build)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("skipped: scripts/test-deb.py installs a package and needs root")
        return
    if subprocess.run(["dpkg-query", "-W", "flotilla"], capture_output=True).returncode == 0:
        fail("a flotilla package is installed already: this test would replace it")

    tmp = tempfile.mkdtemp(prefix="flotilla-deb-")
    build = [os.path.join(ROOT, "scripts/build-deb.sh"), "--out", tmp]
    if args.binary:
        build += ["--binary", args.binary]
    version = run("sed", "-n", 's/^version = "\\(.*\\)"/\\1/p',
                  os.path.join(ROOT, "Cargo.toml")).stdout.split()[0]
    newer = version + "+1"
    deb_a = run(*build, "--version", version).stdout.strip().splitlines()[-1]
    deb_b = run(*build, "--version", newer).stdout.strip().splitlines()[-1]
    ok(f"built {os.path.basename(deb_a)} and {os.path.basename(deb_b)} (lintian: no error)")

    try:
        run("dpkg", "-i", deb_a)
        ok(f"dpkg -i {os.path.basename(deb_a)}")
        for unit in UNITS:
            r = run("systemd-analyze", "verify", f"/lib/systemd/system/{unit}", check=False)
            # A clean unit prints nothing. Outside a booted systemd, verify may also say it
            # cannot reach the manager's bus; anything else is about the unit: a failure.
            bad = [l for l in (r.stdout + r.stderr).splitlines()
                   if l.strip() and "bus" not in l.lower()]
            if bad:
                fail(f"systemd-analyze verify {unit}:\n" + "\n".join(bad))
        ok("systemd-analyze verify: the three units")
        if run("getent", "passwd", "flotilla", check=False).returncode != 0:
            fail("no flotilla system user")
        if not os.path.isdir("/var/lib/flotilla"):
            fail("no /var/lib/flotilla")
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "flotilla").stdout
        for c in ["/etc/flotilla/flotilla.toml", "/etc/flotilla/server.toml",
                  "/etc/flotilla/agent.toml"]:
            if c not in conffiles:
                fail(f"{c} is not a conffile: {conffiles}")
        ok("the flotilla user, /var/lib/flotilla and three conffiles")

        # The conffile, edited as a user would: ports of this test, and one service.
        api, gateway, metrics = free_port(), free_port(), free_port()
        conf = "/etc/flotilla/flotilla.toml"
        with open(conf, "w") as f:
            f.write(f'''[up]
api = "127.0.0.1:{api}"
gateway = "127.0.0.1:{gateway}"
metrics = "127.0.0.1:{metrics}"
data_dir = "/var/lib/flotilla/up"
''')
        svc = Service(tmp)
        svc.notified("READY=1")
        ok("flotilla.service's ExecStart sends READY=1")
        with open(conf, "a") as f:
            f.write('''
[service.ticker]
command = "sh"
args = ["-c", "while true; do echo tick; sleep 0.2; done"]
''')
        svc.signal(signal.SIGHUP)
        svc.notified("RELOADING=1")
        first = wait("the reloaded file's service running", 60, lambda: [
            i for i in instances(svc.env) if i["status"].get("phase") == "Running"])
        pid = first[0]["status"]["pid"]
        ok(f"ExecReload (SIGHUP) applied the new service: pid {pid}")

        run("dpkg", "-i", "--force-confold", deb_b)
        installed = run("dpkg-query", "-W", "-f=${Version}", "flotilla").stdout
        if installed != newer:
            fail(f"after the upgrade dpkg says {installed}")
        with open(conf) as f:
            if "ticker" not in f.read():
                fail("the upgrade replaced the edited conffile")
        # What systemd does on the postinst's try-restart: SIGTERM to the main process only.
        code = svc.stop(signal.SIGTERM)
        if code != 0:
            fail(f"the service exited {code} on SIGTERM")
        if not os.path.exists(f"/proc/{pid}"):
            fail(f"the instance (pid {pid}) died with the service")
        svc = Service(tmp)
        svc.notified("READY=1")
        after = wait("the instance re-adopted", 60, lambda: [
            i for i in instances(svc.env) if i["status"].get("phase") == "Running"])
        if after[0]["status"]["pid"] != pid:
            fail(f"the instance was restarted by the upgrade: pid {pid} → {after[0]['status']['pid']}")
        ok(f"upgrade to {newer}: the service restarted, the instance kept pid {pid}")

        code = svc.stop(signal.SIGINT)
        if code != 0:
            fail(f"the service exited {code} on SIGINT")
        wait("the instance stopped by Ctrl-C", 30, lambda: not os.path.exists(f"/proc/{pid}"))
        ok("SIGINT stops the instance with the service")

        run("dpkg", "-r", "flotilla")
        if os.path.exists("/usr/bin/flotilla"):
            fail("dpkg -r left /usr/bin/flotilla")
        if not os.path.exists(conf):
            fail("dpkg -r removed the configuration")
        run("dpkg", "-P", "flotilla")
        for gone in [conf, "/var/lib/flotilla"]:
            if os.path.exists(gone):
                fail(f"dpkg -P left {gone}")
        ok("dpkg -r keeps the configuration, dpkg -P removes it and /var/lib/flotilla")
    finally:
        if subprocess.run(["dpkg-query", "-W", "flotilla"], capture_output=True).returncode == 0:
            subprocess.run(["dpkg", "-P", "flotilla"], capture_output=True)
        subprocess.run(["rm", "-rf", tmp])
    print("deb: all checks passed")


if __name__ == "__main__":
    main()
