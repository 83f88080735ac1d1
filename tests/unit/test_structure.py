"""The tree keeps the architecture (docs/architecture.md): no import cycles between or inside the
packages, no module over 450 lines, no function over 80 without a reason in its docstring, Rich only
in the CLI, the design host's packages never load torch, and one home for the alert thresholds."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "roles", "training", "memory_sync", "infra")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# Which package may import which (a module of the first may import the second); a package always
# imports itself. training and memory_sync never import each other; nothing imports the CLI's package.
MAY_IMPORT = {
    "cluster": {"roles", "training", "memory_sync", "infra"},
    "roles": {"training", "memory_sync", "infra"},
    "training": {"infra"},
    "memory_sync": {"infra"},
    "infra": set(),
}
RICH_ALLOWED = ("cluster/cli/", "cluster/console.py")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(path: Path) -> list[str]:
    """Every module name an import statement in the file names, at any depth (function-level
    imports count: a lazy import is still a dependency)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    return names


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for mod, path in MODULES.items():
        for name in _imports(path):
            target = _resolve(name)
            # a package's __init__ importing its own submodules is how a package is put together
            if target and target != mod and not target.startswith(mod + "."):
                g[mod].add(target)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other (in a loop): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_packages_import_only_downwards():
    bad = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                 if a.split(".")[0] != b.split(".")[0] and b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]])
    assert not bad, f"imports against the layering {MAY_IMPORT}: {bad}"


def test_training_never_imports_ray_and_memory_sync_never_imports_torch():
    forbidden = {"training": ("ray",), "memory_sync": ("torch", "transformers", "trl", "peft", "ray"),
                 "roles": ("torch", "transformers", "trl", "peft"), "infra": ("torch", "ray")}
    bad = []
    for mod, path in MODULES.items():
        for name in _imports(path):
            if name.split(".")[0] in forbidden.get(mod.split(".")[0], ()):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad


def test_no_module_over_the_size_limit():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by what they own): {big}"


def test_long_functions_say_why():
    bad = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_FUNCTION_LINES and "Long because" not in doc:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines without 'Long because ...' in the docstring: {bad}"


def test_rich_only_in_the_cli():
    bad = []
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(RICH_ALLOWED[0]) or rel == RICH_ALLOWED[1]:
            continue
        if any(name.split(".")[0] == "rich" for name in _imports(path)):
            bad.append(rel)
    assert not bad, f"Rich belongs to the CLI ({', '.join(RICH_ALLOWED)}): {bad}"


def test_the_design_host_packages_never_load_the_training_stack():
    """Import every module of cluster, roles and memory_sync in a fresh interpreter: torch,
    transformers and trl stay out of sys.modules (a design host installs without them)."""
    mods = sorted(m for m in MODULES if m.split(".")[0] in ("cluster", "roles", "memory_sync")
                  and not m.endswith("__main__"))
    probe = ("import importlib, sys\n"
             f"for m in {mods!r}:\n    importlib.import_module(m)\n"
             "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
    assert len(mods) > 20  # the walk found the packages


# -- one home for the thresholds: the watchdog's defaults are what rules.yml alerts at --------------

def _alerts() -> dict[str, dict]:
    doc = yaml.safe_load((ROOT / "infra" / "prometheus" / "rules.yml").read_text())
    out = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            out[rule.get("alert") or rule.get("record")] = rule
    return out


def _number_after(expr: str, pattern: str) -> float:
    m = re.search(pattern + r"\s*([0-9.]+)", " ".join(expr.split()))
    assert m, f"{pattern!r} not in {expr!r}"
    return float(m.group(1))


def test_the_watchdog_and_rules_yml_alert_at_the_same_thresholds():
    from training.config import USABLE_FRACTION, Thresholds, TrainConfig
    from training.run.watchdog import RULES

    t, a = Thresholds(), _alerts()
    alert_of = {"gpu_memory_high": "DuetGpuMemoryHigh", "gpu_temperature_high": "DuetGpuTemperatureHigh",
                "throughput_drop": "DuetThroughputDrop", "grad_norm_high": "DuetGradNormHigh",
                "grad_norm_vanishing": "DuetGradNormVanishing", "loss_nan": "DuetLossNaN",
                "training_stalled": "DuetTrainingStalled"}
    assert set(alert_of) == set(RULES)
    for rule, severity in RULES.items():
        assert a[alert_of[rule]]["labels"]["severity"] == severity, rule
    assert _number_after(a["DuetGpuMemoryHigh"]["expr"], r"ratio >") == t.vram_fraction
    assert USABLE_FRACTION < t.vram_fraction  # a plan that fits never alarms
    assert _number_after(a["DuetGpuTemperatureHigh"]["expr"], r"duet_gpu_temperature_celsius >") == t.temperature_c
    limit = a["duet:gpu_temperature_limit:celsius"]["expr"]
    assert _number_after(limit, r"celsius -") == t.slowdown_margin_c
    assert _number_after(limit, r"- [0-9.]+,") == t.temperature_c
    assert _number_after(a["DuetThroughputDrop"]["expr"], r"<") == t.throughput_drop
    assert _number_after(a["DuetGradNormHigh"]["expr"], r">") == t.grad_norm_high
    assert _number_after(a["DuetGradNormVanishing"]["expr"], r"<") == t.grad_norm_low
    stall = re.search(r"\[(\d+)m\]", a["DuetTrainingStalled"]["expr"])
    assert stall and int(stall.group(1)) * 60 == t.stall_seconds
    # the engine's rollback policy and the alert share their defaults (TrainConfig's fields come from Thresholds)
    fields = TrainConfig.model_fields
    assert fields["grad_norm_limit"].default == t.grad_norm_high
    assert fields["grad_norm_min"].default == t.grad_norm_low
    assert fields["grad_norm_patience"].default == t.grad_norm_patience


def test_both_stores_implement_the_store_interface():
    import inspect

    from memory_sync.cortex import Cortex
    from memory_sync.neocortex import Neocortex
    from memory_sync.stores import Store

    for cls in (Cortex, Neocortex):
        assert isinstance(cls.kind, str) and cls.names and all(isinstance(n, str) for n in cls.names), cls
        for name in ("migrate", "upsert_events", "count", "dump", "load", "restore", "undo_restore", "close"):
            want = list(inspect.signature(getattr(Store, name)).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            assert len(got) >= len(want), f"{cls.__name__}.{name}{got} vs Store.{name}{want}"


def test_test_modules_have_unique_names():
    """pytest collects tests/ without packages: two test files of one basename stop the whole run."""
    from collections import Counter

    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], [n for n, k in names.items() if k > 1]


def test_every_environment_variable_is_documented():
    """docs/environment.md names every ``DUET_*`` variable the code reads (and nothing trains differently
    by one: those are config fields)."""
    import re

    doc = (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")
    used = {m for p in MODULES.values() for m in re.findall(r"DUET_[A-Z0-9_]*[A-Z0-9]", p.read_text(encoding="utf-8"))}
    missing = sorted(v for v in used if f"`{v}`" not in doc)
    assert not missing, f"undocumented in docs/environment.md: {missing}"
    assert not {"DUET_CPU_FAST_LOSS", "DUET_CPU_LORA_FP32", "DUET_CPU_FAST_DROPOUT"} & used


def test_actors_are_called_only_through_the_client_module():
    """``.remote(`` appears in the actor shells and the one client module only (roles/client.py)."""
    allowed = {"roles/actors.py", "roles/client.py"}
    bad = [str(p.relative_to(ROOT)) for p in MODULES.values()
           if ".remote(" in p.read_text(encoding="utf-8") and str(p.relative_to(ROOT)) not in allowed]
    assert not bad, f".remote( outside {sorted(allowed)}: {bad}"


def test_the_terminal_run_states_are_defined_once():
    import re

    bad = [str(p.relative_to(ROOT)) for p in MODULES.values()
           if re.search(r"\(\s*\"finished\",\s*\"failed\",\s*\"cancelled\"\s*\)", p.read_text(encoding="utf-8"))
           and not str(p).endswith("infra/run_states.py")]
    assert not bad, f"the terminal states written out again (import infra.run_states.TERMINAL): {bad}"
