"""Mutation testing for freecure: plant one-line faults, run the relevant tests, count kills.

A tool, not part of the test suite (see docs/testing.md). For each sampled mutant the script
compiles the mutated module, takes the new code object of the one function (or method) the
fault sits in, and swaps it into the live function (``func.__code__``), so every reference
to the function — ``from .sampling import same_pass`` included — runs the fault; then it runs
the module's tests in-process with ``pytest -x`` and restores the original code. Torch,
diffusers and the test modules are imported once; a mutant costs its tests only.

Faults (inside function bodies only; never in docstrings, error messages or logging):
comparison flips (< ↔ <=, == ↔ !=, is ↔ is not, in ↔ not in), arithmetic swaps (+ ↔ −,
* ↔ /, // → /, ** → *), and ↔ or, dropped ``not`` / unary minus, numbers nudged (n → n+1,
x → 2x, True ↔ False), swapped names of paired roles (FD/PD lanes, height/width,
template/expression, …), a dropped keyword argument, two adjacent positional arguments
swapped, and a call statement deleted.

Usage:
    PYTHONPATH=src python scripts/mutate.py --total 200 --seed 0 --out mutants.jsonl
    python scripts/mutate.py --list --module stages.sampling       # enumerate, do not run
    python scripts/mutate.py --summary mutants.jsonl          # score of a finished run
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# module → the tests that exercise it, fastest first (pytest stops at the first failure). The
# tests mirror the source tree: src/freecure/stages/masks.py is tested by tests/stages/test_masks.py.
WIRING, ENGINE = "tests/test_pipeline_wiring.py", "tests/test_pipeline.py"
TARGETS: dict[str, list[str]] = {
    "freecure.stages.masks": ["tests/stages/test_masks.py", WIRING, ENGINE],
    "freecure.stages.sampling": ["tests/stages/test_expression.py", ENGINE, WIRING],
    "freecure.stages.rofa": [ENGINE, WIRING],
    "freecure.stages.expression": ["tests/stages/test_expression.py", WIRING, ENGINE],
    "freecure.stages.fasa": ["tests/stages/test_fasa.py", "tests/stages/test_config.py"],
    "freecure.attention.fasa": ["tests/stages/test_fasa.py", "tests/stages/test_config.py"],
    "freecure.attention.capture": ["tests/attention/test_capture.py", ENGINE, WIRING],
    "freecure.core.guidance": [ENGINE, WIRING],
    "freecure.pipeline": [WIRING, ENGINE],
    "freecure.backends.base": [WIRING, ENGINE],
    "freecure.backends.token_fusion.backend": ["tests/cli/test_generate.py", ENGINE, WIRING],
    "freecure.backends.common.layers": ["tests/backends/test_photomaker.py", "tests/backends/test_fastcomposer.py"],
    "freecure.backends.photomaker.backend": ["tests/backends/test_photomaker.py"],
    "freecure.backends.photomaker.v2": ["tests/backends/test_photomaker.py"],
    "freecure.backends.photomaker.id_encoder": ["tests/backends/test_photomaker.py"],
    "freecure.backends.fastcomposer.backend": ["tests/backends/test_fastcomposer.py"],
    "freecure.backends.face_diffuser.backend": ["tests/backends/test_face_diffuser.py"],
    "freecure.backends.ip_adapter.faceid": ["tests/backends/ip_adapter/test_faceid.py"],
    "freecure.backends.ip_adapter.instantid": ["tests/backends/ip_adapter/test_instantid.py"],
    "freecure.backends.pulid.sdxl": ["tests/backends/pulid/test_sdxl.py"],
    "freecure.backends.pulid.flux": ["tests/backends/pulid/test_flux.py"],
    "freecure.backends.infiniteyou.backend": ["tests/backends/test_infiniteyou.py"],
    "freecure.evaluation.metrics.lpips": ["tests/evaluation/test_metrics.py"],
    "freecure.evaluation.metrics.clip_score": ["tests/evaluation/test_metrics.py"],
    "freecure.evaluation.metrics.identity": ["tests/evaluation/test_metrics.py"],
    "freecure.evaluation.metrics.diversity": ["tests/evaluation/test_metrics.py", "tests/evaluation/test_runner.py"],
}

# deselected in mutation runs: slow tests whose faults other tests also catch
SLOW = "not same_seed_same_images"

COMPARE = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
BINARY = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
}
PAIRS = [
    ("FD_LANE", "PD_LANE"), ("FD", "PD"), ("UNCOND", "PD_UNCOND"), ("height", "width"), ("h", "w"),
    ("template", "expression"), ("eps_f", "eps_p"), ("parse_fd", "parse_pd"), ("region_fd", "region_pd"),
    ("fd_image", "pd_image"), ("fd", "pd"), ("uncond", "cond"), ("top", "left"), ("bottom", "right"),
    ("image_size", "latent_size"), ("x0", "x1"), ("f0", "f1"), ("n0", "n1"),
]
SWAP = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
QUIET_CALLS = {"logger", "logging", "warnings", "print", "bar", "tqdm"}


@dataclass
class Mutant:
    module: str
    function: str  # qualified name of the top-level function or method whose code changes
    line: int
    kind: str
    description: str
    index: int  # position in the module's enumeration (stable for a given source)


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


class _Finder(ast.NodeVisitor):
    """Enumerates mutation sites as (node path, kind, description, apply callback)."""

    def __init__(self, source: str):
        self.source = source
        self.sites: list[tuple[str, int, str, str, object]] = []
        self.function: str | None = None
        self.names_in_function: set[str] = set()

    def site(self, node, kind, description, apply):
        if self.function is not None:
            self.sites.append((self.function, node.lineno, kind, description, apply))

    # -- scopes
    def visit_ClassDef(self, node):
        if self.function is None:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self._function(item, f"{node.name}.{item.name}")

    def visit_FunctionDef(self, node):
        if self.function is None:
            self._function(node, node.name)
        else:
            self.generic_body(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def _function(self, node, qualname):
        self.function = qualname
        self.names_in_function = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
            a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)
        } | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        self.generic_body(node)
        self.function = None

    def generic_body(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # docstring
        for statement in body:
            self.visit(statement)

    # -- places never mutated
    def visit_Raise(self, node):
        return

    def visit_Assert(self, node):
        return

    def visit_JoinedStr(self, node):
        return

    def visit_Expr(self, node):
        call = node.value
        if isinstance(call, ast.Call):
            root = _root_name(call.func)
            if root in QUIET_CALLS:
                return
            self.site(node, "delete", f"delete `{ast.unparse(node)[:70]}`", lambda n: ast.Pass())
        self.generic_visit(node)

    def visit_Call(self, node):
        root = _root_name(node.func)
        if root in QUIET_CALLS:
            return
        for k, keyword in enumerate(node.keywords):
            if keyword.arg is not None:
                self.site(node, "keyword", f"drop `{keyword.arg}=` in `{ast.unparse(node)[:60]}`",
                          _drop_keyword(k))
        args = node.args
        for k in range(len(args) - 1):
            a, b = ast.unparse(args[k]), ast.unparse(args[k + 1])
            if a != b and not isinstance(args[k], ast.Starred) and not isinstance(args[k + 1], ast.Starred):
                self.site(node, "arguments", f"swap `{a}` and `{b}` in `{ast.unparse(node.func)}(…)`", _swap_args(k))
        self.generic_visit(node)

    def visit_Compare(self, node):
        for k, op in enumerate(node.ops):
            if type(op) in COMPARE:
                new = COMPARE[type(op)]
                self.site(node, "compare", f"{type(op).__name__} → {new.__name__} in `{ast.unparse(node)[:60]}`",
                          _replace_op(k, new))
        self.generic_visit(node)

    def visit_BinOp(self, node):
        if type(node.op) in BINARY and not (isinstance(node.left, ast.Constant) and isinstance(node.left.value, str)):
            new = BINARY[type(node.op)]
            self.site(node, "binary", f"{type(node.op).__name__} → {new.__name__} in `{ast.unparse(node)[:60]}`",
                      _replace_binop(new))
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        if type(node.op) in BINARY:
            new = BINARY[type(node.op)]
            self.site(node, "binary", f"{type(node.op).__name__}= → {new.__name__}= in `{ast.unparse(node)[:60]}`",
                      _replace_binop(new))
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        self.site(node, "boolean", f"{type(node.op).__name__} → {new.__name__} in `{ast.unparse(node)[:60]}`",
                  _replace_binop(new))
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.Not, ast.USub)):
            self.site(node, "unary", f"drop `{type(node.op).__name__}` in `{ast.unparse(node)[:60]}`",
                      lambda n: n.operand)
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            self.site(node, "constant", f"{value} → {not value}", lambda n: ast.Constant(not n.value))
        elif isinstance(value, int):
            self.site(node, "constant", f"{value} → {value + 1}", lambda n: ast.Constant(n.value + 1))
        elif isinstance(value, float):
            new = value * 2 if value else 1.0
            self.site(node, "constant", f"{value} → {new}", lambda n, new=new: ast.Constant(new))

    def visit_Name(self, node):
        other = SWAP.get(node.id)
        if isinstance(node.ctx, ast.Load) and other in self.names_in_function:
            self.site(node, "swap", f"name `{node.id}` → `{other}`",
                      lambda n, other=other: ast.Name(other, ast.Load()))

    def visit_Attribute(self, node):
        other = SWAP.get(node.attr)
        if isinstance(node.ctx, ast.Load) and other in self.names_in_function:
            self.site(node, "swap", f"attribute `.{node.attr}` → `.{other}`",
                      lambda n, other=other: ast.Attribute(n.value, other, ast.Load()))
        self.generic_visit(node)


def _replace_op(k, new):
    def apply(node):
        node.ops[k] = new()
        return node
    return apply


def _replace_binop(new):
    def apply(node):
        node.op = new()
        return node
    return apply


def _drop_keyword(k):
    def apply(node):
        del node.keywords[k]
        return node
    return apply


def _swap_args(k):
    def apply(node):
        node.args[k], node.args[k + 1] = node.args[k + 1], node.args[k]
        return node
    return apply


def module_path(module: str) -> Path:
    return SRC / (module.replace(".", "/") + ".py")


def enumerate_mutants(module: str) -> tuple[list[Mutant], list]:
    source = module_path(module).read_text()
    finder = _Finder(source)
    tree = ast.parse(source)
    for node in tree.body:
        finder.visit(node)
    mutants = [
        Mutant(module, function, line, kind, description, index)
        for index, (function, line, kind, description, _) in enumerate(finder.sites)
    ]
    return mutants, finder.sites


def mutated_code(mutant: Mutant):
    """Compile the module with the mutant applied; return the new code object of its function."""
    source = module_path(mutant.module).read_text()
    tree = ast.parse(source)
    finder = _Finder(source)
    # re-enumerate on a fresh tree and apply the mutant's callback to the matching node
    sites = []

    class Locator(_Finder):
        def site(self, node, kind, description, apply):
            if self.function is not None:
                sites.append((node, apply))

    locator = Locator(source)
    for node in tree.body:
        locator.visit(node)
    node, apply = sites[mutant.index]
    _replace_node(tree, node, apply)
    ast.fix_missing_locations(tree)
    code = compile(tree, str(module_path(mutant.module)), "exec")
    del finder
    return _find_code(code, mutant.function)


def _replace_node(tree, target, apply):
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is target:
                setattr(parent, field, apply(target))
                return
            if isinstance(value, list):
                for k, item in enumerate(value):
                    if item is target:
                        value[k] = apply(target)
                        return
    raise RuntimeError("mutation site not found")


def _find_code(code, qualname):
    for const in code.co_consts:
        if hasattr(const, "co_qualname"):
            if const.co_qualname == qualname:
                return const
            found = _find_code(const, qualname)
            if found is not None:
                return found
    return None


def live_function(module, qualname):
    obj = module
    for part in qualname.split("."):
        obj = obj.__dict__[part] if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def cache_tiny_pipelines() -> None:
    """Build the tiny test pipelines once per process instead of once per pytest run; each
    reuse gets back its original attention processors and a fresh scheduler."""
    import freecure.families.tiny as tiny

    for name in ("tiny_sd15_pipeline", "tiny_sdxl_pipeline"):
        build = getattr(tiny, name)
        cache = {}

        def cached(directory=None, seed=0, build=build, cache=cache):
            if seed not in cache:
                pipe = build(directory, seed)
                cache[seed] = (pipe, dict(pipe.unet.attn_processors), pipe.scheduler)
            pipe, processors, scheduler = cache[seed]
            pipe.unet.set_attn_processor(dict(processors))
            pipe.scheduler = scheduler.__class__.from_config(scheduler.config)
            return pipe

        setattr(tiny, name, cached)


class Timeout(Exception):
    pass


_timed_out = False


def _alarm(signum, frame):
    # raised inside a test, pytest reports it as a failure: the flag tells a timeout apart
    global _timed_out
    _timed_out = True
    raise Timeout()


def run_tests(tests: list[str], timeout: int) -> tuple[int, float]:
    import pytest

    global _timed_out
    _timed_out = False
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            code = pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-k", SLOW])
    except Timeout:
        code = -1
    finally:
        signal.alarm(0)
    return (-1 if _timed_out else int(code)), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="short or full module name; default: all targets")
    parser.add_argument("--total", type=int, default=200, help="mutants sampled over all modules")
    parser.add_argument("--per-module", type=int, default=None, help="sample this many per module instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per mutant (a timeout kills it)")
    parser.add_argument("--out", default="mutants.jsonl", help="results, one JSON line per mutant (appended)")
    parser.add_argument("--list", action="store_true", help="list the sampled mutants and exit")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the unmutated run of each test set (when the suite is known to pass)")
    parser.add_argument("--summary", metavar="JSONL", help="print the score of a results file and exit")
    parser.add_argument("--retry", metavar="JSONL", help="run again the survivors and timeouts of a results file")
    args = parser.parse_args(argv)
    if args.summary:
        return summary(args.summary, args.timeout)

    modules = [m for m in TARGETS if not args.module or any(m == n or m.endswith("." + n) for n in args.module)]
    pools = {m: enumerate_mutants(m)[0] for m in modules}
    total = sum(len(p) for p in pools.values())
    rng = random.Random(args.seed)
    sample: list[Mutant] = []
    for module, pool in pools.items():  # proportional to size (at least 3), or a fixed number
        k = args.per_module or max(3, round(args.total * len(pool) / total))
        sample += rng.sample(pool, min(len(pool), k))
    rng.shuffle(sample)  # interleave modules, so a partial run covers all of them
    if args.retry:
        # matched by what the fault is, not by index, so edits elsewhere in a module do not matter
        again = {(r["module"], r["function"], r["kind"], r["description"]) for r in map(json.loads, open(args.retry))
                 if r["status"] in ("survived", "timeout") or r["seconds"] >= args.timeout}
        sample = [m for pool in pools.values() for m in pool
                  if (m.module, m.function, m.kind, m.description) in again]
    print(f"{total} mutants in {len(modules)} modules; sampled {len(sample)} (seed {args.seed})", flush=True)
    if args.list:
        for m in sample:
            print(f"{m.module}:{m.line} {m.function} [{m.kind}] {m.description}")
        return 0

    sys.path.insert(0, str(SRC))
    os.chdir(ROOT)
    cache_tiny_pipelines()
    done = set()
    if os.path.exists(args.out):
        done = {(r["module"], r["index"]) for r in map(json.loads, open(args.out)) if r.get("index") is not None}
    baseline: dict[tuple[str, ...], int] = {}
    with open(args.out, "a") as out:
        for n, mutant in enumerate(sample, 1):
            if (mutant.module, mutant.index) in done:
                continue
            tests = TARGETS[mutant.module]
            if args.baseline and tuple(tests) not in baseline:
                code, seconds = run_tests(tests, args.timeout * 3)
                baseline[tuple(tests)] = code
                print(f"baseline {' '.join(tests)}: exit {code} in {seconds:.0f}s", flush=True)
                if code != 0:
                    raise SystemExit(f"the unmutated tests fail ({code}); fix them first")
            module = importlib.import_module(mutant.module)
            function = live_function(module, mutant.function)
            new_code = mutated_code(mutant)
            status = "killed"
            if new_code is None or new_code.co_freevars != function.__code__.co_freevars:
                status, seconds = "not-applied", 0.0
            else:
                original = function.__code__
                function.__code__ = new_code
                try:
                    code, seconds = run_tests(tests, args.timeout)
                finally:
                    function.__code__ = original
                status = {0: "survived", -1: "timeout"}.get(code, "killed" if code == 1 else f"error-{code}")
            record = asdict(mutant) | {"status": status, "seconds": round(seconds, 1)}
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(f"[{n}/{len(sample)}] {status:9s} {seconds:5.0f}s {mutant.module}:{mutant.line} "
                  f"{mutant.function} {mutant.description}", flush=True)
    return summary(args.out, args.timeout)


def summary(path: str, timeout: float | None = None) -> int:
    records = [json.loads(line) for line in open(path)]
    for r in records:  # results of runs before the timeout flag existed
        if timeout is not None and r["seconds"] >= timeout and r["status"] != "survived":
            r["status"] = "timeout"
    # a timeout is undecided (the tests neither failed nor finished): left out of the score
    decided = [r for r in records if r["status"] not in ("not-applied", "timeout")]
    killed = [r for r in decided if r["status"] != "survived"]
    timeouts = [r for r in records if r["status"] == "timeout"]
    print(f"{len(killed)}/{len(decided)} mutants killed ({100 * len(killed) / max(1, len(decided)):.1f} %); "
          f"{len(timeouts)} timed out (undecided), {len(records) - len(decided) - len(timeouts)} not applied")
    by_module: dict[str, list] = {}
    for r in decided:
        by_module.setdefault(r["module"], []).append(r["status"] != "survived")
    for module, kills in sorted(by_module.items()):
        print(f"  {module}: {sum(kills)}/{len(kills)}")
    for r in records:
        if r["status"] in ("survived", "timeout"):
            print(f"  {r['status']}: {r['module']}:{r['line']} {r['function']} {r['description']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
