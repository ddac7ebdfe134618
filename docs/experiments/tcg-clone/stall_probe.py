# During the stall of a clone whose template ran DELTA s after save: is the LAPIC timer firing?
import sys, time, os, re
from vm import *
delta = float(sys.argv[1]); memf = f"{D}/shm/memory"; st = f"{D}/shm/state"
for p in (memf, st):
    if os.path.exists(p): os.unlink(p)
a = VM("tmpl", memfile=memf, share="on"); assert a.wait_for(r"tick 3 ", 120)
a.qmp("stop"); a.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
a.qmp("migrate", uri=f"exec:cat > {st}"); a.wait_migration()
print("template at save:", [l for l in a.hmp("info lapic").splitlines() if l.startswith("Timer")], ticks(a.text())[-1])
a.qmp("cont"); time.sleep(delta); a.qmp("stop"); print("template ran to tick", ticks(a.text())[-1]); a.stop()
b = VM("clone", memfile=memf, share="off", incoming=True)
b.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
b.qmp("migrate-incoming", uri=f"exec:cat {st}"); b.wait_status("paused", 60)
print("clone restored:", [l for l in b.hmp("info lapic").splitlines() if l.startswith("Timer")])
n0=len(b.text()); tc=time.time(); b.qmp("cont")
for i in range(6):
    time.sleep(1)
    lt=[l.split("initial_count = ")[1] for l in b.hmp("info lapic").splitlines() if l.startswith("Timer")][0]
    r=b.hmp("info registers"); rip=re.search(r"RIP=(\S+)",r).group(1); hlt=re.search(r"HLT=(\d)",r).group(1)
    print(f"t+{time.time()-tc:.0f}s lapic initial/current={lt} RIP={rip} HLT={hlt} new ticks={ticks(b.text()[n0:])}")
m=b.wait_for(r"tick (\d+) up=(\S+)", delta+10, n0); print(f"first tick after cont at {time.time()-tc:.1f}s: {m.group(0) if m else None}")
b.stop()
