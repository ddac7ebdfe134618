"""Minimal QEMU/QMP/serial harness for the TCG clone experiments (stdlib only)."""
import json, os, re, socket, subprocess, time

D = os.environ.get("D", "/tmp/tcgclone")
KERNEL = [f for f in sorted(os.listdir("/boot")) if f.startswith("vmlinuz-") and "cloud-amd64" in f][-1]
KERNEL = "/boot/" + KERNEL
INITRD = D + "/initrd.gz"
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")


class VM:
    def __init__(self, name, machine="q35", cpu="max", mem="256M", append="", extra=(),
                 boot=True, memfile=None, share=None, incoming=False, smp=1):
        self.name = name
        self.qmp_path = f"{D}/{name}.qmp"
        self.ser_path = f"{D}/{name}.ser"
        self.log = f"{D}/{name}.log"
        for p in (self.qmp_path, self.ser_path, self.log):
            if os.path.exists(p):
                os.unlink(p)
        a = [QEMU] + (["-L", os.environ["QEMU_L"]] if os.environ.get("QEMU_L") else []) + ["-nodefaults", "-nographic", "-display", "none",
             "-machine", f"{machine},accel=tcg", "-cpu", cpu, "-m", mem, "-smp", str(smp),
             "-chardev", f"socket,id=ser0,path={self.ser_path},server=on,wait=off,logfile={self.log}",
             "-serial", "chardev:ser0",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
             "-monitor", "none"]
        if memfile:
            a += ["-object", f"memory-backend-file,id=mem0,size={mem},mem-path={memfile},share={share}",
                  "-numa", "node,memdev=mem0"]
        if boot:
            a += ["-kernel", KERNEL, "-initrd", INITRD,
                  "-append", "console=ttyS0 panic=-1 quiet " + append]
        if incoming:
            a += ["-incoming", "defer"]
        a += list(extra)
        self.argv = a
        self.t0 = time.time()
        self.p = subprocess.Popen(a, stdin=subprocess.DEVNULL, stdout=open(f"{D}/{name}.out", "w"),
                                  stderr=subprocess.STDOUT)
        self.pid = self.p.pid
        self._qmp_connect()
        self.ser = None
        self.serial_connect()

    def _qmp_connect(self):
        for _ in range(500):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.qmp_path)
                break
            except OSError:
                if self.p.poll() is not None:
                    raise RuntimeError(open(f"{D}/{self.name}.out").read())
                time.sleep(0.01)
        self.q = s
        self.qf = s.makefile("rwb")
        json.loads(self.qf.readline())
        self.qmp("qmp_capabilities")

    def qmp(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.qf.write(json.dumps(msg).encode() + b"\n")
        self.qf.flush()
        while True:
            r = json.loads(self.qf.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{cmd}: {r['error']}")
            return r["return"]

    def hmp(self, line):
        return self.qmp("human-monitor-command", **{"command-line": line})

    def serial_connect(self):
        if self.ser is None:
            self.ser = socket.socket(socket.AF_UNIX)
            self.ser.connect(self.ser_path)
            import threading
            def drain(s=self.ser):
                try:
                    while s.recv(65536):
                        pass
                except OSError:
                    pass
            threading.Thread(target=drain, daemon=True).start()

    def send(self, text):
        self.serial_connect()
        self.ser.sendall(text.encode())

    def text(self):
        try:
            return open(self.log, errors="replace").read()
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern, timeout=60, start=0):
        t = time.time()
        while time.time() - t < timeout:
            m = re.search(pattern, self.text()[start:])
            if m:
                return m
            time.sleep(0.05)
        return None

    def wait_status(self, st, timeout=60):
        t = time.time()
        while time.time() - t < timeout:
            if self.qmp("query-status")["status"] == st:
                return True
            time.sleep(0.02)
        return False

    def wait_migration(self, timeout=120):
        t = time.time()
        while time.time() - t < timeout:
            r = self.qmp("query-migrate")
            if r.get("status") in ("completed", "failed", "cancelled"):
                return r
            time.sleep(0.02)
        return r

    def pss_kb(self):
        for l in open(f"/proc/{self.pid}/smaps_rollup"):
            if l.startswith("Pss:"):
                return int(l.split()[1])

    def rss_kb(self):
        for l in open(f"/proc/{self.pid}/smaps_rollup"):
            if l.startswith("Rss:"):
                return int(l.split()[1])

    def stop(self):
        try:
            self.qmp("quit")
        except Exception:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, 9)  # kill by our own pid only
            self.p.wait()
        for s in (self.q, self.ser):
            try:
                s and s.close()
            except Exception:
                pass
        for p in (self.qmp_path, self.ser_path):
            if os.path.exists(p):
                os.unlink(p)


def ticks(text):
    return [int(x) for x in re.findall(r"tick (\d+)", text)]
