"""The house rules that keep the layout readable, checked: imports point down (no module of ops/
or triton_kernels/ loads the reference or the compile checker, no import cycle among the package's
modules), the backends' private C++ schemas are the public ops', and nothing the library writes can
shadow the package."""
import ast
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import pangu_ops
from pangu_ops import backends

ROOT = Path(pangu_ops.__file__).resolve().parent
TRITON_KERNELS = ROOT.parent / "triton_kernels"


def _modules() -> dict[str, Path]:
    """Module name -> file, for pangu_ops and the Triton kernels (installed as pangu_ops.triton_kernels)."""
    out = {}
    for base, package in ((ROOT, "pangu_ops"), (TRITON_KERNELS, "pangu_ops.triton_kernels")):
        for f in base.rglob("*.py"):
            if "benchmarks" in f.parts or (base == ROOT and "triton_kernels" in f.relative_to(ROOT).parts):
                continue
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


MODULES = _modules()


def _top_level_imports(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports when it is imported (not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only: lazy imports don't count
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import sub` imports the submodule when there is one
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _top_level_imports(name, path) for name, path in MODULES.items()}


def test_kernels_and_op_modules_do_not_import_the_reference_or_the_compile_checker():
    bad = {"pangu_ops.reference", "pangu_ops.triton_kernels.compile_check", "pangu_ops.verify"}
    offenders = {name: sorted(GRAPH[name] & bad) for name in GRAPH
                 if name.startswith(("pangu_ops.ops", "pangu_ops.triton_kernels")) and GRAPH[name] & bad
                 and name != "pangu_ops.triton_kernels.compile_check"}
    assert not offenders, offenders


def test_no_import_cycles():
    """Module-level imports among the package's modules form no cycle (a parent package importing
    its own submodules is how packages work and is left out)."""
    edges = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail():
    assert "pangu_ops.checks" in GRAPH["pangu_ops.reference"]  # the graph sees `from . import checks`
    assert "pangu_ops.backends" in GRAPH["pangu_ops.ops._define"]


def test_importing_pangu_ops_loads_no_reference_module():
    code = "import sys, pangu_ops; print(sorted(m for m in sys.modules if m.startswith('pangu_ops')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pangu_ops.reference" not in loaded and "compile_check" not in loaded, loaded


def _args(schema: torch.FunctionSchema) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in schema.arguments]


@pytest.mark.parametrize("op", ["permute", "unpermute", "unpermute_backward", "grouped_gemm", "grouped_gemm_wgrad",
                                "expert_mlp", "gated_backward", "rre_dispatch", "adamw_experts"])
def test_cpu_backend_schemas_are_the_public_ops(op):
    """`torch.ops.pangu_cpu.<op>` is the cpu backend's private name for the kernel of
    `torch.ops.pangu.<op>`: same arguments, same types, same outputs."""
    backends.load("cpu")
    public = getattr(torch.ops.pangu, op).default._schema
    private = getattr(torch.ops.pangu_cpu, op).default._schema
    assert _args(private) == _args(public)
    assert [str(r.type) for r in private.returns] == [str(r.type) for r in public.returns]


def test_cache_folder_is_per_user_and_not_importable(monkeypatch, tmp_path):
    from pangu_ops.backends.cache import cache_dir

    monkeypatch.delenv("PANGU_OPS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("x") == tmp_path / "xdg" / "pangu-ops" / "x" and (tmp_path / "xdg" / "pangu-ops" / "x").is_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir().parent == Path.home() / ".cache"
    assert not cache_dir().name.isidentifier()  # no folder Python could import as a package
    monkeypatch.setenv("PANGU_OPS_CACHE", str(tmp_path / "mine"))
    assert cache_dir("ascend_twin") == tmp_path / "mine" / "ascend_twin"


README_FIRST_EXAMPLE = """
import torch, pangu_ops

x = torch.randn(64, 32, dtype=torch.bfloat16)
expert_ids = torch.randint(0, 4, (64, 2))
weights = torch.rand(64, 2)
w_up = torch.randn(4, 32, 16, dtype=torch.bfloat16) * 0.03
x_sorted, group_sizes, sorted_index = pangu_ops.permute(x, expert_ids, num_experts=4)
h = pangu_ops.grouped_gemm(x_sorted, w_up, group_sizes)
y = pangu_ops.unpermute(h, sorted_index, weights)
print("ok", tuple(y.shape))
"""


def test_readme_example_runs_from_the_temp_folder_after_the_twin_is_built(tmp_path):
    """The library's build caches once lived in <tmp>/pangu_ops/ and, as a namespace package,
    shadowed the installed pangu_ops for every script run from the temp folder."""
    backends.load("ascend_twin")  # builds (or finds) the AscendC twin in the cache folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for where in (Path(tempfile.gettempdir()), tmp_path):
        assert not (where / "pangu_ops").exists(), f"{where / 'pangu_ops'} would shadow the package"
        script = where / f"pangu_ops_readme_{os.getpid()}.py"  # the script's folder is sys.path[0]
        script.write_text(textwrap.dedent(README_FIRST_EXAMPLE))
        try:
            done = subprocess.run([sys.executable, str(script)], cwd=where, capture_output=True, text=True, env=env)
        finally:
            script.unlink()
        assert done.returncode == 0 and "ok (64, 16)" in done.stdout, done.stderr
