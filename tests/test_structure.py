"""The package's structure: no import cycles inside lepton_core/, one code table shared by C++ and
Python (csrc/common/codes.h -> _C.codes -> lepton_core/_codes.py)."""
import ast
import os
import re

import lepton_core as lc
from lepton_core import _C, _codes

PKG_DIR = os.path.dirname(os.path.abspath(lc.__file__))  # the package under test (installed or in-tree)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout holding these tests


def _modules():
    """{module name: file} for every .py file of the package."""
    mods = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG_DIR))[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    for native in ("_C", "_C_cuda"):  # native modules (built or not): leaves of the graph
        mods["lepton_core." + native] = None
    return mods


def _imports(name: str, path: str, mods) -> set:
    """The package modules `name` imports anywhere in its file (function-level imports included)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import lepton_core.distributed._comm` -> that module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: (_imports(m, p, mods) if p else set()) for m, p in mods.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "active"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "active":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_python_tables_come_from_the_native_one():
    assert _codes.DTYPE_CODES == _C.codes["dtype"]
    assert {n: f.code for n, f in _codes.FORMATS.items()} == {n: v[0] for n, v in _C.codes["format"].items()}
    assert _codes.REDUCE_OPS == _C.codes["reduce_op"]
    assert (_codes.MIN_BLOCK, _codes.MAX_BLOCK) == _C.codes["block_limits"]
    # The formats' facts, as API.md §2 states them.
    f = _codes.FORMATS
    assert [(n, f[n].qmax) for n in f] == [("int8", 127), ("uint8", 255), ("int4", 7), ("fp8_e4m3", 448),
                                           ("fp8_e5m2", 57344)]
    assert [n for n in f if f[n].zero_point] == ["uint8"] and [n for n in f if f[n].stochastic] == ["int8", "uint8", "int4"]


def test_code_enums_are_defined_only_in_codes_h():
    """Every `enum lp_*` / code table of the native sources lives in csrc/common/codes.h."""
    csrc = os.path.join(REPO, "csrc")
    pattern = re.compile(r"\benum\s+(lp_\w+|QuantFormat)\b|\benum\s*:\s*int\s*\{\s*DT_")
    found = []
    for root, _, files in os.walk(csrc):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith((".h", ".cc", ".cu", ".cuh")) and os.path.relpath(path, csrc) != os.path.join("common", "codes.h"):
                with open(path) as src:
                    for i, line in enumerate(src, 1):
                        if pattern.search(line):
                            found.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
    assert not found, "code tables outside csrc/common/codes.h:\n" + "\n".join(found)


def test_every_native_argument_is_named():
    """Bindings name every argument (py::arg), so calls read by keyword and the stubs say what each is."""
    unnamed = []
    for name in dir(_C):
        obj = getattr(_C, name)
        members = [obj] if callable(obj) and not isinstance(obj, type) else \
            [m for m in vars(obj).values() if callable(m)] if isinstance(obj, type) else []
        for m in members:
            sig = (getattr(m, "__doc__", None) or "").split("\n")[0]
            if re.search(r"\barg\d+\s*:", sig):
                unnamed.append(sig)
    assert not unnamed, "unnamed native arguments:\n" + "\n".join(unnamed)


def test_native_stubs_are_up_to_date():
    import importlib.util

    if _C.cpu_isa_compiled() < len(_C.codes["isa"]) - 1:
        import pytest

        pytest.skip("a cut-down build (LEPTON_MAX_ISA) lacks some bindings the stubs describe")
    spec = importlib.util.spec_from_file_location("gen_stubs", os.path.join(REPO, "tools", "gen_stubs.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(REPO, "lepton_core", "_C.pyi")) as f:
        assert f.read() == gen.stub_text("lepton_core._C"), "lepton_core/_C.pyi is stale: run tools/gen_stubs.py"
    # The CUDA module imports without a GPU (it only links the CUDA runtime); builds with nvcc have it.
    if importlib.util.find_spec("lepton_core._C_cuda") is not None:
        with open(os.path.join(REPO, "lepton_core", "_C_cuda.pyi")) as f:
            assert f.read() == gen.stub_text("lepton_core._C_cuda"), \
                "lepton_core/_C_cuda.pyi is stale: run tools/gen_stubs.py with the CUDA module built"
