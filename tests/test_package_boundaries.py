"""The import rules of the layout, read from the source (every import, module-level or not):

- the SDK (clients/python/loraplex) imports neither the server nor the trainer: its `serve`, `train`,
  `adapters publish` and `base` commands are found by name when they run;
- the server and the trainer import only the generated stubs of the SDK's package (loraplex.v1, .oip);
- front ends are codecs over api/: they import nothing of engine/, lora/ or runtime/;
- only api/serving_runtime.py (and app/, which builds it) reach into runtime/.
And importing a stub loads no SDK module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDK = ROOT / "clients" / "python" / "loraplex"
SERVER = ROOT / "server" / "loraplex_server"
ADAPTERS = ROOT / "adapters" / "loraplex_adapters"
STUBS = ("loraplex.v1", "loraplex.oip")


def imports(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """file -> every module it imports (relative imports resolved against its package)."""
    found = {}
    for path in folder.rglob("*.py"):
        relative = path.relative_to(folder)
        if relative.parts[0] in skip:
            continue
        package = [folder.name, *relative.parts[:-1]]
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                stem = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
                module = ".".join(part for part in (stem, node.module or "") if part)
                names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def offending(found: dict[str, set[str]], rule) -> list[str]:
    return sorted(f"{file}: {name}" for file, names in found.items() for name in names if not rule(file, name))


def test_the_sdk_imports_neither_the_server_nor_the_trainer():
    assert offending(imports(SDK, skip=("v1", "oip")),
                     lambda _, name: not name.startswith(("loraplex_server", "loraplex_adapters"))) == []


def _stubs_only(_, name: str) -> bool:
    return not (name == "loraplex" or name.startswith("loraplex.")) or name.startswith(STUBS)


def test_the_server_and_the_trainer_import_only_the_stubs_of_the_sdk_package():
    assert offending(imports(SERVER), _stubs_only) == []
    assert offending(imports(ADAPTERS), _stubs_only) == []


def test_front_ends_are_codecs_over_the_request_path():
    layers = ("loraplex_server.engine", "loraplex_server.lora", "loraplex_server.runtime")
    assert offending(imports(SERVER / "frontends"), lambda _, name: not name.startswith(layers)) == []


def test_only_serving_runtime_and_app_reach_into_runtime():
    def allowed(file: str, name: str) -> bool:
        return (not name.startswith("loraplex_server.runtime") or file.endswith("api/serving_runtime.py")
                or "/runtime/" in file)
    assert offending({f: n for f, n in imports(SERVER).items() if "/app/" not in f}, allowed) == []


def test_a_stub_import_loads_no_sdk_module():
    code = ("import sys; import loraplex.v1.inference_pb2_grpc, loraplex.oip.grpc_predict_v2_pb2; "
            "print(sorted(m for m in sys.modules if m.startswith('loraplex.') and not m.startswith("
            f"{STUBS!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_options_choices_agree_with_the_engine():
    from loraplex_server.app import options
    from loraplex_server.engine import base_model

    assert (options.QUANTIZE_CHOICES, options.DTYPE_CHOICES) == (base_model.QUANTIZE_CHOICES,
                                                                  base_model.DTYPE_CHOICES)


def test_every_package_folder_is_in_the_installed_distribution():
    """pyproject lists the packages by hand (package-dir maps three roots): a folder with an __init__.py that
    is missing from the list works in the editable checkout and is absent from a wheel or a Docker image."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join((root.name, *init.parent.relative_to(root).parts))
             for root in (SDK, SERVER, ADAPTERS) for init in root.rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
