"""What crosses between `python -m llmbook grade` and a submission's kernel: inputs out, answers back.

The grader writes the cases' inputs into the submission's working folder (`inputs.json` +
`inputs.safetensors`); a cell the grader appends after the student's cells (`kernel_cell`) calls each
answer on them and writes what came back (`outputs.json` + `outputs.safetensors`). Expected values and
the hidden cases' seed never cross: the grader keeps them and judges in its own process.

The wire format is JSON for structure and safetensors for tensors, never pickle, so reading a kernel's
answer runs none of its code. `encode` turns a value into JSON-able data (tensors stored aside by key),
`decode` turns it back:

    None, bool, int, str, list       as themselves
    float                            a JSON number, or {"$float": "nan" | "inf" | "-inf"}
    tuple / dict / bytes / complex   {"$tuple": [...]}, {"$dict": [[key, value], ...]},
                                     {"$bytes": base64}, {"$complex": [re, im]}
    torch.Tensor                     {"$tensor": key} (dense, detached, on the CPU)
    llmbook.model.TransformerLM      {"$model": {"config": ..., "state": ...}} (weights as tensors)
    anything else                    {"$unsupported": "module.QualName"}: judged as a value of that type
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any

import torch

INPUTS, OUTPUTS = "inputs", "outputs"  # file stems in the working folder: NAME.json + NAME.safetensors
MAX_DEPTH = 64  # deeper answers are refused rather than risk the decoder's recursion


class WireError(ValueError):
    """A value cannot be sent (its type or shape is outside the wire format), or a file cannot be read."""


class Unsupported:
    """Stands, on the grader's side, for an answer of a type the wire cannot carry (a numpy array...)."""


def _placeholder(type_name: str) -> Unsupported:
    module, _, qualname = type_name.rpartition(".")
    # A class named like the original, so `compare` says "expected a torch.Tensor, got numpy.ndarray".
    kind = type(qualname or "object", (Unsupported,), {"__module__": module or "builtins"})
    kind.__qualname__ = qualname or "object"
    return kind()


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def encode(value: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """`value` as JSON-able data; tensors go into `tensors` under fresh keys."""
    if depth > MAX_DEPTH:
        raise WireError(f"the value is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else {"$float": repr(number)}
    if isinstance(value, numbers.Complex):
        return {"$complex": [encode(value.real, tensors), encode(value.imag, tensors)]}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # as_subclass: a tensor subclass travels as the plain tensor it holds; clone: no shared storage
        tensors[key] = value.detach().as_subclass(torch.Tensor).cpu().contiguous().clone()
        return {"$tensor": key}
    if isinstance(value, (list, tuple)):
        items = [encode(v, tensors, depth + 1) for v in value]
        return items if isinstance(value, list) else {"$tuple": items}
    if isinstance(value, dict):
        return {
            "$dict": [
                [encode(k, tensors, depth + 1), encode(v, tensors, depth + 1)] for k, v in value.items()
            ]
        }
    if _is_model(value):
        config = {f.name: getattr(value.config, f.name) for f in dataclasses.fields(value.config)}
        state = {"config": config, "state": dict(value.state_dict()), "training": value.training}
        return {"$model": encode(state, tensors, depth + 1)}
    return {"$unsupported": _type_name(value)}


def _is_model(value: Any) -> bool:
    from llmbook.model import TransformerLM

    return type(value) is TransformerLM


def decode(data: Any, tensors: dict[str, torch.Tensor], depth: int = 0, build_models: bool = True) -> Any:
    """The value that `encode` turned into `data`; raises WireError for anything it never writes.

    `build_models=False` gives a model's weights (a dict) instead of building it: the grader reads
    models only to see whether an answer changed one, and must not build one of a size a kernel chose."""
    if depth > MAX_DEPTH:
        raise WireError(f"the value is nested more than {MAX_DEPTH} levels deep")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v, tensors, depth + 1, build_models) for v in data]
    if not (isinstance(data, dict) and len(data) == 1):
        raise WireError(f"unexpected {type(data).__name__} in the wire data")
    ((tag, body),) = data.items()
    if tag == "$float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "$complex" and isinstance(body, list) and len(body) == 2:
        return complex(
            decode(body[0], tensors, depth + 1, build_models),
            decode(body[1], tensors, depth + 1, build_models),
        )
    if tag == "$bytes" and isinstance(body, str):
        return base64.b64decode(body, validate=True)
    if tag == "$tensor" and isinstance(body, str) and body in tensors:
        return tensors[body].clone()  # each decode hands out its own copy
    if tag == "$tuple" and isinstance(body, list):
        return tuple(decode(v, tensors, depth + 1, build_models) for v in body)
    if tag == "$dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        return {
            decode(k, tensors, depth + 1, build_models): decode(v, tensors, depth + 1, build_models)
            for k, v in body
        }
    if tag == "$model":
        fields = decode(body, tensors, depth + 1, build_models)
        return _decode_model(fields) if build_models else _model_weights(fields)
    if tag == "$unsupported" and isinstance(body, str):
        return _placeholder(body)
    raise WireError(f"unexpected tag {tag!r} in the wire data")


def _model_weights(fields: Any) -> dict:
    if not isinstance(fields, dict) or not isinstance(fields.get("state"), dict):
        raise WireError("a model on the wire needs its weights")
    return fields["state"]


def _decode_model(fields: Any) -> Any:
    from llmbook.model import ModelConfig, TransformerLM

    if not isinstance(fields, dict) or set(fields) != {"config", "state", "training"}:
        raise WireError("a model on the wire needs its config, state and training flag")
    model = TransformerLM(ModelConfig(**fields["config"]))
    model.load_state_dict(fields["state"])
    return model.train(bool(fields["training"])).requires_grad_(False)


def write(folder: Path, stem: str, value: Any) -> None:
    """Write `value` as `folder/stem.json` + `folder/stem.safetensors` (the JSON last)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    data = encode(value, tensors)
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps(data, allow_nan=False), encoding="utf-8")


def read(folder: Path, stem: str, max_bytes: int) -> Any:
    """The value `write` stored under `stem`; WireError if missing, too large or malformed."""
    data, tensors = read_raw(folder, stem, max_bytes)
    try:
        return decode(data, tensors)
    except (ValueError, TypeError, RecursionError) as err:
        raise WireError(f"{stem} could not be decoded: {type(err).__name__}: {err}") from None


def read_raw(folder: Path, stem: str, max_bytes: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the JSON data, the tensors) stored under `stem`, not yet decoded; WireError if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    paths = [folder / f"{stem}.json", folder / f"{stem}.safetensors"]
    for path in paths:
        try:
            info = os.lstat(path)
        except OSError:
            raise WireError(f"{path.name} was not written") from None
        if not path.is_file() or path.is_symlink():
            raise WireError(f"{path.name} is not a regular file")
        if info.st_size > max_bytes:
            raise WireError(f"{path.name} holds {info.st_size} bytes, more than the {max_bytes} allowed")
    try:
        data = json.loads(paths[0].read_text(encoding="utf-8"))
        return data, load_file(str(paths[1]))
    except (ValueError, RecursionError, SafetensorError, UnicodeDecodeError, OSError) as err:
        raise WireError(f"{stem} could not be read: {type(err).__name__}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# The kernel's side: runs in the submission's process, after its cells. Nothing it writes is a verdict.


def kernel_cell(folder: Path, answers: dict[str, str]) -> str:
    """The code of the cell the grader appends: each answer's expression, evaluated late, then `serve`."""
    getters = ",\n".join(f"    {name!r}: lambda: ({source}\n)" for name, source in answers.items())
    return (
        "from llmbook.exercises.protocol import serve as _llmbook_serve\n"
        f"_llmbook_serve({str(folder)!r}, {{\n{getters}\n}})\n"
    )


def serve(folder: str, answers: dict[str, Any]) -> None:
    """Call each answer on the request's cases and write what came back (values, errors) to OUTPUTS."""
    from safetensors.torch import save_file

    request_folder, work = Path(folder), Path.cwd()
    request = read(request_folder, INPUTS, max_bytes=2**31)
    tensors: dict[str, torch.Tensor] = {}
    results = {name: _serve_exercise(spec, answers.get(name), tensors) for name, spec in request.items()}
    save_file(tensors, str(work / f"{OUTPUTS}.safetensors"))
    (work / f"{OUTPUTS}.json").write_text(json.dumps(results, allow_nan=False), encoding="utf-8")


def _describe_error(err: BaseException) -> str:
    import traceback

    from llmbook.exercises.compare import safe_str

    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at line {frames[-1].lineno}: {frames[-1].line})" if frames and frames[-1].line else ""
    return f"{type(err).__name__}: {safe_str(err)[:500]}{where}"


def _serve_exercise(spec: dict, getter: Any, tensors: dict[str, torch.Tensor]) -> dict:
    from llmbook.exercises.checker import TimeLimitExceeded, _time_limit, _watch_calls

    budget = float(spec["time_limit"])
    if getter is None:
        return {"answer": "missing"}
    try:
        with _time_limit(budget):
            answer = getter()
    except TimeLimitExceeded:
        return {"answer": "error", "error": "evaluating the answer ran past its time limit"}
    except BaseException as err:  # NameError for an undefined function, and whatever else broke
        return {"answer": "error", "error": _describe_error(err)}
    if spec["value"]:
        if answer is Ellipsis or answer is None:
            return {"answer": "not answered"}
        return {"answer": "ok", "cases": [_sent({"value": answer}, tensors)]}
    if not callable(answer):
        return {"answer": "not callable", "type": _type_name(answer)}
    cases = []
    for args, kwargs in spec["cases"]:  # decoded once: each case has its own copies of its tensors
        called: list[str] = []
        start = time.perf_counter()
        try:
            with _time_limit(budget), _watch_calls(tuple(spec["forbid"]), called):
                value = answer(*args, **kwargs)
        except NotImplementedError:
            cases.append({"not_answered": True})
            break
        except TimeLimitExceeded:
            cases.append({"timeout": True})
            break
        except BaseException as err:  # the answer's code failed: send what and where, go on
            cases.append({"error": _describe_error(err)})
            continue
        budget -= time.perf_counter() - start
        sent = {"value": value, "called": called}
        if spec["report_inputs"]:
            sent["inputs_after"] = [args, kwargs]
        cases.append(_sent(sent, tensors))
    return {"answer": "ok", "cases": cases}


def _sent(record: dict, tensors: dict[str, torch.Tensor]) -> dict:
    # Encode now, so an answer the wire cannot carry is one case's error rather than a lost file.
    try:
        return {k: encode(v, tensors) if k != "called" else v for k, v in record.items()}
    except BaseException as err:
        return {"error": f"your answer could not be sent to the grader: {_describe_error(err)}"}
