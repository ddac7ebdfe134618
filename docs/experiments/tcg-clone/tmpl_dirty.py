# Hypothesis: the template keeps running (writing the share=on file) after its device state was saved.
import sys, time, os
from vm import *
run_after = float(sys.argv[1]); memf = f"{D}/shm/memory"; st = f"{D}/shm/state"
for p in (memf, st):
    if os.path.exists(p): os.unlink(p)
a = VM("tmpl", memfile=memf, share="on"); assert a.wait_for(r"tick 3 ", 120)
a.qmp("stop")
a.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
a.qmp("migrate", uri=f"exec:cat > {st}"); print("save:", a.wait_migration()["status"])
lt = ticks(a.text())[-1]
if run_after:
    a.qmp("cont"); time.sleep(run_after); a.qmp("stop")
print(f"template saved at tick {lt}, then kept running {run_after}s until tick {ticks(a.text())[-1]}")
a.stop()
b = VM("clone", memfile=memf, share="off", incoming=True)
b.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
b.qmp("migrate-incoming", uri=f"exec:cat {st}"); b.wait_status("paused", 60)
n0 = len(b.text()); tc = time.time(); b.qmp("cont")
seen = {}
while time.time() - tc < run_after + 10:
    for t in ticks(b.text()[n0:]):
        seen.setdefault(t, round(time.time() - tc, 1))
    if time.time()-tc > 5 and "echoed" not in seen:
        n1 = len(b.text()); ts = time.time(); b.send("echo hel''lo; cat /proc/uptime\n"); seen["echoed"] = "no"
        m = b.wait_for("hel''lo", 30, n1); seen["typed-echo-latency"] = round(time.time()-ts, 2) if m else None
        m = b.wait_for("\nhello", 40, n1); seen["cmd-output-at"] = round(time.time()-tc, 1) if m else None
    time.sleep(0.1)
print(repr(b.text()[n0:][-400:])); print("clone ticks (tick: seconds after cont):", seen)
b.stop()
