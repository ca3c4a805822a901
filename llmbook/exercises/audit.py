"""A static audit of a submitted exercise notebook: flags code that reads the answers or dodges the checker.

`audit_notebook(sources, exercises)` reads the code cells' source (it runs nothing) and returns, for each
exercise that has something to flag, short sentences such as ``"imports llmbook.attention"``; notebook-wide
flags that no answer reaches are filed under ``"*"``. Clean notebooks give ``{}``. A flag is a reason for an
instructor to read the code, not a verdict: the grader prints it beside the verdict.

Each cell is parsed with `ast` (IPython `%magic` and `!shell` lines are blanked first and flagged when they
can run commands or read the environment); a cell that does not parse is flagged and scanned with regular
expressions instead. Names are resolved through the notebook's imports and simple aliases (``F =
torch.nn.functional``, ``sm = getattr(torch, "softmax")``), so ``from torch import special as s;
s.softmax(x)`` reads as ``torch.special.softmax``.

Detected, wherever it appears (attributed to the exercise whose answer reaches it, else ``"*"``):
- imports of the references: `llmbook.exercises` beyond `check`/`hint`, its chapter modules beyond the names
  a notebook is handed (`NOTEBOOK_API` of `chNN.py`), the checker's modules, ``.reference``/``.cases()``;
- frame and trace inspection (`inspect`, `sys._getframe`, ``.f_back``/``.f_locals``, `sys.settrace`,
  `sys.setprofile`, `threading.settrace`, `traceback` stacks, `gc.get_referrers`/`get_objects`);
- environment reads (`os.environ`, `os.getenv`, ``%env``, any string containing ``LLMBOOK_``);
- rebinding or patching the checker: assigning, defining, deleting or importing-as `check`, `hint`,
  `run_check`; assigning attributes of `llmbook`, `torch` or other modules (also by `setattr`);
- dynamic code: `exec`, `eval`, `compile`, `__import__`, `importlib`, `runpy`, `globals()`/`vars()`/
  `locals()`, ``__dict__``, ``__getattribute__``, `getattr` on a module with a computed name,
  `operator.attrgetter`/`methodcaller`, `pickle` (and `dill`, `shelve`), `builtins`, `sys.modules`;
- code-object tricks (``__code__``, ``__globals__``, ``__closure__``, ``__wrapped__``, `types.FunctionType`,
  `types.CodeType`, `marshal`), `torch.ops`, `torch._C`, `torch.library`, `torch.overrides`, and classes
  defining ``__torch_function__``, ``__eq__``, ``__bool__``, ``__float__`` or ``__index__``;
- strings naming `/proc` (another process's environment or memory);
- processes and signals (`subprocess`, `os.system`, `os.fork`, `multiprocessing`, `signal`, `ctypes`,
  ``!shell`` lines, shell and code-loading magics, `get_ipython()`), `from x import *`;
- imports of modules that are neither Python's nor installed packages (a file beside the notebook, whose
  code the audit cannot read), and relative imports.
Detected only when an exercise's answer reaches it (the function passed to `check`, the functions and
top-level names it reads, transitively, and every statement of the notebook that assigns those names:
the grader calls the answers after the last cell, so a name rebound after its check counts):
- a use of a package module the exercise re-implements (the modules of its chapter's `forbid` entries and
  of its references, e.g. `llmbook.attention` for chapter 3; experiments may use the package);
- a call of one of its `forbid` functions under any name torch gives it (``torch.special.softmax``,
  ``torch._softmax``, ``torch.ops.aten._softmax``, ``nn.Softmax``, the ``x.softmax()`` method,
  ``log_softmax`` for softmax, ``nll_loss`` for cross-entropy, ``nn.Linear`` for linear...).

Not detected: anything built at run time from strings the audit cannot see (``getattr(obj, name)`` on an
object that is not a module, a name decoded from bytes, code fetched from a file or the network),
data passed through objects other than notebook-level names (an attribute of an argument, a closure's
cell, a container handed from function to function), an import or
forbidden call that no answer reaches statically (unless it is reached through one of the dynamic routes
above, which are flagged), a hard-coded table of answers, copying the package's code by hand, and
anything done outside the notebook (the grader's own isolation covers files and processes).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import site
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import cache

import torch

NOTEBOOK_WIDE = "*"
MAX_SOURCE_CHARS = 2_000_000  # a notebook's code beyond this is scanned for words, not parsed
# Syntax nested deeper than this is scanned for words, not analysed: the analysis recurses, and whether a
# deeper tree exhausts Python's stack would depend on how deep the caller's stack already is.
MAX_NESTING = 200
EXERCISE_NAME = re.compile(r"\d\d\.\w+")
CHECKER_NAMES = ("check", "hint", "run_check")
ALLOWED_FROM_EXERCISES = ("check", "hint")
CHECKER_MODULES = ("core", "checker", "compare", "grade", "audit", "protocol", "sandbox")
# Other routes to a forbidden torch function (normalised names: lower case, no underscores).
EXTRA_ALIASES = {
    "softmax": ("logsoftmax",),
    "crossentropy": ("nllloss",),
    "scaleddotproductattention": ("scaleddotproduct",),
    "multiheadattention": ("multiheadattentionforward",),
}
FRAME_ATTRIBUTES = (
    "f_back",
    "f_locals",
    "f_globals",
    "f_code",
    "f_trace",
    "tb_frame",
    "gi_frame",
    "cr_frame",
)
CODE_ATTRIBUTES = (
    "__code__",
    "__globals__",
    "__closure__",
    "__wrapped__",
    "__builtins__",
    "__subclasses__",
    "__defaults__",
    "__kwdefaults__",
)
REFERENCE_ATTRIBUTES = ("reference", "make_cases", "hidden_cases", "_REGISTRY", "_HINTS_SHOWN")
DYNAMIC_BUILTINS = {
    "exec": "runs code from a string (exec)",
    "eval": "runs code from a string (eval)",
    "compile": "compiles code from a string (compile)",
    "__import__": "imports dynamically (__import__)",
    "globals": "looks names up dynamically (globals())",
    "vars": "looks names up dynamically (vars())",
    "locals": "looks names up dynamically (locals())",
    "get_ipython": "uses get_ipython() (can run magics and shell commands)",
    "__builtins__": "uses the builtins module",
}
MUTATING_METHODS = {"append", "extend", "insert", "update", "setdefault", "add", "pop", "popitem", "clear"}
MUTATING_METHODS |= {"remove", "discard", "sort", "reverse", "__setitem__"}
# Methods whose definition lets an answer fool a comparison or intercept torch.
TRICK_METHODS = {
    "__torch_function__": "intercepts torch calls (defines __torch_function__)",
    "__torch_dispatch__": "intercepts torch calls (defines __torch_dispatch__)",
    "__eq__": "defines __eq__ (an answer can compare equal to anything)",
    "__ne__": "defines __ne__ (an answer can compare equal to anything)",
    "__bool__": "defines __bool__ (an answer can compare equal to anything)",
    "__float__": "defines __float__ (an answer can pose as a number)",
    "__index__": "defines __index__ (an answer can pose as a number)",
}
# Prefix of a resolved dotted name -> flag (first match wins; "{}" is the name).
DOTTED_FLAGS = (
    ("os.environ", "reads the environment (os.environ)"),
    ("os.getenv", "reads the environment (os.getenv)"),
    ("os.putenv", "changes the environment (os.putenv)"),
    ("os.unsetenv", "changes the environment (os.unsetenv)"),
    ("inspect.", "inspects frames ({})"),
    ("inspect", "inspects frames (inspect)"),
    ("sys._getframe", "inspects frames (sys._getframe)"),
    ("sys._current_frames", "inspects frames (sys._current_frames)"),
    ("sys.exc_info", "inspects frames (sys.exc_info)"),
    ("sys.setprofile", "turns off the call watcher (sys.setprofile)"),
    ("sys.settrace", "inspects frames (sys.settrace)"),
    ("sys.monitoring", "turns off the call watcher (sys.monitoring)"),
    ("threading.setprofile", "turns off the call watcher ({})"),
    ("threading.settrace", "inspects frames ({})"),
    ("traceback.", "inspects frames ({})"),
    ("gc.get_referrers", "searches live objects (gc.get_referrers)"),
    ("gc.get_referents", "searches live objects (gc.get_referents)"),
    ("gc.get_objects", "searches live objects (gc.get_objects)"),
    ("sys.modules", "reaches modules through sys.modules"),
    ("importlib", "imports dynamically ({})"),
    ("runpy", "imports dynamically ({})"),
    ("builtins", "uses the builtins module"),
    ("types.FunctionType", "builds a function from a code object (types.FunctionType)"),
    ("types.LambdaType", "builds a function from a code object (types.LambdaType)"),
    ("types.CodeType", "builds a function from a code object (types.CodeType)"),
    ("marshal", "builds a function from a code object (marshal)"),
    ("torch.ops.aten", "calls torch.ops.aten"),
    ("torch.ops", "calls torch.ops"),
    ("torch._C", "uses torch._C (torch's internals)"),
    ("torch.overrides", "intercepts torch calls ({})"),
    ("torch.utils._python_dispatch", "intercepts torch calls ({})"),
    ("subprocess", "starts processes ({})"),
    ("multiprocessing", "starts processes ({})"),
    ("pty", "starts processes ({})"),
    ("os.system", "starts processes (os.system)"),
    ("os.popen", "starts processes (os.popen)"),
    ("os.fork", "starts processes (os.fork)"),
    ("os.exec", "starts processes ({})"),
    ("os.spawn", "starts processes ({})"),
    ("os.posix_spawn", "starts processes ({})"),
    ("os.kill", "sends signals ({})"),
    ("signal", "changes signal handlers ({})"),
    ("ctypes", "uses ctypes"),
    ("operator.attrgetter", "looks up an attribute by name (operator.attrgetter)"),
    ("operator.methodcaller", "looks up an attribute by name (operator.methodcaller)"),
    ("pickle", "runs code from a pickle ({})"),
    ("dill", "runs code from a pickle ({})"),
    ("cloudpickle", "runs code from a pickle ({})"),
    ("shelve", "runs code from a pickle ({})"),
    ("posix", "uses the posix module directly ({})"),
    ("torch.library", "overrides torch operators ({})"),
    ("torch._ops", "calls torch.ops"),
)
PATCHABLE_ROOTS = ("llmbook", "torch", "sys", "os", "builtins", "numpy", "einops", "math")
PYTHON_CELL_MAGICS = ("time", "timeit", "capture", "prun")  # the rest of the cell is Python
TEXT_CELL_MAGICS = ("html", "markdown", "latex", "svg")  # the cell is shown, not run
SHELL_MAGICS = ("system", "sx", "bash", "sh", "script", "run", "load", "writefile", "env", "set_env")
# Fallback for cells that do not parse: (pattern, flag).
REGEX_FLAGS = (
    (r"os\s*\.\s*environ|getenv|%\s*env|%\s*set_env", "reads the environment (os.environ)"),
    (r"LLMBOOK_", "names an LLMBOOK_ environment variable"),
    (r"\binspect\b|_getframe|\bf_back\b|\bf_locals\b|\bf_globals\b|\btb_frame\b", "inspects frames"),
    (r"setprofile|settrace|sys\s*\.\s*monitoring", "turns off the call watcher (sys.setprofile)"),
    (r"get_referrers|get_referents|get_objects", "searches live objects (gc)"),
    (r"__code__|__globals__|__closure__|__wrapped__|FunctionType|CodeType", "touches a code object"),
    (r"torch\s*\.\s*ops", "calls torch.ops"),
    (r"\b(exec|eval|compile|__import__)\s*\(|importlib", "runs or imports code dynamically"),
    (
        r"llmbook\s*\.\s*exercises\s*\.\s*(ch\d\d|core|checker|compare|grade)",
        "imports llmbook.exercises internals",
    ),
    (
        r"get_exercise|all_exercises|run_check|\.reference\b|\.cases\s*\(",
        "reads an exercise's reference or cases",
    ),
    (r"\b(check|hint|run_check)\s*=[^=]|\bdef\s+(check|hint|run_check)\b", "rebinds check"),
    (r"import\s+\*", "imports everything from a module (from ... import *)"),
    (r"subprocess|os\s*\.\s*system|os\s*\.\s*fork|^\s*!", "starts processes"),
)


@dataclass
class Finding:
    """What the audit saw at one place: a flag (`text`), or a name (`dotted`/`method`) judged per exercise."""

    statement: int
    text: str = ""
    dotted: str = ""
    method: str = ""


def _nesting_depth(tree: ast.AST) -> int:
    """How deeply `tree`'s nodes nest (counted without recursion, so any depth can be measured)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


@dataclass
class _Statement:
    """A top-level statement of the notebook (cells in order) and the global names it binds and reads."""

    index: int
    node: ast.AST
    stores: set[str] = field(default_factory=set)
    reads: set[str] = field(default_factory=set)


def audit_notebook(sources: list[str], exercises: list[str]) -> dict[str, list[str]]:
    """Flags per exercise name (or "*" for notebook-wide ones) for the code cells `sources`, in cell order."""
    notebook = _Notebook(sources)
    flags: dict[str, list[str]] = {}

    def add(key: str, text: str) -> None:
        if text not in flags.setdefault(key, []):
            flags[key].append(text)

    for text in notebook.cell_flags:
        add(NOTEBOOK_WIDE, text)
    reached: set[int] = set()
    for name in exercises:
        closure = notebook.closure(name)
        rules = _ExerciseRules.of(name)
        for finding in notebook.findings:
            if finding.statement not in closure:
                continue
            reached.add(id(finding))
            for text in [finding.text] if finding.text else rules.judge(finding):
                add(name, text)
    for finding in notebook.findings:
        if finding.text and id(finding) not in reached:
            add(NOTEBOOK_WIDE, finding.text)
    return {key: texts for key, texts in flags.items() if texts}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "")


def _aliases(name: str) -> tuple[str, ...]:
    """Normalised names under which torch offers the forbidden function `name` (a prefix match is a hit)."""
    return (_normalise(name), *EXTRA_ALIASES.get(_normalise(name), ()))


@dataclass
class _ExerciseRules:
    """What counts against one exercise: the package modules it re-implements and its forbidden functions."""

    name: str
    modules: tuple[str, ...]
    torch_names: tuple[str, ...]  # the forbidden torch functions' own names ("softmax")
    tensor_methods: tuple[str, ...]  # those of them that are also Tensor methods
    package_names: tuple[str, ...]  # the forbidden package functions or classes ("causal_mask", "Tokenizer")

    @classmethod
    def of(cls, name: str) -> _ExerciseRules:
        from llmbook.exercises.core import get_exercise

        try:
            ex = get_exercise(name)
        except ValueError:  # an exercise this audit does not know: only the notebook-wide rules apply
            return cls(name, (), (), (), ())
        # An experiment is run with the package; a prediction is made by hand, so any package module counts.
        by_kind = {"experiment": (), "predict": ("llmbook",)}
        modules = by_kind[ex.kind] if ex.kind in by_kind else reimplemented_modules(name[:2])
        torch_names, methods, package = [], [], []
        for dotted in ex.forbid:
            parts = dotted.split(".")
            if parts[0] == "torch":
                torch_names.append(parts[-1])
                if hasattr(torch.Tensor, parts[-1]):
                    methods.append(parts[-1])
            else:
                package.append(next(p for p in parts[1:] if p[:1].isupper() or p == parts[-1]))
        return cls(name, modules, tuple(torch_names), tuple(methods), tuple(package))

    def judge(self, finding: Finding) -> list[str]:
        """The flags `finding` raises for this exercise (none when it is allowed here)."""
        if finding.method:
            called = _normalise(finding.method)
            return [
                self._forbidden(f"Tensor.{finding.method}", name)
                for name in self.tensor_methods
                if called in _aliases(name)
            ][:1]
        dotted = finding.dotted
        parts = dotted.split(".")
        flags = []
        if parts[0] == "torch":
            last = _normalise(parts[-1])
            for name in self.torch_names:
                if any(last.startswith(alias) for alias in _aliases(name)):
                    flags.append(self._forbidden(dotted, name))
        elif parts[0] == "llmbook":
            flags += [self._forbidden(dotted, name) for name in self.package_names if name in parts[1:]]
            module = ".".join(parts[:2])
            if module != "llmbook.exercises" and any(
                dotted == m or dotted.startswith(m + ".") for m in self.modules
            ):
                flags.append(f"imports {module}")
        return flags[:1] if parts[0] == "torch" else flags

    def _forbidden(self, dotted: str, name: str) -> str:
        return f"calls a forbidden function: {dotted} (exercise forbids {name})"


@cache
def reimplemented_modules(chapter: str) -> tuple[str, ...]:
    """The package modules chapter `chapter`'s exercises re-implement: of its forbid lists and references."""
    from llmbook.exercises.core import all_exercises

    found: set[str] = set()
    for ex in all_exercises():
        if ex.name.startswith(chapter + "."):
            found |= {_module_of(d) for d in ex.forbid if d.startswith("llmbook.")}
    try:
        chapter_module = importlib.import_module(f"llmbook.exercises.ch{chapter}")
    except ModuleNotFoundError:
        return tuple(sorted(found))
    for value in vars(chapter_module).values():
        module = (
            getattr(value, "__module__", None) if not isinstance(value, type(importlib)) else value.__name__
        )
        if (
            isinstance(module, str)
            and module.startswith("llmbook.")
            and not module.startswith("llmbook.exercises")
        ):
            found.add(module)
    return tuple(sorted(found))


def _module_of(dotted: str) -> str:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        return ".".join(parts[:end])
    return parts[0]


def strip_magics(source: str) -> tuple[str, list[str]]:
    """The cell with IPython `%`/`!` lines blanked (line numbers kept), and the flags those lines raise."""
    lines, flags = source.splitlines(), []
    if lines and lines[0].lstrip().startswith("%%"):
        magic = lines[0].lstrip()[2:].split()[0] if lines[0].strip() != "%%" else ""
        if magic in TEXT_CELL_MAGICS:
            return "", flags
        if magic not in PYTHON_CELL_MAGICS:
            flags.append(f"runs a cell magic (%%{magic}): the cell is not Python")
            return "", flags
        lines = ["", *lines[1:]]
    kept = []
    for line in lines:
        match = re.match(r"\s*(?:[\w, ]+=\s*)?([%!])\s*(\w*)", line)
        timed = re.match(r"(\s*)%(?:time|timeit)\s+(?:-\w+(?:\s+\d+)?\s+)*(.*)", line)
        if timed:  # %time x = f(): the statement still runs
            kept.append(timed.group(1) + timed.group(2))
        elif match and not re.match(r"\s*[\w, ]+==", line):
            mark, word = match.groups()
            if mark == "!" or word in ("sx", "system"):
                flags.append(f"runs a shell command ({line.strip()[:40]})")
            elif word in ("env", "set_env"):
                flags.append("reads the environment (%env)")
            elif word in SHELL_MAGICS:
                flags.append(f"runs a magic that loads or runs code (%{word})")
            kept.append("")
        else:
            kept.append(line)
    return "\n".join(kept), flags


class _Notebook:
    """The parsed cells: top-level statements, the names they bind and read, and every finding."""

    def __init__(self, sources: list[str]):
        self.cell_flags: list[str] = []
        self.statements: list[_Statement] = []
        self.findings: list[Finding] = []
        self.bindings: dict[str, set[str]] = {}
        self.checks: dict[str, list[tuple[int, ast.expr]]] = {}
        self.mentions: dict[str, set[int]] = {}  # exercise name -> statements holding it as a string
        trees = []
        size = sum(len(source) for source in sources if isinstance(source, str))
        for number, source in enumerate(sources, 1):
            if not isinstance(source, str):
                self.cell_flags.append(f"cell {number} is not text")
                continue
            code, flags = strip_magics(source)
            self.cell_flags += flags
            if size > MAX_SOURCE_CHARS:
                self._scan(f"the code cells are too large to audit ({size} characters)", code)
                continue
            try:
                tree = ast.parse(code)
            except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
                self._scan(f"cell {number} does not parse ({type(err).__name__})", code)
                continue
            if _nesting_depth(tree) > MAX_NESTING:
                self._scan(f"cell {number} is nested too deeply to audit", code)
                continue
            trees.append((number, code, tree))
        cells: list[tuple[int, str, list[_Statement]]] = []
        for number, code, tree in trees:  # first what every statement binds, so cell order does not matter
            try:
                statements = [_Statement(len(self.statements) + i, node) for i, node in enumerate(tree.body)]
                for statement in statements:
                    statement.stores, statement.reads = _stores_and_reads(statement.node)
                    self._collect_imports(statement.node)
            except RecursionError:  # nesting deeper than the analysis follows: fall back to the words
                self._scan(f"cell {number} is nested too deeply to audit", code)
                continue
            self.statements += statements
            cells.append((number, code, statements))
        self._collect_aliases()
        for number, code, statements in cells:
            try:
                for statement in statements:
                    _Visitor(self, statement).visit(statement.node)
            except RecursionError:
                self._scan(f"cell {number} is nested too deeply to audit", code)

    def _scan(self, why: str, code: str) -> None:
        """Flag a cell the analysis cannot read (`why`) and scan its text for the audit's words instead."""
        self.cell_flags.append(why)
        self.cell_flags += [text for pattern, text in REGEX_FLAGS if re.search(pattern, code, re.M)]

    def _collect_imports(self, statement: ast.AST) -> None:
        """Bind the names the imports anywhere in `statement` create to the dotted names they stand for."""
        for node in ast.walk(statement):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self._bind(alias.asname, alias.name)
                    else:
                        self._bind(alias.name.split(".")[0], alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if alias.name != "*":
                        self._bind(alias.asname or alias.name, f"{node.module}.{alias.name}")
                    else:
                        for name in _public_names(node.module):
                            self._bind(name, f"{node.module}.{name}")

    def _collect_aliases(self) -> None:
        """Bind simple aliases anywhere in the notebook (`F = torch.nn.functional`, `sm = F.softmax`)."""
        assigns = [n for s in self.statements for n in ast.walk(s.node) if isinstance(n, ast.Assign)]
        for _ in range(3):  # aliases of aliases: F = torch.nn.functional; sm = F.softmax
            for node in assigns:
                if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    for dotted in self.resolve(node.value):
                        self._bind(node.targets[0].id, dotted)

    def _bind(self, name: str, dotted: str) -> None:
        self.bindings.setdefault(name, set()).add(dotted)

    def resolve(self, node: ast.AST) -> list[str]:
        """The dotted names (`torch.nn.functional.softmax`) an expression can stand for, through imports."""
        attributes: list[str] = []
        while True:  # a loop, not recursion: a chain of attributes can be as long as the cell
            if isinstance(node, ast.Attribute):
                attributes.append(node.attr)
                node = node.value
            elif _is_constant_getattr(node):
                attributes.append(node.args[1].value)
                node = node.args[0]
            else:
                break
        if not isinstance(node, ast.Name):
            return []
        if node.id in self.bindings:
            bases = sorted(self.bindings[node.id])
        else:
            bases = [node.id] if node.id in ("torch", "llmbook", "os", "sys") else []
        suffix = "".join(f".{a}" for a in reversed(attributes))
        return [base + suffix for base in bases]

    def closure(self, exercise: str) -> set[int]:
        """Indices of the top-level statements exercise `exercise`'s answer can reach."""
        calls = self.checks.get(exercise, [])
        if calls:
            roots = {index: _free_names(answer) for index, answer in calls}
        else:  # checked some other way (a loop over names, a helper): all the statement naming it reads
            roots = {i: self.statements[i].reads for i in self.mentions.get(exercise, ())}
        if not roots:
            return set()
        reached = set(roots)
        names = set().union(*roots.values())
        done: set[str] = set()
        while names - done:
            name = (names - done).pop()
            done.add(name)
            # Anywhere in the notebook, not only before the check: the grader calls the answers after
            # the last cell, so a name rebound further down is what it grades.
            for statement in (s for s in self.statements if name in s.stores):
                if statement.index not in reached:
                    reached.add(statement.index)
                    names |= statement.reads
        return reached


@cache
def _installed(top: str) -> bool:
    """Whether module `top` comes with Python or an installed package (not a file beside the notebook)."""
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "llmbook":
        return True
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
    if not origin:
        return False
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {*site.getsitepackages(), site.getusersitepackages()}
    roots |= {entry for entry in sys.path if entry.endswith(("site-packages", "dist-packages"))}
    return any(os.path.abspath(origin).startswith(os.path.abspath(root) + os.sep) for root in roots)


def _public_names(module: str) -> list[str]:
    """The names `from module import *` binds, for the package's and torch's modules (others: none known)."""
    if module.split(".")[0] not in ("llmbook", "torch"):
        return []
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return []
    names = getattr(imported, "__all__", None) or [n for n in vars(imported) if not n.startswith("_")]
    return [n for n in names if isinstance(n, str)]


def _is_constant_getattr(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    )


def _scope_locals(node: ast.AST) -> set[str]:
    """Names bound inside functions, lambdas and comprehensions under `node` (they shadow the notebook's)."""
    bound: set[str] = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = inner.args
            bound |= {
                a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a
            }
            declared = {n for g in ast.walk(inner) if isinstance(g, ast.Global) for n in g.names}
            body = inner.body if isinstance(inner.body, list) else [inner.body]
            for statement in body:
                bound |= {
                    n.id
                    for n in ast.walk(statement)
                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                } - declared
                bound |= {
                    d.name
                    for d in ast.walk(statement)
                    if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                }
        elif isinstance(inner, ast.comprehension):
            bound |= {n.id for n in ast.walk(inner.target) if isinstance(n, ast.Name)}
    return bound


def _free_names(node: ast.AST) -> set[str]:
    loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loads - _scope_locals(node)


def _stores_and_reads(node: ast.AST) -> tuple[set[str], set[str]]:
    """The notebook-level names a top-level statement binds or changes, and those it reads."""
    reads = _free_names(node)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        declared = {n for g in ast.walk(node) if isinstance(g, ast.Global) for n in g.names}
        # A function that fills a notebook-level table (table[k] = ..., table.update(...)) stores it too.
        return {node.name} | declared | (_mutated_names(node) & reads), reads
    nested = _scope_locals(node)
    stores = _mutated_names(node)  # share[t] = ..., rows.append(...), table.add_(...)
    for inner in ast.walk(node):
        if isinstance(inner, ast.Name) and isinstance(inner.ctx, (ast.Store, ast.Del)):
            stores.add(inner.id)
        elif isinstance(inner, (ast.Import, ast.ImportFrom)):
            stores |= {(a.asname or a.name).split(".")[0] for a in inner.names if a.name != "*"}
            if isinstance(inner, ast.ImportFrom) and inner.module and any(a.name == "*" for a in inner.names):
                stores |= set(_public_names(inner.module))
        elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stores.add(inner.name)
    return stores - (nested - _top_level_stores(node)), reads


def _top_level_stores(node: ast.AST) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        inner = stack.pop()
        if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
            found.add(inner.id)
        if not isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.comprehension)):
            stack.extend(ast.iter_child_nodes(inner))
    return found


def _mutated_names(node: ast.AST) -> set[str]:
    """Names whose object `node` changes in place: subscript or attribute stores, mutating method calls."""
    found: set[str] = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.Subscript, ast.Attribute)) and isinstance(inner.ctx, (ast.Store, ast.Del)):
            found |= _base_names(inner)
        elif (
            isinstance(inner, ast.Call)
            and isinstance(inner.func, ast.Attribute)
            and _mutates(inner.func.attr)
        ):
            found |= _base_names(inner.func.value)
    return found


def _mutates(method: str) -> bool:
    """Whether a call of `method` changes its receiver (a container's, or torch's in-place `x.add_()`)."""
    return method in MUTATING_METHODS or (method.endswith("_") and not method.startswith("_"))


def _base_names(node: ast.AST) -> set[str]:
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return {node.id} if isinstance(node, ast.Name) else set()


class _Visitor(ast.NodeVisitor):
    """Walks one top-level statement and records what it finds in the notebook's findings."""

    def __init__(self, notebook: _Notebook, statement: _Statement):
        self.notebook, self.statement = notebook, statement

    def flag(self, node: ast.AST, text: str = "", dotted: str = "", method: str = "") -> None:
        del node  # findings are placed by statement: that is what the reachability works on
        self.notebook.findings.append(Finding(self.statement.index, text, dotted, method))

    def dotted(self, node: ast.AST, dotted: str) -> None:
        """Record a use of `dotted`: a flag now if it is suspect anywhere, else a name judged per exercise."""
        text = _dotted_flag(dotted)
        if text:
            self.flag(node, text)
        self.flag(node, dotted=dotted)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.dotted(node, alias.name)
            self._rebinding(node, alias.asname or alias.name, alias.name)
            self._unread_module(node, alias.name)

    def _unread_module(self, node: ast.AST, module: str) -> None:
        if module.startswith("."):
            self.flag(node, f"imports {module} (a relative import: code the audit cannot read)")
        elif not _installed(module.split(".")[0]):
            self.flag(node, f"imports {module}, code the audit cannot read (a file beside the notebook?)")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = "." * node.level + (node.module or "")
        self._unread_module(node, module)
        for alias in node.names:
            if alias.name == "*":
                self.flag(node, f"imports everything from {module} (from {module} import *)")
                self.dotted(node, module)
                continue
            self.dotted(node, f"{module}.{alias.name}")
            self._rebinding(node, alias.asname or alias.name, f"{module}.{alias.name}")

    def _rebinding(self, node: ast.AST, bound: str, dotted: str) -> None:
        if bound in CHECKER_NAMES and dotted != f"llmbook.exercises.{bound}":
            self.flag(node, f"rebinds {bound}")

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)) and node.id in CHECKER_NAMES:
            self.flag(node, f"rebinds {node.id}")
        elif isinstance(node.ctx, ast.Load):
            if node.id in self.notebook.bindings:
                for dotted in self.notebook.resolve(node):
                    self.dotted(node, dotted)
            elif node.id in DYNAMIC_BUILTINS:
                self.flag(node, DYNAMIC_BUILTINS[node.id])

    def _definition(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        if node.name in CHECKER_NAMES:
            self.flag(node, f"rebinds {node.name}")
        elif node.name in TRICK_METHODS:
            self.flag(node, TRICK_METHODS[node.name])
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _definition

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in FRAME_ATTRIBUTES or node.attr == "__traceback__":
            self.flag(node, f"inspects frames (.{node.attr})")
        elif node.attr in CODE_ATTRIBUTES:
            self.flag(node, f"touches a function's code or globals (.{node.attr})")
        elif node.attr in ("__dict__", "__getattribute__"):
            self.flag(node, f"looks names up dynamically (.{node.attr})")
        elif node.attr in REFERENCE_ATTRIBUTES:
            self.flag(node, f"reads an exercise's reference or cases (.{node.attr})")
        resolved = self.notebook.resolve(node)
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._patch(node, resolved)
        for dotted in resolved:
            self.dotted(node, dotted)
        if not resolved:
            self.generic_visit(node)

    def _patch(self, node: ast.AST, targets: list[str]) -> None:
        """Flag an assignment to (or deletion of) the module attributes `targets` (dotted names)."""
        for target in targets:
            if target.startswith("llmbook.exercises"):
                self.flag(node, f"patches the checker ({target})")
            elif target.split(".")[0] in PATCHABLE_ROOTS:
                self.flag(node, f"patches {target}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and node.args:
            constant = len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
            name = node.args[1].value if constant else "?"
            self._patch(node, [f"{base}.{name}" for base in self.notebook.resolve(node.args[0])])
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2:
            if not _is_constant_getattr(node) and self.notebook.resolve(node.args[0]):
                self.flag(node, "looks up an attribute of a module by a computed name (getattr)")
            resolved = self.notebook.resolve(node)
            for dotted in resolved:
                self.dotted(node, dotted)
            if _is_constant_getattr(node) and not resolved:  # getattr(x, "softmax"): a method of x
                self.flag(node, method=node.args[1].value)
            for arg in node.args[2:] if resolved else node.args:
                self.visit(arg)
            return
        if isinstance(func, ast.Attribute) and func.attr == "cases" and not node.args and not node.keywords:
            self.flag(node, "reads an exercise's reference or cases (.cases())")
        if isinstance(func, ast.Attribute) and not self.notebook.resolve(func):
            self.flag(node, method=func.attr)
        if (isinstance(func, ast.Name) and func.id == "check") or _is_check(func):
            self._record_check(node)
        self.generic_visit(node)

    def _record_check(self, node: ast.Call) -> None:
        if (
            len(node.args) >= 2
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.notebook.checks.setdefault(node.args[0].value, []).append(
                (self.statement.index, node.args[1])
            )

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and EXERCISE_NAME.fullmatch(node.value):
            self.notebook.mentions.setdefault(node.value, set()).add(self.statement.index)
        if isinstance(node.value, str) and "LLMBOOK_" in node.value:
            self.flag(node, "names an LLMBOOK_ environment variable")
        if isinstance(node.value, str) and "/proc/" in node.value:
            self.flag(node, "reads /proc (other processes' environment or memory)")


def _is_check(func: ast.AST) -> bool:
    return isinstance(func, ast.Attribute) and func.attr == "check"


def _dotted_flag(dotted: str) -> str:
    """The notebook-wide flag a use of `dotted` raises wherever it is, or ""."""
    if dotted == "llmbook.exercises" or dotted.startswith("llmbook.exercises."):
        return _exercises_flag(dotted)
    for prefix, text in DOTTED_FLAGS:
        if (
            dotted == prefix
            or dotted.startswith(prefix if prefix.endswith(".") else prefix + ".")
            or (prefix in ("os.exec", "os.spawn", "os.kill") and dotted.startswith(prefix))
        ):
            return text.format(dotted)
    return ""


def _exercises_flag(dotted: str) -> str:
    parts = dotted.split(".")[2:]
    if not parts:
        return ""
    head = parts[0]
    if head in ALLOWED_FROM_EXERCISES:
        return ""
    if re.fullmatch(r"ch\d\d", head):
        if len(parts) == 1:
            return f"imports {dotted} (the chapter's reference implementations)"
        allowed = _notebook_api(head)
        return (
            ""
            if parts[1] in allowed
            else f"imports a reference implementation ({'.'.join(dotted.split('.')[:4])})"
        )
    if head in CHECKER_MODULES:
        return f"imports the checker's internals (llmbook.exercises.{head})"
    if head in ("get_exercise", "all_exercises", "run_check", "exercise", "_REGISTRY"):
        return f"imports llmbook.exercises.{head} (the checker's references and cases)"
    return f"imports llmbook.exercises.{head} (the checker's own code)"


def _notebook_api(module: str) -> tuple[str, ...]:
    try:
        chapter = importlib.import_module(f"llmbook.exercises.{module}")
    except ModuleNotFoundError:
        return ()
    return tuple(getattr(chapter, "NOTEBOOK_API", ()))
