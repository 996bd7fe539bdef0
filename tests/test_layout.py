"""The library reads as its flow: every module imports only what comes before it in one order,
from the infrastructure (config, storage, tracking, ...) through data -> model -> train -> pricing ->
bundles -> inference -> eval -> registry -> experiments -> serving to the stages that run them all,
with no exception and so no package cycle; the library knows no entrypoint (jobs/, serve/)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bundlerec"

# top-level modules and packages of bundlerec, in the order of the flow: each imports only earlier ones
ORDER = (
    # infrastructure
    "runtime", "storage", "config", "integrity", "privacy", "progress", "metrics", "tracking", "hub", "client", "cli",
    # the flow
    "data", "model", "train", "pricing", "bundles", "inference", "eval", "registry", "experiments", "serving",
    # stages that run the flow
    "tune", "price", "report", "demo", "pipeline",
)
RANK = {name: i for i, name in enumerate(ORDER)}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out.update(names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


MODULES = sorted(p for p in PKG.rglob("*.py"))


def test_the_order_names_every_module():
    names = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert names == set(ORDER), (names - set(ORDER), set(ORDER) - names)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down_the_flow(path):
    rel = path.relative_to(PKG)
    owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if owner == "__init__.py":
        return
    imported = _imports(path)
    assert not {m for m in imported if m.split(".")[0] in {"jobs", "serve"}}, "the library knows no entrypoint"
    inner = {m.split(".")[1] for m in imported if m.startswith("bundlerec.") and len(m.split(".")) > 1}
    mine = len(ORDER) if owner == "__init__" else RANK[owner]  # bundlerec/__init__.py: the API facade (bundlerec.load) sits on top
    later = {m for m in inner if m in RANK and RANK[m] > mine}
    assert not later, f"{rel} imports {sorted(later)}, which come after {owner} in the flow"
    if owner in ("serving", "inference"):
        assert "deepspeed" not in {m.split(".")[0] for m in imported}, "serving never needs DeepSpeed"


def test_each_package_has_a_line_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for pkg in sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists()):
        assert f"`bundlerec/{pkg}/`" in readme, pkg


def test_every_library_import_resolves():
    """Imports inside functions (lazy, for start-up time) are not run by a plain import of the
    module: resolve every ``from bundlerec... import name`` of the code base here."""
    import importlib

    files = MODULES + sorted((ROOT / "jobs").glob("*.py")) + sorted((ROOT / "serve").glob("*.py")) + \
        sorted((ROOT / "tests").glob("*.py"))
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bundlerec"):
                mod = importlib.import_module(node.module)
                for a in node.names:
                    if not hasattr(mod, a.name):
                        try:
                            importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError:
                            missing.append(f"{path.relative_to(ROOT)}: from {node.module} import {a.name}")
    assert not missing, missing


def test_image_build_context_excludes_secrets_and_local_state():
    """cluster/Dockerfile copies the project root: the API token, MLflow state, runs and the venv stay out."""
    import fnmatch

    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for path in (".git", ".venv", "runs", "runs/demo/api_token", "mlflow.db", ".cluster"):
        assert any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") or fnmatch.fnmatch(path, p.lstrip("*/"))
                   or fnmatch.fnmatch(path.split("/")[-1], p.replace("**/", "")) for p in patterns), path


def test_the_demo_and_the_tests_need_nothing_beside_the_checkout():
    """A user's clone has no ../shared: no config, Makefile, script or test names it as a path, and the
    shipped datasets are byte-for-byte the shared ones wherever both exist."""
    import hashlib
    import re

    offenders = []
    for p in [ROOT / "Makefile", ROOT / ".ci/run", *(ROOT / "jobs").rglob("*.yaml"), *(ROOT / "jobs").rglob("*.py"),
              *(ROOT / "cluster").rglob("*"), *(ROOT / "tests").glob("*.py")]:
        if p.is_file() and p.suffix != ".md" and p.name != "test_layout.py":
            code = [ln for ln in p.read_text(errors="ignore").splitlines() if not ln.strip().startswith("#")]
            if any(re.search(r"""\.\./shared|/ ["']shared["']""", ln) for ln in code):
                offenders.append(str(p.relative_to(ROOT)))
    assert offenders == ["tests/support.py"], offenders  # support.dataset: ../shared first, else datasets/
    shipped = ROOT / "datasets"
    files = sorted(f for f in shipped.rglob("*.gz"))
    assert {f.relative_to(shipped).parts[0] for f in files} == {"steam_bundles", "bundlerec_intent"}
    shared = ROOT.parent / "shared" / "data"
    for f in files:
        twin = shared / f.relative_to(shipped)
        if twin.exists():
            assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(twin.read_bytes()).digest(), f


def test_modules_stay_small_and_the_worker_loop_reads_as_phases():
    """No module of bundlerec/ over 450 lines; Ray Train's entry point (the worker loop) under 80."""
    long = {str(p.relative_to(PKG)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
    tree = ast.parse((PKG / "train" / "loop.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_loop_per_worker")
    assert loop.end_lineno - loop.lineno + 1 < 80


def test_the_default_models_documented_digest_is_the_installed_one():
    """docs/model-provenance.md names the SHA-256 of the default model's weights: the installed file has it."""
    import hashlib
    import re

    from bundlerec.hub import resolve_model_path

    doc = (ROOT / "docs/model-provenance.md").read_text()
    digest = re.search(r"model\.safetensors\s+sha256 ([0-9a-f]{64})", doc).group(1)
    path = Path(resolve_model_path("all-MiniLM-L6-v2")) / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == digest
