"""saelib's layers (pyproject.toml's [tool.importlinter] contracts) and its public face.

The contracts are checked with import-linter itself, on the package as it is and on a copy with one
upward import added, which must break them (a contract that cannot fail would check nothing)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import saelib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(config), "--no-cache"], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def probe_copy(tmp_path: Path) -> tuple[Path, Path]:
    """saelib copied as package ``saelib_probe`` (so the installed saelib cannot shadow it), with
    its contracts renamed to match."""
    pkg = tmp_path / "saelib_probe"
    shutil.copytree(ROOT / "saelib", pkg, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bsaelib\b(?=[. ])", "saelib_probe", f.read_text()))
    config = tmp_path / "pyproject.toml"
    contracts = (ROOT / "pyproject.toml").read_text().split("[tool.importlinter]", 1)[1]
    config.write_text("[tool.importlinter]" + re.sub(r"\bsaelib\b", "saelib_probe", contracts))
    return pkg, config


def test_layer_contracts_hold():
    result = lint(ROOT / "pyproject.toml", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("core/sae.py", "saelib_probe.subjects.corpora"),      # core must not read subjects
    ("subjects/activations.py", "saelib_probe.studies.splice"),
    ("core/allocation.py", "saelib_probe.core.training"),  # inside core: the rules sit below the trainer
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    pkg, config = probe_copy(tmp_path)
    assert lint(config, tmp_path).returncode == 0, "the renamed copy must pass before it is changed"
    target = pkg / module
    target.write_text(target.read_text() + f"\nimport {upward}  # noqa\n")
    result = lint(config, tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout
    assert f"{upward.replace('/', '.')}" in result.stdout


def test_public_api_is_importable_and_listed():
    assert saelib.__all__ and all(hasattr(saelib, name) for name in saelib.__all__)
    cfg = saelib.SAEConfig(d_in=8, d_sae=32, rule="topk", k=4)
    assert isinstance(saelib.SAE(cfg), saelib.SAE) and "topk" in saelib.RULES


def test_readme_module_map_matches_the_tree():
    """Every module of saelib is in the README's layout section, and every module named there exists."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Where things live"):]
    section = section[:section.index("\n## ", 4)]
    named = set(re.findall(r"`(saelib(?:/\w+)+\.py)`", section))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "saelib").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert named == modules, f"README lacks {sorted(modules - named)}; names missing {sorted(named - modules)}"


def test_every_core_module_has_a_place_in_the_inner_contract():
    """A module left out of a layers contract is not checked at all: each of core's must be named."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    inner = next(c for c in contracts if c.get("containers") == ["saelib.core"])
    named = {m.strip() for layer in inner["layers"] for m in layer.split("|")}
    modules = {p.stem for p in (ROOT / "saelib" / "core").glob("*.py") if p.name != "__init__.py"}
    assert named == modules, f"not placed: {sorted(modules - named)}; placed but missing: {sorted(named - modules)}"
