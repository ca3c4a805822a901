"""The static audit of submissions: each cheat route it detects is flagged, honest notebooks are not."""

import json
import re
import sys
from pathlib import Path

import pytest

from llmbook.exercises.audit import NOTEBOOK_WIDE, audit_notebook, reimplemented_modules

EXERCISES = Path(__file__).resolve().parent.parent / "exercises"
HEADER = "from llmbook.exercises import check, hint\nimport torch\n"

# (cells after the header, exercises graded, where the flag goes, the flag)
CHEATS = {
    "reference import": (
        "from llmbook.exercises.ch03 import _masked_softmax\ncheck('03.masked_softmax', _masked_softmax)",
        "03.masked_softmax",
        "imports a reference implementation (llmbook.exercises.ch03._masked_softmax)",
    ),
    "measured value of a prediction": (
        "from llmbook.exercises.ch03 import measured_qk_variance\n"
        "check('03.predict_qk_variance', measured_qk_variance())",
        "03.predict_qk_variance",
        "imports a reference implementation (llmbook.exercises.ch03.measured_qk_variance)",
    ),
    "get_exercise reference": (
        "import llmbook.exercises as E\nf = E.get_exercise('03.masked_softmax').reference\n"
        "check('03.masked_softmax', f)",
        "03.masked_softmax",
        "reads an exercise's reference or cases (.reference)",
    ),
    "cases of the exercise": (
        "from llmbook.exercises import get_exercise\n"
        "table = {c.args[0]: c.expected for c in get_exercise('03.causal_mask').cases()}\n"
        "def f(n):\n    return table[n]\ncheck('03.causal_mask', f)",
        "03.causal_mask",
        "imports llmbook.exercises.get_exercise (the checker's references and cases)",
    ),
    "shown cases through a registry": (
        "import llmbook.exercises.core as core\nshown = core.get_exercise('03.causal_mask').cases()",
        "03.causal_mask",
        "reads an exercise's reference or cases (.cases())",
    ),
    "run_check": (
        "from llmbook.exercises import run_check\nrun_check('03.causal_mask', print)",
        "03.causal_mask",
        "imports llmbook.exercises.run_check (the checker's references and cases)",
    ),
    "checker internals": (
        "from llmbook.exercises import checker\nchecker._grade = lambda *args: None",
        NOTEBOOK_WIDE,
        "patches the checker (llmbook.exercises.checker._grade)",
    ),
    "package module the exercise re-implements": (
        "import llmbook.attention as attention\n"
        "def my_mask(n):\n    return attention.causal_mask(n)\ncheck('03.causal_mask', my_mask)",
        "03.causal_mask",
        "imports llmbook.attention",
    ),
    "package module through a top-level lookup table": (
        "from llmbook import attention\ntable = {n: attention.causal_mask(n) for n in range(1, 64)}\n"
        "def my_mask(n):\n    return table[n]\ncheck('03.causal_mask', my_mask)",
        "03.causal_mask",
        "imports llmbook.attention",
    ),
    "package class the chapter wraps": (
        "from llmbook.attention import MultiHeadSelfAttention as M\n"
        "def scaled(q, k, v, mask=None):\n    return M.__call__\ncheck('03.scaled_dot_product', scaled)",
        "03.scaled_dot_product",
        "imports llmbook.attention",
    ),
    "prediction computed with the package": (
        "from llmbook.model import TransformerLM\nn = TransformerLM\ncheck('05.predict_block_parameters', n)",
        "05.predict_block_parameters",
        "imports llmbook.model",
    ),
    "lookup table filled by a function": (
        "import llmbook.attention as attention\ntable = {}\ndef fill():\n    for n in range(1, 64):\n"
        "        table[n] = attention.causal_mask(n)\nfill()\ndef my_mask(n):\n    return table[n]\n"
        "check('03.causal_mask', my_mask)",
        "03.causal_mask",
        "imports llmbook.attention",
    ),
    "attribute looked up by operator": (
        "import operator\nsm = operator.attrgetter('softmax')(torch)\ncheck('06.stable_softmax', sm)",
        "06.stable_softmax",
        "looks up an attribute by name (operator.attrgetter)",
    ),
    "pickled code": (
        "import pickle\nf = pickle.loads(b'')",
        NOTEBOOK_WIDE,
        "runs code from a pickle (pickle.loads)",
    ),
    "module beside the notebook": (
        "from my_answers import causal_mask\ncheck('03.causal_mask', causal_mask)",
        "03.causal_mask",
        "imports my_answers, code the audit cannot read (a file beside the notebook?)",
    ),
    "time magic": (
        "%time f = torch.special.softmax\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls a forbidden function: torch.special.softmax (exercise forbids softmax)",
    ),
    "star import": (
        "from llmbook.attention import *\ncheck('03.causal_mask', causal_mask)",
        "03.causal_mask",
        "imports everything from llmbook.attention (from llmbook.attention import *)",
    ),
    "caller's frame": (
        "import sys\ndef f(scores, mask):\n    return sys._getframe(2).f_locals['case'].expected\n"
        "check('03.masked_softmax', f)",
        "03.masked_softmax",
        "inspects frames (sys._getframe)",
    ),
    "inspect module": (
        "from inspect import currentframe as here\ndef f(scores, mask):\n"
        "    return here().f_back.f_locals['case'].expected\ncheck('03.masked_softmax', f)",
        "03.masked_softmax",
        "inspects frames (inspect.currentframe)",
    ),
    "traceback frames": (
        "def f(scores, mask):\n    try:\n        1 / 0\n    except ZeroDivisionError as e:\n"
        "        return e.__traceback__.tb_frame\ncheck('03.masked_softmax', f)",
        "03.masked_softmax",
        "inspects frames (.tb_frame)",
    ),
    "heap search": (
        "import gc\nrefs = gc.get_referrers",
        NOTEBOOK_WIDE,
        "searches live objects (gc.get_referrers)",
    ),
    "environment": (
        "import os\nos.environ['LLMBOOK_EXERCISE_SEED'] = '1'",
        NOTEBOOK_WIDE,
        "reads the environment (os.environ)",
    ),
    "environment by getenv alias": (
        "from os import getenv as g\nlog = g('LLMBOOK' + '_GRADE_LOG')",
        NOTEBOOK_WIDE,
        "reads the environment (os.getenv)",
    ),
    "grade log named": (
        "path = 'LLMBOOK_GRADE_LOG'",
        NOTEBOOK_WIDE,
        "names an LLMBOOK_ environment variable",
    ),
    "environment magic": ("%env LLMBOOK_EXERCISE_SEED=1", NOTEBOOK_WIDE, "reads the environment (%env)"),
    "rebinding check": (
        "def check(name, answer):\n    print('✅ pass')",
        NOTEBOOK_WIDE,
        "rebinds check",
    ),
    "rebinding hint by assignment": ("hint = print", NOTEBOOK_WIDE, "rebinds hint"),
    "check imported from elsewhere": ("from mymodule import fake as check", NOTEBOOK_WIDE, "rebinds check"),
    "patching torch": ("torch.allclose = lambda *a, **k: True", NOTEBOOK_WIDE, "patches torch.allclose"),
    "patching by setattr": (
        "import llmbook.exercises.compare as c\nsetattr(c, 'compare', lambda *a: None)",
        NOTEBOOK_WIDE,
        "patches the checker (llmbook.exercises.compare.compare)",
    ),
    "torch.ops": (
        "def f(x):\n    return torch.ops.aten._softmax(x, -1, False)\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls torch.ops.aten",
    ),
    "forbidden through torch.ops": (
        "def f(x):\n    return torch.ops.aten._softmax(x, -1, False)\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls a forbidden function: torch.ops.aten._softmax (exercise forbids softmax)",
    ),
    "forbidden through torch.special": (
        "def f(x):\n    return torch.special.softmax(x, -1)\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls a forbidden function: torch.special.softmax (exercise forbids softmax)",
    ),
    "forbidden private torch function": (
        "def f(x):\n    return torch._softmax(x, -1, False)\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls a forbidden function: torch._softmax (exercise forbids softmax)",
    ),
    "forbidden tensor method": (
        "check('06.stable_softmax', lambda x: x.log_softmax(-1).exp())",
        "06.stable_softmax",
        "calls a forbidden function: Tensor.log_softmax (exercise forbids softmax)",
    ),
    "forbidden method looked up by getattr": (
        "def f(x):\n    return getattr(x, 'softmax')(-1)\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls a forbidden function: Tensor.softmax (exercise forbids softmax)",
    ),
    "forbidden through aliases": (
        "import torch.nn.functional as F\nsm = getattr(F, 'softmax')\n"
        "def f(x):\n    return sm(x, -1)\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls a forbidden function: torch.nn.functional.softmax (exercise forbids softmax)",
    ),
    "forbidden module class": (
        "def f(x):\n    return torch.nn.Softmax(dim=-1)(x)\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "calls a forbidden function: torch.nn.Softmax (exercise forbids softmax)",
    ),
    "forbidden layer for linear": (
        "def f(x, w, b=None):\n    layer = torch.nn.Linear(2, 2)\n    return layer(x)\ncheck('00.linear', f)",
        "00.linear",
        "calls a forbidden function: torch.nn.Linear (exercise forbids linear)",
    ),
    "call watcher turned off": (
        "import sys\ndef f(x):\n    sys.setprofile(None)\n    return torch.softmax(x, -1)\n"
        "check('06.stable_softmax', f)",
        "06.stable_softmax",
        "turns off the call watcher (sys.setprofile)",
    ),
    "copied code object": (
        "import types\nf = types.FunctionType(torch.nn.functional.softmax.__code__, {})\n"
        "check('06.stable_softmax', f)",
        "06.stable_softmax",
        "builds a function from a code object (types.FunctionType)",
    ),
    "code attribute": (
        "def f(x):\n    return x\nf.__code__ = print.__call__\ncheck('06.stable_softmax', f)",
        "06.stable_softmax",
        "touches a function's code or globals (.__code__)",
    ),
    "exec": ("exec('import llmbook.exercises.ch03 as c')", NOTEBOOK_WIDE, "runs code from a string (exec)"),
    "__import__": ("m = __import__('llmbook.attention')", NOTEBOOK_WIDE, "imports dynamically (__import__)"),
    "importlib": (
        "import importlib\nm = importlib.import_module('llmbook.' + 'attention')",
        NOTEBOOK_WIDE,
        "imports dynamically (importlib.import_module)",
    ),
    "globals lookup": (
        "def f(n):\n    return globals()['causal_' + 'mask'](n)\ncheck('03.causal_mask', f)",
        "03.causal_mask",
        "looks names up dynamically (globals())",
    ),
    "computed getattr on a module": (
        "import llmbook\nname = 'causal_mask'\ndef f(n):\n    return getattr(llmbook.attention, name)(n)\n"
        "check('03.causal_mask', f)",
        "03.causal_mask",
        "looks up an attribute of a module by a computed name (getattr)",
    ),
    "detached process": (
        "import subprocess\nsubprocess.Popen(['sleep', '100'], start_new_session=True)",
        NOTEBOOK_WIDE,
        "starts processes (subprocess.Popen)",
    ),
    "shell line": (
        "!echo pass >> grades.csv",
        NOTEBOOK_WIDE,
        "runs a shell command (!echo pass >> grades.csv)",
    ),
    "signal handler (the time limit)": (
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)",
        NOTEBOOK_WIDE,
        "changes signal handlers (signal.signal)",
    ),
    "an answer equal to anything": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n"
        "check('03.predict_qk_variance', Anything())",
        "03.predict_qk_variance",
        "defines __eq__ (an answer can compare equal to anything)",
    ),
    "torch function override": (
        "class T(torch.Tensor):\n    @classmethod\n"
        "    def __torch_function__(cls, *a, **k):\n        return True",
        NOTEBOOK_WIDE,
        "intercepts torch calls (defines __torch_function__)",
    ),
}


@pytest.mark.parametrize("name", list(CHEATS))
def test_cheat_route_is_flagged(name):
    cell, where, flag = CHEATS[name]
    exercises = [where] if where != NOTEBOOK_WIDE else ["03.causal_mask"]
    flags = audit_notebook([HEADER, cell], exercises)
    assert flag in flags.get(where, []), flags


def _code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", sorted(EXERCISES.glob("*.ipynb")), ids=lambda p: p.stem)
def test_solution_and_blank_notebooks_are_not_flagged(path):
    from llmbook.exercises.grade import checked_exercises

    exercises = checked_exercises(path)
    assert exercises, f"{path.name} checks no exercise"
    assert audit_notebook(_code_cells(path), exercises) == {}


def test_flag_goes_to_the_exercise_whose_answer_reaches_it():
    cells = [
        HEADER,
        "import llmbook.attention as attention\ndef helper(n):\n    return attention.causal_mask(n)",
        "def my_mask(n):\n    return helper(n)",
        "def my_softmax(scores, mask):\n    return scores.masked_fill(~mask, -1e9).softmax(-1)",
        "check('03.causal_mask', my_mask)\ncheck('03.masked_softmax', my_softmax)",
    ]
    flags = audit_notebook(cells, ["03.causal_mask", "03.masked_softmax"])
    assert flags == {
        "03.causal_mask": [
            "imports llmbook.attention",
            "calls a forbidden function: llmbook.attention.causal_mask (exercise forbids causal_mask)",
        ]
    }


def test_exercise_checked_through_a_loop_is_still_audited():
    cells = [
        HEADER,
        "import llmbook.attention as attention\nmine = {'03.causal_mask': attention.causal_mask}",
        "for name, answer in mine.items():\n    check(name, answer)",
    ]
    assert "imports llmbook.attention" in audit_notebook(cells, ["03.causal_mask"])["03.causal_mask"]


def test_an_answer_rebound_after_its_check_is_audited():
    # The grader calls each answer after the last cell has run, so the last binding is what it grades.
    cells = [
        HEADER,
        "def my_mask(n):\n    return torch.ones(n, n).tril().bool()\ncheck('03.causal_mask', my_mask)",
        "import llmbook.attention\nmy_mask = llmbook.attention.causal_mask",
    ]
    assert "imports llmbook.attention" in audit_notebook(cells, ["03.causal_mask"])["03.causal_mask"]


def test_package_import_no_answer_reaches_is_not_flagged():
    # Comparing one's own answer with the package (as the chapters do) is honest; the answer never calls it.
    cells = [
        HEADER,
        "import llmbook.attention\ndef my_mask(n):\n    return torch.ones(n, n).tril().bool()",
        "assert torch.equal(my_mask(4), llmbook.attention.causal_mask(4))\ncheck('03.causal_mask', my_mask)",
    ]
    assert audit_notebook(cells, ["03.causal_mask"]) == {}


def test_forbidden_function_is_allowed_where_the_exercise_does_not_forbid_it():
    cells = [
        HEADER,
        "def nw(q, x, y, h):\n    return torch.softmax(-((q[:, None] - x) ** 2), 1) @ y",
        "check('03.nadaraya_watson', nw)",
    ]
    assert audit_notebook(cells, ["03.nadaraya_watson"]) == {}


def test_experiment_may_use_the_package():
    cells = [
        HEADER,
        "from llmbook.sample import sample_next_token\nshare = sample_next_token(torch.zeros(4), 1.0)",
        "best = float(share)\ncheck('08.experiment_temperature', best)",
    ]
    assert audit_notebook(cells, ["08.experiment_temperature", "08.sampling_probs"]) == {}


def test_cell_that_does_not_parse_is_flagged_and_scanned():
    flags = audit_notebook([HEADER, "def f(:\n    return os.environ['LLMBOOK_EXERCISE_SEED']"], [])
    assert "cell 2 does not parse (SyntaxError)" in flags[NOTEBOOK_WIDE]
    assert "reads the environment (os.environ)" in flags[NOTEBOOK_WIDE]


def test_harmless_magics_are_stripped_before_parsing():
    cells = [
        HEADER,
        "%matplotlib inline\n%load_ext autoreload\ndef my_mask(n):\n"
        "    return torch.ones(n, n).tril().bool()\ncheck('03.causal_mask', my_mask)",
    ]
    assert audit_notebook(cells, ["03.causal_mask"]) == {}


def test_cell_that_is_not_text_is_flagged():
    assert audit_notebook([HEADER, 42], []) == {NOTEBOOK_WIDE: ["cell 2 is not text"]}


def test_chapter_three_reimplements_the_attention_module():
    assert "llmbook.attention" in reimplemented_modules("03")
    assert "llmbook.sample" in reimplemented_modules("09")


@pytest.mark.parametrize(
    ("cell", "flag"),
    [
        ("x = " + "-" * 50000 + "1", "cell 2 does not parse (MemoryError)"),
        ("x = " + "+".join(["1"] * 100000), "cell 2 does not parse (RecursionError)"),
        ("x = " + "+".join(["torch"] * 600), "cell 2 is nested too deeply to audit"),
        ("x = 1\x00", "cell 2 does not parse (SyntaxError)"),
        (
            "import os\nx = 1\n" * 200000,
            f"the code cells are too large to audit ({len(HEADER) + 3200000} characters)",
        ),
    ],
    ids=["deep unary", "deep sum", "sum of names", "null byte", "huge"],
)
def test_a_cell_the_audit_cannot_read_is_flagged_never_raised(cell, flag):
    flags = audit_notebook([HEADER, cell], ["03.causal_mask"])[NOTEBOOK_WIDE]
    assert flag in flags, flags


def test_an_import_in_a_later_cell_still_resolves_names_used_earlier():
    cells = [
        HEADER,
        "def f(x):\n    return F.softmax(x, -1)\ncheck('06.stable_softmax', f)",
        "import torch.nn.functional as F",
    ]
    flags = audit_notebook(cells, ["06.stable_softmax"])["06.stable_softmax"]
    assert "calls a forbidden function: torch.nn.functional.softmax (exercise forbids softmax)" in flags


# exercise -> (a cheat answer for it, a flag it must raise, the exercises whose answers call that answer)
CHAPTER_3_CHEATS = {
    "03.causal_mask": (
        "import llmbook.attention\n"
        "def {fn}(q_len, k_len=None):\n    return llmbook.attention.causal_mask(q_len, k_len)",
        "imports llmbook.attention",
        {"03.multi_head"},
    ),
    "03.masked_softmax": (
        "import sys\ndef {fn}(scores, mask):\n    return sys._getframe(2).f_locals['case'].expected",
        "inspects frames (sys._getframe)",
        {"03.scaled_dot_product", "03.multi_head"},
    ),
    "03.scaled_dot_product": (
        "import os\nseed = os.environ.get('LLMBOOK_EXERCISE_SEED')\n"
        "def {fn}(q, k, v, mask=None):\n    return seed",
        "reads the environment (os.environ)",
        {"03.multi_head"},
    ),
    "03.nadaraya_watson": (
        "from llmbook.exercises.ch03 import _nadaraya_watson as {fn}",
        "imports a reference implementation (llmbook.exercises.ch03._nadaraya_watson)",
        {"03.experiment_bandwidth"},
    ),
}


@pytest.mark.parametrize("name", list(CHAPTER_3_CHEATS))
def test_a_cheat_slipped_into_the_chapter_3_solution_is_flagged_where_it_is_used(name):
    from llmbook.exercises.grade import checked_exercises

    path = EXERCISES / "03_attention_solution.ipynb"
    cells = _code_cells(path)
    call = re.compile(rf"""check\(\s*["']{re.escape(name)}["']\s*,\s*(\w+)""")
    at = next(i for i, c in enumerate(cells) if call.search(c))
    template, flag, users = CHAPTER_3_CHEATS[name]
    cells.insert(at, template.format(fn=call.search(cells[at]).group(1)))  # just before its check
    flags = audit_notebook(cells, checked_exercises(path))
    assert set(flags) == {name} | users, flags  # the honest exercises that do not call it stay clean
    assert all(flag in flags[exercise] for exercise in flags), flags


def test_deep_nesting_is_flagged_whatever_the_stack_allows():
    # With room on the stack the recursive analysis would read a 600-deep sum without error; the flag must
    # not depend on how much stack the caller happens to have.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        flags = audit_notebook([HEADER, "x = " + "+".join(["torch"] * 600)], ["03.causal_mask"])
    finally:
        sys.setrecursionlimit(limit)
    assert "cell 2 is nested too deeply to audit" in flags[NOTEBOOK_WIDE], flags
