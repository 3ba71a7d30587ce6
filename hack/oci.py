"""Container images without a registry or a container engine: rootfs dir -> image tar.

The real node of the local cluster (hack/realnode.py) runs containerd, but nothing here can pull
from a registry. Images are therefore built from a directory tree with umoci (an OCI layout, one
layer) and turned into a docker-archive tar with skopeo, which ``ctr images import`` reads.

  build_image(rootfs_dir, "tuneserve.local/busybox:1", out_tar, {"entrypoint": ["/bin/sh"]})
  RealNode.import_image(out_tar)    # or: ctr --address SOCK -n k8s.io images import out_tar
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# config keys -> umoci config flags; list values repeat the flag, env may be a dict
_LIST_FLAGS = {"entrypoint": "--config.entrypoint", "cmd": "--config.cmd"}
_SCALAR_FLAGS = {"workdir": "--config.workingdir", "user": "--config.user"}


def _run(*args: str) -> None:
    out = subprocess.run(list(args), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")


def _config_flags(config: dict) -> list[str]:
    """umoci's flags for an image config given as a small dict (entrypoint, cmd, env, workdir,
    user, labels), so callers need not know umoci's flag names."""
    flags: list[str] = []
    for key, flag in _LIST_FLAGS.items():
        if key in config:
            values = list(config[key])
            flags += [f"--clear=config.{key}"] if not values else [f"{flag}={v}" for v in values]
    for key, flag in _SCALAR_FLAGS.items():
        if key in config:
            flags.append(f"{flag}={config[key]}")
    env = config.get("env") or {}
    items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
    flags += [f"--config.env={k}={v}" for k, v in items]
    flags += [f"--config.label={k}={v}" for k, v in (config.get("labels") or {}).items()]
    unknown = set(config) - set(_LIST_FLAGS) - set(_SCALAR_FLAGS) - {"env", "labels"}
    if unknown:
        raise ValueError(f"unknown image config keys {sorted(unknown)}")
    return flags


def build_image(rootfs_dir: Path, name_tag: str, out_tar: Path, config: dict) -> Path:
    """Packs ``rootfs_dir`` as a one-layer image named ``name_tag`` into the docker-archive
    ``out_tar`` (written atomically, so a crash never leaves a half tar that looks cached).

    ``name_tag`` should be fully qualified (``tuneserve.local/x:tag``): containerd and the kubelet
    both normalise short names to docker.io/library/..., which is easy to get wrong in a pod spec.
    """
    rootfs_dir, out_tar = Path(rootfs_dir), Path(out_tar)
    if not (rootfs_dir.is_dir() and any(rootfs_dir.iterdir())):
        raise ValueError(f"{rootfs_dir} is not a non-empty directory")
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oci-", dir=out_tar.parent) as tmp:
        layout = f"{tmp}/layout"
        ref = f"{layout}:img"
        _run("umoci", "init", "--layout", layout)
        _run("umoci", "new", "--image", ref)
        _run("umoci", "insert", "--image", ref, "--no-history", str(rootfs_dir), "/")
        flags = _config_flags(config)
        if flags:
            _run("umoci", "config", "--image", ref, "--no-history", *flags)
        partial = Path(tmp) / "image.tar"
        _run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{ref}",
             f"docker-archive:{partial}:{name_tag}")
        shutil.move(str(partial), out_tar)
    return out_tar


def busybox_rootfs(dest: Path) -> Path:
    """A tiny rootfs: Debian's busybox-static with its applets linked under /bin, plus /etc files
    that tools such as nslookup and wget look for. Enough for test pods (sh, wget, nslookup, cat)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    dest = Path(dest)
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "var/run"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = dest / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    return dest
