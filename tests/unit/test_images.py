"""Every image the catalog and the chart name has a Containerfile that produces it, on a pinned base.

images/images.yaml maps each ref to a Containerfile (and stage); the published images are built from
those with any OCI builder, so a catalog ref without one would be an image nobody can build.
"""
from pathlib import Path
import re

import yaml

REPO = Path(__file__).resolve().parents[2]
MAPPING = yaml.safe_load((REPO / "images" / "images.yaml").read_text())["images"]


def catalog_refs() -> set[str]:
    doc = yaml.safe_load((REPO / "operator/tuneserve/core/data/catalog.yaml").read_text())
    return {ref for vendor in doc["vendors"].values() for ref in vendor["images"].values()}


def chart_operator_ref() -> str:
    chart = yaml.safe_load((REPO / "charts/tuneserve/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts/tuneserve/values.yaml").read_text())
    return f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"


def stages(containerfile: Path) -> list[tuple[str, str]]:
    """(base, alias) of each FROM line, ARG defaults substituted."""
    text = containerfile.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    out = []
    for base, alias in re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I):
        out.append((re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base), alias))
    return out


def test_every_catalog_and_chart_image_has_a_containerfile():
    wanted = catalog_refs() | {chart_operator_ref()}
    assert wanted - set(MAPPING) == set(), "refs without a Containerfile in images/images.yaml"
    assert set(MAPPING) - wanted == set(), "images/images.yaml names refs nothing uses"


def test_each_mapping_points_at_an_existing_stage():
    for ref, entry in MAPPING.items():
        path = REPO / "images" / entry["containerfile"]
        assert path.is_file(), f"{ref}: {path} missing"
        aliases = {alias for _, alias in stages(path)}
        if "target" in entry:
            assert entry["target"] in aliases, f"{ref}: no stage {entry['target']} in {path.name}"
        else:
            assert len(stages(path)) == 1 or "" in aliases, f"{ref}: multi-stage file needs a target"


def test_every_from_is_pinned_to_a_tag():
    for path in sorted((REPO / "images").glob("*.Containerfile")):
        aliases = {alias for _, alias in stages(path)}
        for base, _ in stages(path):
            if base in aliases:
                continue                                   # an earlier stage of the same file
            assert "$" not in base, f"{path.name}: unresolved build arg in FROM {base}"
            name, _, tag = base.rpartition(":") if "@" not in base else (base, "", "digest")
            assert name and "/" not in tag, f"{path.name}: FROM {base} has no tag"
            assert tag != "latest", f"{path.name}: FROM {base} is not pinned"


def test_the_tag_names_the_vendor_runtime_of_its_containerfile():
    """A -cuda12.8 ref built from the ROCm file would pass the tests above; the suffix pins it."""
    suffix_file = {"cpu": "cpu", "cuda": "cuda", "rocm": "rocm", "cann": "cann", "gaudi": "gaudi",
                   "neuron": "neuron", "tpu": "tpu"}
    for ref, entry in MAPPING.items():
        if "operator" in ref:
            assert entry["containerfile"] == "operator.Containerfile"
            continue
        runtime = re.match(r"[\d.]+-([a-z]+)", ref.rpartition(":")[2]).group(1)
        assert entry["containerfile"] == f"{suffix_file[runtime]}.Containerfile", ref
        assert entry["target"] == ref.rpartition("/")[2].split(":")[0], f"{ref}: stage must be train/serve"
