"""The package keeps the layers DESIGN.md draws: each module imports only its own layer or the ones below."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "xiaolm"
CORE = {"errors", "io", "config", "device", "chat_format", "records"}
FORBIDDEN = {  # package (or core module) → packages it must never import, directly or inside a function
    "model": {"data", "tokenizer", "train", "infer", "eval", "demo", "cli"},
    "data": {"train", "infer", "eval", "demo", "cli"},
    "tokenizer": {"data", "train", "infer", "eval", "demo", "cli"},
    "infer": {"train", "eval", "data", "demo", "cli"},
    "eval": {"train", "demo", "cli"},
    "train": {"demo", "cli"},
    **{core: {"data", "tokenizer", "model", "train", "infer", "eval", "demo", "cli"} for core in CORE},
}
MAX_LINES = 420


def xiaolm_imports(path: Path) -> set[str]:
    """Top-level xiaolm packages a module imports (absolute imports; the package uses no relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n.split(".")[1] for n in names if n.startswith("xiaolm.") and n.count(".") >= 1)
    return found


def layer_of(path: Path) -> str:
    part = path.relative_to(SRC).parts[0]
    return part.removesuffix(".py")


def test_no_module_imports_a_layer_above_it():
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        layer = layer_of(path)
        bad = xiaolm_imports(path) & FORBIDDEN.get(layer, set())
        if bad:
            broken.append(f"{path.relative_to(SRC)} imports {', '.join(sorted(bad))}")
    assert not broken, "\n".join(broken)


def test_the_layering_check_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from xiaolm.train.loop import train\n    import xiaolm.data.stage\n")
    assert xiaolm_imports(probe) == {"train", "data"}


def test_no_source_file_is_over_about_400_lines():
    long = [f"{p.relative_to(SRC)}: {n}" for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, long
