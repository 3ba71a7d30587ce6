"""Container images built on this machine without a registry or Docker (issue 12, item 2).

  python hack/images.py build [--out DIR] [--venv DIR] [--no-check]   # operator + CPU worker
  python hack/images.py base                                          # just the Debian base
  python hack/images.py import --address SOCK [--json FILE]           # ctr -n k8s.io import
  python hack/images.py selftest-import                               # import into a throwaway containerd

Why this exists: the local real node (containerd, `imagePullPolicy: Never`) needs the images the
catalog and the chart name, and nothing here can reach a registry. So:

- a Debian bookworm minbase rootfs from `debootstrap` (the mirror apt is configured with), slimmed
  and byte-compiled with unchecked-hash .pyc (valid whatever the mtimes, and the root filesystem is
  read-only in pods), all mtimes fixed; cached as a tarball keyed by its package list;
- layers written by this module as deterministic tars (sorted, uid 0, fixed mtime), packed with
  `umoci raw add-layer` / `umoci config` (fixed `--created` / `--history.created`) and exported
  with `skopeo copy ... docker-archive:` for `ctr images import`;
- each image tar is cached in `$TUNESERVE_CACHE/images/<name>-<sha of inputs>.tar`: the base's
  package list, the lock lines used, the files of each layer, the image config. Built only when
  missing.

The CPU worker image does not contain the ~7 GB worker venv: pods mount the host's venv and the
Python it links to read-only by hostPath at the same paths (`images.json` lists those mounts);
the image is the Debian base plus `workers/tuneserve_workers`.

The published vendor images are Containerfiles under images/ (see docs/images.md); only the CPU
worker and the operator are built here.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import yaml

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
# Fixed time for every mtime, `created` and history entry: same inputs give the same bytes.
EPOCH = 1704067200                     # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"
SUITE = "bookworm"
# bash, grep: Essential, always there. libnuma1: vLLM's CPU kernels (vllm/_C*.so) link it; without
# it the engine dies in the pod with "'_C' object has no attribute 'init_cpu_memory_env'".
BASE_PACKAGES = ("python3", "ca-certificates", "wget", "libnuma1")
# Bump when the base recipe (slimming, compile) changes: it is part of the base's cache key.
BASE_RECIPE = "4"
NONROOT = "65532:65532"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APP = "/opt/tuneserve"


def cache_root(cache_dir: Optional[Path] = None) -> Path:
    """$TUNESERVE_CACHE/images (default ~/.cache/tuneserve/images): outside the repo, by content."""
    root = cache_dir or Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve"))
    out = Path(root) / "images"
    out.mkdir(parents=True, exist_ok=True)
    return out


def digest(*parts: bytes | str) -> str:
    """Short sha256 over length-prefixed parts (no ambiguity between ("ab","c") and ("a","bc"))."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(str(len(b)).encode() + b":" + b)
    return h.hexdigest()[:16]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run that fails loudly with the command's own stderr."""
    p = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}{p.stderr[-4000:]}")
    return p


# ---------------------------------------------------------------------------------------------
# Inputs: the Debian mirror, refs from the catalog and the chart, lock lines of an extra.

def debian_mirror(paths: Optional[Iterable[str]] = None) -> str:
    """The Debian mirror apt is configured with (deb822 .sources or one-line sources.list).

    Only mirrors serving the plain `bookworm` suite qualify: security and third-party repositories
    list other suites. debootstrap must use the same mirror apt does: nothing else is reachable.
    """
    files = list(paths) if paths is not None else (
        ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")))
    for f in files:
        with contextlib.suppress(OSError):
            text = Path(f).read_text()
            for stanza in re.split(r"\n\s*\n", text):          # deb822
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
            for line in text.splitlines():                      # one-line format
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and m.group(2) == SUITE:
                    return m.group(1)
    raise RuntimeError(f"no apt source serves {SUITE}: read /etc/apt/sources.list(.d)")


def catalog_refs() -> dict[str, dict[str, str]]:
    """vendor -> {train, serve} image refs from the built-in catalog (the one source of names)."""
    doc = yaml.safe_load((REPO / "operator/tuneserve/core/data/catalog.yaml").read_text())
    return {v: dict(spec["images"]) for v, spec in doc["vendors"].items()}


def operator_ref() -> str:
    """The chart's default operator image: values image.repository + the chart's appVersion."""
    chart = yaml.safe_load((REPO / "charts/tuneserve/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts/tuneserve/values.yaml").read_text())
    return f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    """canonical name -> `name==version` line of requirements/lock.txt."""
    pins = {}
    for line in (REPO / "requirements/lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            pins[_canon(line.split("==", 1)[0].split("[", 1)[0])] = line
    return pins


def extra_lock_lines(extra: str) -> list[str]:
    """The lock lines an extra of pyproject.toml needs, its transitive closure included.

    Walks Requires-Dist of the installed distributions (the venv running this was installed from
    the same lock with --no-deps, so its metadata is the lock's), markers evaluated for this
    interpreter (Python 3.11 on Linux, like bookworm's python3). Offline: the cache key is
    computed before deciding whether anything must be built.
    """
    from importlib import metadata
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    todo = [(Requirement(r), ()) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        req, _ = todo.pop()
        name = _canon(req.name)
        if name in seen:
            continue
        seen.add(name)
        if name not in pins:
            raise RuntimeError(f"{req.name} (needed by the {extra} extra) is not in requirements/lock.txt")
        for line in metadata.distribution(req.name).requires or []:
            dep = Requirement(line)
            envs = [{"extra": e} for e in (req.extras or {""})]
            if dep.marker is None or any(dep.marker.evaluate(e) for e in envs):
                todo.append((dep, ()))
    return sorted(pins[n] for n in seen)


def venv_dir() -> Path:
    """The worker venv `make venv` builds: $TUNESERVE_CACHE/venv-<sha256(lock.txt + pip.txt)[:12]>."""
    data = (REPO / "requirements/lock.txt").read_bytes() + (REPO / "requirements/pip.txt").read_bytes()
    root = Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve"))
    return root / f"venv-{hashlib.sha256(data).hexdigest()[:12]}"


def venv_mounts(venv: Path) -> list[dict[str, str]]:
    """hostPath mounts a pod needs to run `venv`: the venv and the Python installation it links to.

    The venv's bin/python is a symlink into e.g. /root/.pyenv/versions/3.11.7/bin; that
    installation (its lib/libpython3.11.so and stdlib) is the second mount. Same paths inside.
    """
    real = Path(os.path.realpath(venv / "bin" / "python"))
    if not real.is_file():
        raise RuntimeError(f"{venv}/bin/python does not resolve to a file: build the venv (make venv)")
    install = real.parent.parent                       # <prefix>/bin/python3.11 -> <prefix>
    mounts = [{"hostPath": str(venv), "mountPath": str(venv)}]
    if not str(install).startswith(str(venv)):
        mounts.append({"hostPath": str(install), "mountPath": str(install)})
    return mounts


# ---------------------------------------------------------------------------------------------
# Deterministic tars.

def _tarinfo(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = kind, EPOCH, 0, 0, "", ""
    executable = kind == tarfile.DIRTYPE or st.st_mode & 0o111
    ti.mode = 0o755 if executable else 0o644
    return ti


def materialize(files: dict[str, Path], root: Path) -> Path:
    """Copy {path in image: host file or dir} under root (no __pycache__), for a layer or a key."""
    for dest, src in files.items():
        dst = root / dest.strip("/")
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return root


def layer_tar(root: Path, out: Path) -> Path:
    """Tar of everything under root with sorted entries, uid 0, fixed mtime, modes 0755/0644.

    Parent directories of root's contents are emitted as they are under root. Same files (names,
    bytes, executable bits, symlinks) -> same bytes.
    """
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
            name, st = p.relative_to(root).as_posix(), p.lstat()
            if p.is_symlink():
                ti = _tarinfo(name, st, tarfile.SYMTYPE)
                ti.linkname, ti.mode = os.readlink(p), 0o777
                tar.addfile(ti)
            elif p.is_dir():
                tar.addfile(_tarinfo(name, st, tarfile.DIRTYPE))
            else:
                ti = _tarinfo(name, st, tarfile.REGTYPE)
                ti.size = st.st_size
                with open(p, "rb") as f:
                    tar.addfile(ti, f)
    return out


def tree_digest(root: Path) -> str:
    """Hash of a staged layer's files (names, modes, bytes): the layer part of a cache key.

    Taken from the staged copy the layer is then built from, so a file edited meanwhile in the
    checkout cannot give an image whose key says otherwise.
    """
    with tempfile.TemporaryDirectory() as tmp:
        return hashlib.sha256(layer_tar(root, Path(tmp) / "l.tar").read_bytes()).hexdigest()[:16]


def text_file(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


# ---------------------------------------------------------------------------------------------
# The Debian base.

@dataclass
class Base:
    tar: Path          # uncompressed rootfs tar, usable as the first layer; its name holds the
                       # base's key (suite, variant, packages asked for, recipe), part of image keys
    packages: str      # `dpkg-query -W` of the rootfs: name version per line


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p == str(root) or p.startswith(str(root) + "/")), reverse=True)


def unmount_all(root: Path) -> None:
    """Unmount everything under root, deepest first (lazily if busy): cleanup after failures too."""
    for point in _mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True)


def _slim(rootfs: Path) -> None:
    """Drop docs, man pages, locales, apt lists/caches, logs and per-machine files.

    Then byte-compile Python with unchecked-hash .pyc (valid whatever the mtimes are, so the
    fixed mtimes below don't make Python recompile, which a read-only root cannot store anyway).
    """
    for pattern in ("usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/lintian/*",
                    "usr/share/locale/*", "var/cache/apt/*", "var/lib/apt/lists/*", "var/cache/debconf/*-old",
                    "var/lib/dpkg/*-old", "var/log/*", "var/cache/ldconfig/aux-cache", "dev/*", "run/*",
                    "tmp/*", "var/tmp/*", "root/.*", "debootstrap"):
        for p in glob.glob(str(rootfs / pattern)):
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    for p in rootfs.rglob("__pycache__"):
        shutil.rmtree(p)
    for name in ("etc/machine-id", "etc/hostname", "etc/resolv.conf"):
        (rootfs / name).unlink(missing_ok=True)
        (rootfs / name).touch()
    run(["chroot", str(rootfs), "python3", "-m", "compileall", "-q", "--invalidation-mode",
         "unchecked-hash", "/usr/lib/python3.11", "/usr/lib/python3/dist-packages"],
        env={"PATH": SYSTEM_PATH, "SOURCE_DATE_EPOCH": str(EPOCH)})


def tar_rootfs(rootfs: Path, out: Path) -> Path:
    """tar of a rootfs: sorted, numeric owners, every mtime EPOCH, xattrs kept, no atime/ctime.

    --xattrs makes GNU tar write pax headers, which carry atime/ctime unless deleted.
    """
    run(["tar", "--sort=name", "--numeric-owner", f"--mtime=@{EPOCH}", "--format=posix", "--xattrs",
         "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
         "-C", str(rootfs), "-cf", str(out), "."])
    return out


def debian_base(cache_dir: Optional[Path] = None) -> Base:
    """The Debian bookworm minbase rootfs tarball, built once per package list (~90 s cold)."""
    cache = cache_root(cache_dir)
    key = digest(SUITE, "minbase", ",".join(BASE_PACKAGES), BASE_RECIPE)
    out, pkgs = cache / f"debian-{SUITE}-{key}.tar", cache / f"debian-{SUITE}-{key}.packages"
    if out.exists() and pkgs.exists():
        return Base(out, pkgs.read_text())
    work = Path(tempfile.mkdtemp(prefix="debian-", dir=cache))
    rootfs = work / "rootfs"
    try:
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
             str(rootfs), debian_mirror()], env={"PATH": SYSTEM_PATH, "LC_ALL": "C"})
        unmount_all(rootfs)
        listing = run(["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
                      env={"PATH": SYSTEM_PATH}).stdout
        _slim(rootfs)
        tar_rootfs(rootfs, work / "base.tar")
        (work / "packages").write_text(listing)
        os.replace(work / "packages", pkgs)
        os.replace(work / "base.tar", out)
    finally:
        unmount_all(rootfs)
        shutil.rmtree(work, ignore_errors=True)
    return Base(out, pkgs.read_text())


# ---------------------------------------------------------------------------------------------
# Packing: umoci (layers, config) -> skopeo docker-archive.

@dataclass
class ImageSpec:
    name: str                                   # cache file prefix
    refs: list[str]                             # first is the primary tag, others additional
    layers: list[tuple[Path, str]]              # (uncompressed tar, created_by)
    env: dict[str, str]
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = "/"
    labels: dict[str, str] = field(default_factory=dict)

    def config_json(self) -> str:
        return json.dumps({"refs": self.refs, "env": self.env, "entrypoint": self.entrypoint,
                           "cmd": self.cmd, "user": self.user, "workdir": self.workdir,
                           "labels": self.labels}, sort_keys=True)


def _config_args(spec: ImageSpec) -> list[str]:
    args = [f"--created={CREATED}", "--author=tuneserve", "--architecture=amd64", "--os=linux",
            f"--history.created={CREATED}", "--history.created_by=hack/images.py config",
            f"--config.workingdir={spec.workdir}"]
    args += ["--clear=config.env"] + [f"--config.env={k}={v}" for k, v in sorted(spec.env.items())]
    args += [f"--config.entrypoint={a}" for a in spec.entrypoint]
    args += [f"--config.cmd={a}" for a in spec.cmd]
    args += [f"--config.label={k}={v}" for k, v in sorted(spec.labels.items())]
    if spec.user:
        args.append(f"--config.user={spec.user}")
    return args


def pack(spec: ImageSpec, out: Path) -> Path:
    """OCI layout with umoci, then one docker-archive tar carrying every ref (ctr imports it).

    skopeo's docker-archive holds the layers uncompressed, with fixed entry times.
    """
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        layout = f"{tmp}/oci"
        image = f"{layout}:img"
        run(["umoci", "init", "--layout", layout])
        run(["umoci", "new", "--image", image])
        for tar, created_by in spec.layers:
            run(["umoci", "raw", "add-layer", "--image", image, f"--history.created={CREATED}",
                 f"--history.created_by={created_by}", str(tar)])
        run(["umoci", "config", "--image", image, *_config_args(spec)])
        run(["umoci", "gc", "--layout", layout])
        part = Path(tmp) / "image.tar"
        extra = [f"--additional-tag={r}" for r in spec.refs[1:]]
        run(["skopeo", "copy", "--quiet", *extra, f"oci:{image}", f"docker-archive:{part}:{spec.refs[0]}"])
        os.replace(part, out)
    return out


# ---------------------------------------------------------------------------------------------
# The operator image.

OPERATOR_SCRIPT = f"""#!/usr/bin/python3
# tuneserve-operator: the console script of pyproject.toml, for the image's system python3.
import sys
from tuneserve.main import main
sys.exit(main())
"""


def pip_target(lines: list[str], target: Path) -> Path:
    """Install exact lock lines as wheels into target: no resolver (--no-deps), no sdists, no pyc.

    Run by the venv's pip: CPython 3.11 on glibc x86-64, like bookworm's python3 (3.11.2), so
    the same cp311 manylinux wheels are chosen. Console scripts (their shebang points at the
    venv) are dropped.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write("\n".join(lines) + "\n")
        req.flush()
        run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "--no-compile", "--target", str(target), "-r", req.name])
    shutil.rmtree(target / "bin", ignore_errors=True)
    return target


def compile_tree(layer_root: Path, subdir: str) -> None:
    """unchecked-hash .pyc for a read-only image (PYTHONDONTWRITEBYTECODE: none written at run time).

    Paths inside the .pyc are the image's (-s/-p), not the staging directory's: tracebacks read
    right and the bytes do not depend on where the build ran.
    """
    run([sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
         "-s", str(layer_root), "-p", "/", str(layer_root / subdir.strip("/"))],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)})


def operator_sources(stage: Path) -> dict[str, Path]:
    """The operator's code layer: operator/tuneserve, the shared contract module, the entry script.

    tuneserve imports `tuneserve_workers.contract` (which imports pydantic only); the package's
    __init__ imports nothing, so only those two files of workers/ go in.
    """
    script = text_file(stage / "tuneserve-operator", OPERATOR_SCRIPT, 0o755)
    return {f"{APP}/app/tuneserve": REPO / "operator/tuneserve",
            f"{APP}/app/tuneserve_workers/__init__.py": REPO / "workers/tuneserve_workers/__init__.py",
            f"{APP}/app/tuneserve_workers/contract.py": REPO / "workers/tuneserve_workers/contract.py",
            "usr/local/bin/tuneserve-operator": script}


def operator_spec(base: Base, layers: list[tuple[Path, str]]) -> ImageSpec:
    env = {"PATH": SYSTEM_PATH, "PYTHONPATH": f"{APP}/site-packages:{APP}/app",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
           "USER": "nonroot"}   # uid 65532 has no passwd entry: getpass.getuser() reads $USER first
    return ImageSpec("operator", [operator_ref()], [(base.tar, "debootstrap minbase")] + layers, env,
                     entrypoint=["tuneserve-operator"], user=NONROOT,
                     labels={"org.opencontainers.image.source": "https://github.com/tuneserve/tuneserve"})


def build_operator_image(cache_dir: Optional[Path] = None, check: bool = True) -> dict:
    """ghcr.io/tuneserve/operator:<appVersion>: Debian base + the operator extra's wheels + code.

    Two layers on the base: the wheels (changes with the lock) and the code (changes often).
    """
    base, lines, cache = debian_base(cache_dir), extra_lock_lines("operator"), cache_root(cache_dir)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        stage = Path(tmp)
        app_root = materialize(operator_sources(stage / "bin"), stage / "app")
        key = [base.tar.name, base.packages, "\n".join(lines), tree_digest(app_root), sys.version.split()[0]]
        out = cache / f"operator-{digest(*key, operator_spec(base, []).config_json())}.tar"
        if not out.exists():
            deps_root = stage / "deps"
            pip_target(lines, deps_root / APP.strip("/") / "site-packages")
            compile_tree(deps_root, f"{APP}/site-packages")
            compile_tree(app_root, f"{APP}/app")
            layers = [(layer_tar(deps_root, stage / "deps.tar"), "pip install --target: operator extra at lock pins"),
                      (layer_tar(app_root, stage / "app.tar"), "operator/tuneserve + tuneserve_workers.contract")]
            fresh = pack(operator_spec(base, layers), stage / "image.tar")
            if check:                                  # before it enters the cache
                print(check_operator_image(fresh, stage / "check"), end="", file=sys.stderr)
            os.replace(fresh, out)
    return {"name": "operator", "refs": [operator_ref()], "tar": str(out), "mounts": [],
            "lockLines": lines}


@contextlib.contextmanager
def unpacked(image_tar: Path, where: Path) -> Iterator[Path]:
    """The image's rootfs, unpacked with umoci from the docker-archive (what ctr would run)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        run(["skopeo", "copy", "--quiet", f"docker-archive:{image_tar}", f"oci:{where}/oci:img"])
        run(["umoci", "unpack", "--image", f"{where}/oci:img", str(where / "bundle")])
        yield where / "bundle" / "rootfs"
    finally:
        unmount_all(where)
        shutil.rmtree(where, ignore_errors=True)


def bind(src: str, dst: Path, readonly: bool = True) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", src, str(dst)])
    if readonly:
        run(["mount", "-o", "remount,bind,ro", str(dst)])


def chroot_run(rootfs: Path, env: dict[str, str], script: str, user: str = "") -> str:
    """Run a bash script in rootfs with the image's env (and user), /proc and /dev bound in."""
    bind("/proc", rootfs / "proc", readonly=False)
    bind("/dev", rootfs / "dev", readonly=False)
    who = [f"--userspec={user}"] if user else []
    return run(["chroot", *who, str(rootfs), "/usr/bin/env", "-i",
                *[f"{k}={v}" for k, v in env.items()], "/bin/bash", "-ec", script]).stdout


def check_operator_image(image_tar: Path, where: Path) -> str:
    """Import the operator as uid 65532 on a read-only root (the chart's securityContext)."""
    with unpacked(image_tar, where) as rootfs:
        config = image_config(where)
        bind(str(rootfs), rootfs, readonly=True)           # read-only root, like the pod
        return chroot_run(rootfs, dict(e.split("=", 1) for e in config["Env"]),
                          "python3 -c 'import tuneserve.main, tuneserve.controller.handlers; print(\"operator imports ok\")'"
                          " && command -v tuneserve-operator", user=NONROOT)


def image_config(where: Path) -> dict:
    """The OCI config of the image unpacked under where (umoci keeps it in bundle/config.json)."""
    runtime = json.loads((where / "bundle" / "config.json").read_text())
    return {"Env": runtime["process"]["env"], "Args": runtime["process"]["args"]}


# ---------------------------------------------------------------------------------------------
# The CPU worker image.

def worker_refs() -> list[str]:
    """train and serve refs of the catalog's cpu vendor: the same image, two tags."""
    cpu = catalog_refs()["cpu"]
    return [cpu["train"], cpu["serve"]]


def worker_spec(base: Base, layers: list[tuple[Path, str]], venv: Path) -> ImageSpec:
    env = {"PATH": f"{venv}/bin:{SYSTEM_PATH}", "VIRTUAL_ENV": str(venv),
           "PYTHONPATH": f"{APP}/workers", "PYTHONUNBUFFERED": "1"}
    return ImageSpec("worker-cpu", worker_refs(), [(base.tar, "debootstrap minbase")] + layers, env,
                     labels={"dev.tuneserve.venv": str(venv)})


def build_worker_image(cache_dir: Optional[Path] = None, venv: Optional[Path] = None,
                       check: bool = True) -> dict:
    """ghcr.io/tuneserve/{train,serve}:0.1.0-cpu: Debian base + workers/tuneserve_workers.

    The worker stack is not in the image: its PATH starts with the venv's bin, and pods mount the
    venv and its Python by hostPath (returned as `mounts`). The key holds the venv's path, not its
    contents: those are mounted, not copied.
    """
    venv = Path(venv or venv_dir())
    base, cache, mounts = debian_base(cache_dir), cache_root(cache_dir), venv_mounts(venv)
    code = {f"{APP}/workers/tuneserve_workers": REPO / "workers/tuneserve_workers"}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        stage = Path(tmp)
        app_root = materialize(code, stage / "app")
        key = [base.tar.name, base.packages, tree_digest(app_root), worker_spec(base, [], venv).config_json()]
        out = cache / f"worker-cpu-{digest(*key)}.tar"
        if not out.exists():
            app = layer_tar(app_root, stage / "app.tar")
            fresh = pack(worker_spec(base, [(app, "workers/tuneserve_workers")], venv), stage / "image.tar")
            if check:                                  # before it enters the cache
                print(check_worker_image(fresh, stage / "check", mounts), end="", file=sys.stderr)
            os.replace(fresh, out)
    refs = worker_refs()
    return {"name": "worker-cpu", "refs": refs, "tar": str(out), "mounts": mounts}


WORKER_CHECK = """
ray --version
python -c 'import torch, vllm, vllm._C, tuneserve_workers; print("torch", torch.__version__, "vllm", vllm.__version__)'
wget --version | grep -q GNU && echo "wget | grep ok"
"""


def check_worker_image(image_tar: Path, where: Path, mounts: list[dict[str, str]]) -> str:
    """chroot into the unpacked image with the hostPath mounts bound read-only, as the pod has them.

    Runs `ray --version`, imports torch, vllm and tuneserve_workers, and wget | grep (KubeRay's
    probes). Everything bound is unmounted afterwards, on failure too.
    """
    with unpacked(image_tar, where) as rootfs:
        for m in mounts:
            bind(m["hostPath"], rootfs / m["mountPath"].lstrip("/"), readonly=True)
        config = image_config(where)
        return chroot_run(rootfs, dict(e.split("=", 1) for e in config["Env"]), WORKER_CHECK)


# ---------------------------------------------------------------------------------------------
# All of it, images.json, import into containerd.

def build_all(cache_dir: Optional[Path] = None, out: Optional[Path] = None, venv: Optional[Path] = None,
              check: bool = True) -> dict:
    """Build (or reuse) the operator and CPU worker images; write images.json next to the tars.

    Returns {"images": [{"ref", "tar", "mounts": [{"hostPath", "mountPath"}]}, ...]}, one entry
    per ref (the worker's train and serve refs share one tar). With `out`, the tars are linked
    (or copied) into out and images.json is written there.
    """
    built = [build_operator_image(cache_dir, check), build_worker_image(cache_dir, venv, check)]
    dest = Path(out) if out else cache_root(cache_dir)
    dest.mkdir(parents=True, exist_ok=True)
    images = []
    for img in built:
        tar = Path(img["tar"])
        if dest != tar.parent:
            target = dest / tar.name
            if not target.exists():
                with contextlib.suppress(OSError):
                    os.link(tar, target)
                if not target.exists():
                    shutil.copy2(tar, target)
            tar = target
        images += [{"ref": r, "tar": str(tar), "mounts": img["mounts"]} for r in img["refs"]]
    result = {"images": images}
    (dest / "images.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def import_images(ctr_address: str, images: Optional[dict] = None, namespace: str = "k8s.io") -> list[str]:
    """`ctr --address SOCK -n k8s.io images import TAR` once per tar; returns the refs imported."""
    images = images or json.loads((cache_root() / "images.json").read_text())
    done: list[str] = []
    for tar in dict.fromkeys(i["tar"] for i in images["images"]):
        run(["ctr", "--address", ctr_address, "-n", namespace, "images", "import", tar])
        done += [i["ref"] for i in images["images"] if i["tar"] == tar]
    return done


CONTAINERD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
"""


@contextlib.contextmanager
def throwaway_containerd() -> Iterator[str]:
    """A containerd with its own root, state and socket under a temp dir; yields the socket.

    Never touches /var/lib/containerd or /run/containerd. Stopped by its own PID, and whatever it
    mounted under the temp dir is unmounted, on failure too.
    """
    tmp = Path(tempfile.mkdtemp(prefix="tuneserve-containerd-"))
    sock = tmp / "containerd.sock"
    cfg = text_file(tmp / "config.toml", CONTAINERD_CONFIG.format(root=tmp / "root", state=tmp / "state", sock=sock))
    log = open(tmp / "containerd.log", "w")
    proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if sock.exists() and subprocess.run(["ctr", "--address", str(sock), "version"],
                                                capture_output=True).returncode == 0:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {(tmp / 'containerd.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        unmount_all(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="operator + CPU worker images (cached by content)")
    b.add_argument("--out", type=Path, help="directory for the tars and images.json")
    b.add_argument("--venv", type=Path, help="worker venv to mount (default: make venv's)")
    b.add_argument("--no-check", action="store_true", help="skip the chroot checks")
    sub.add_parser("base", help="the Debian base rootfs tarball")
    i = sub.add_parser("import", help="ctr images import into a containerd")
    i.add_argument("--address", required=True)
    i.add_argument("--json", type=Path, help="images.json (default: the cache's)")
    sub.add_parser("selftest-import", help="import into a throwaway containerd and list")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    if args.cmd == "build":
        print(json.dumps(build_all(out=args.out, venv=args.venv, check=not args.no_check), indent=2))
    elif args.cmd == "base":
        print(debian_base().tar)
    elif args.cmd == "import":
        data = json.loads(args.json.read_text()) if args.json else None
        print("\n".join(import_images(args.address, data)))
    else:
        with throwaway_containerd() as sock:
            print("\n".join(import_images(sock)))
            print(run(["ctr", "--address", sock, "-n", "k8s.io", "images", "ls", "-q"]).stdout)
    print(f"{args.cmd}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
