"""Cheating submissions are never graded a plain pass, and one submission cannot harm another.

One grading run (slow: a kernel per notebook) of a folder holding chapter 3's solution and a notebook for
each cheat of issue 28; each test then reads that run's verdicts. Every cheat answers 03.masked_softmax
wrongly (or not by itself), so a cheat that worked would show up as "pass".
"""

import json
import shutil
import time

import pytest
from test_grade import ROOT, notebook, rows

from llmbook.exercises.grade import grade_folder, write_reports
from llmbook.exercises.sandbox import _processes

pytestmark = pytest.mark.slow

NAME = "03.masked_softmax"
WRONG = f'check("{NAME}", lambda scores, mask: scores)'  # no softmax at all
IMPORTS = "import os, sys, json, subprocess, torch\nfrom llmbook.exercises import check"
TOKEN = "llmbook-cheat-token-7f3a"  # in the detached process's command line, to find it afterwards

CHEATS = {
    # the student's own `check` prints a pass
    "replace_check": ["def check(name, answer):\n    print('✅ all cases pass')", WRONG],
    # the checker's internals always agree, and run_check always passes
    "patch_checker": [
        "import llmbook.exercises.checker as c\nc._judge = lambda *a, **k: None\n"
        "c.compare = lambda *a, **k: None\n"
        "import llmbook.exercises.compare as cm\ncm.compare = lambda *a, **k: None",
        WRONG,
    ],
    # pass lines appended to the old verdict log and to every file an environment variable names
    "log_file": [
        "line = json.dumps({'name': '03.masked_softmax', 'status': 'pass'}) + '\\n'\n"
        "for value in list(os.environ.values()) + [os.environ.get('LLMBOOK_GRADE_LOG', 'verdicts.jsonl')]:\n"
        "    try:\n        open(value, 'a').write(line * 50)\n    except Exception:\n        pass",
        WRONG,
    ],
    # the answer returns the expected value it finds in a caller's frame
    "caller_frame": [
        "def answer(scores, mask):\n    frame = sys._getframe(1)\n    while frame is not None:\n"
        "        for value in frame.f_locals.values():\n            if hasattr(value, 'expected'):\n"
        "                return value.expected\n        frame = frame.f_back\n    return scores",
        f'check("{NAME}", answer)',
    ],
    # the hidden seed pinned through the environment, and a table of the shown and hidden cases' answers
    "seed_and_table": [
        "os.environ['LLMBOOK_EXERCISE_SEED'] = '0'\nfrom llmbook.exercises import get_exercise\n"
        f"ex = get_exercise('{NAME}')\n"
        "table = {json.dumps(c.args[0].tolist()): c.expected for c in ex.cases() + ex.hidden_cases(0)}",
        f'check("{NAME}", lambda scores, mask: table.get(json.dumps(scores.tolist()), scores))',
    ],
    # an emptied case list (zero cases) in the student's process
    "empty_cases": [
        f"from llmbook.exercises import get_exercise\nget_exercise('{NAME}').make_cases = lambda: []\n"
        f"get_exercise('{NAME}').hidden = None",
        WRONG,
    ],
    # the kernel's side of the protocol replaced: no case comes back, or a forged verdict
    "forged_replies": [
        "import llmbook.exercises.protocol as p\n"
        "def serve(folder, answers):\n"
        "    open('outputs.json', 'w').write(json.dumps({'03.masked_softmax': {'answer': 'ok', 'cases': [],"
        " 'status': 'pass'}}))\n    p.save_file = None\n"
        "    from safetensors.torch import save_file\n    save_file({}, 'outputs.safetensors')\n"
        "p.serve = serve",
        WRONG,
    ],
    # writing outside its own folder: the submissions folder, the grader's package, another submission
    "writes_outside": [
        "targets = ['{folder}/0_solved.ipynb', '{folder}/planted.txt', '{folder}/report/grades.csv',\n"
        "           os.path.dirname(__import__('llmbook').__file__) + '/planted.py']\n"
        "written = []\nfor t in targets:\n    try:\n        open(t, 'a').write('x')\n"
        "        written.append(t)\n"
        "    except OSError:\n        pass\nprint('written:', written)",
        WRONG,
    ],
    # a detached process that outlives its kernel and keeps writing fail verdicts into every folder it can
    "a_detached": [
        "code = '''\nimport os, time, json, glob\n"
        "while True:\n"
        "    for d in glob.glob('/tmp/llmbook-grade-*/*/*') + glob.glob('/tmp/llmbook-grade-*/*'):\n"
        "        for f in ('outputs.json', 'verdicts.jsonl'):\n"
        "            try:\n"
        "                open(os.path.join(d, f), 'a').write(json.dumps({'status': 'fail'}))\n"
        "            except OSError:\n                pass\n"
        f"    time.sleep(0.05)  # {TOKEN}\n'''\n"
        "subprocess.Popen([sys.executable, '-c', code], start_new_session=True, env={},  # no marker\n"
        "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)",
        WRONG,
    ],
    # the in-kernel watch for a forbidden call switched off, then the forbidden function called
    "bypasses_watch": [
        "sys.setprofile = lambda *args: None\nimport torch.nn.functional as F\n"
        "def sdp(q, k, v, mask=None):\n    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
        'check("03.scaled_dot_product", sdp)',
    ],
    # the reference imported and handed in as the answer: correct, so it must be flagged
    "imports_reference": [
        "from llmbook.exercises.ch03 import _masked_softmax as masked_softmax\n"
        f'check("{NAME}", masked_softmax)'
    ],
    "registry_reference": [
        f'from llmbook.exercises import get_exercise\ncheck("{NAME}", get_exercise("{NAME}").reference)'
    ],
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    solution = ROOT / "exercises" / "03_attention_solution.ipynb"
    shutil.copy(solution, folder / "0_solved.ipynb")  # graded before the cheats: must stay untouched
    shutil.copy(solution, folder / "b_solved_after_detached.ipynb")  # graded right after the detached one
    for name, cells in CHEATS.items():
        cells = [cell.replace("{folder}", str(folder)) for cell in cells]
        (folder / f"{name}.ipynb").write_text(json.dumps(notebook(IMPORTS, *cells)))
    before = (folder / "0_solved.ipynb").read_bytes()
    exercises, submissions, sandbox = grade_folder(folder, time_limit=120)
    report = write_reports(exercises, submissions, folder / "report", sandbox.note)
    return {
        "by": {s.student: s for s in submissions},
        "grades": rows(report["grades"]),
        "folder": folder,
        "untouched": (folder / "0_solved.ipynb").read_bytes() == before,
        "sandbox": sandbox,
    }


REFERENCES = ("imports_reference", "registry_reference")


@pytest.mark.parametrize("cheat", [c for c in CHEATS if c != "bypasses_watch"])
def test_a_cheat_is_never_graded_a_plain_pass(graded, cheat):
    verdict = graded["by"][cheat].verdicts[NAME]
    assert verdict.cell() != "pass", verdict.message
    assert verdict.status != "pass" or verdict.flags


def test_a_cheat_that_answers_wrongly_fails_whatever_it_prints(graded):
    for cheat in (
        "replace_check",
        "patch_checker",
        "log_file",
        "caller_frame",
        "seed_and_table",
        "empty_cases",
    ):
        assert graded["by"][cheat].verdicts[NAME].status == "fail", cheat


def test_forged_replies_with_no_cases_are_not_a_pass(graded):
    verdict = graded["by"]["forged_replies"].verdicts[NAME]
    assert verdict.status == "error" and "zero cases" in verdict.message


def test_a_forbidden_call_past_a_disabled_watch_is_flagged(graded):
    pytest.importorskip("llmbook.exercises.audit")
    verdict = graded["by"]["bypasses_watch"].verdicts["03.scaled_dot_product"]
    assert verdict.status != "pass" or any("scaled_dot_product_attention" in f for f in verdict.flags), (
        verdict
    )


@pytest.mark.parametrize("cheat", REFERENCES)
def test_an_imported_reference_passes_but_is_flagged(graded, cheat):
    pytest.importorskip("llmbook.exercises.audit")
    verdict = graded["by"][cheat].verdicts[NAME]
    assert verdict.status == "pass" and verdict.flags
    column = graded["grades"]["exercise"].index(cheat)
    assert graded["grades"][NAME][column].startswith("pass (flagged: ")


def test_solutions_pass_everything_before_and_after_the_cheats(graded):
    for student in ("0_solved", "b_solved_after_detached"):
        verdicts = graded["by"][student].verdicts
        assert len(verdicts) == 8 and {v.cell() for v in verdicts.values()} == {"pass"}, student


def _leftovers() -> list[int]:
    leftovers = []
    for pid, _ in _processes():  # the detached process's source carries TOKEN
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if TOKEN.encode() in f.read():
                    leftovers.append(pid)
        except OSError:
            pass
    return leftovers


def test_no_process_of_a_submission_outlives_its_grading(graded):
    time.sleep(0.5)
    assert _leftovers() == []


def test_without_a_sandbox_user_a_detached_process_is_still_ended(tmp_path):
    shutil.copy(ROOT / "exercises" / "03_attention_solution.ipynb", tmp_path / "b_solved.ipynb")
    (tmp_path / "a_detached.ipynb").write_text(json.dumps(notebook(IMPORTS, *CHEATS["a_detached"])))
    _, submissions, sandbox = grade_folder(tmp_path, time_limit=120, isolation="session")
    assert sandbox.isolation == "session"
    time.sleep(0.5)
    assert _leftovers() == []
    by = {s.student: s for s in submissions}
    assert {v.cell() for v in by["b_solved"].verdicts.values()} == {"pass"}
    assert by["a_detached"].verdicts[NAME].status in ("fail", "missing")  # it may spoil its own reply


def test_a_submission_cannot_write_outside_its_folder(graded):
    folder = graded["folder"]
    assert graded["untouched"]
    assert not (folder / "planted.txt").exists()
    assert "written: []" in json.dumps(graded["by"]["writes_outside"].notebook["cells"][1]["outputs"])
    assert not (ROOT / "llmbook" / "planted.py").exists()
    if graded["sandbox"].isolation == "session":
        pytest.skip("not root: kernels run as the grader's own user")
