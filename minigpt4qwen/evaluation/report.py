"""The results of a run: a JSON file (model, settings, versions, counts, skipped rows, unparsable answers, scores)
and a markdown table; and the comparison of two results files."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from minigpt4qwen.data.formats import DataError
from minigpt4qwen.evaluation.questions import Scores

COUNTS = ("questions", "images")  # table columns that are counts, not scores
LISTED = 200  # unparsable answers and skipped rows listed in the JSON (all are counted)


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python and of the packages that make the numbers."""
    found = {"python": platform.python_version()}
    for package in ("minigpt4qwen", "torch", "transformers", *extra):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def build_results(benchmark: str, data: str, model: dict[str, Any], settings: dict[str, Any], total: int,
                  answered: int, skipped: list[DataError], scores: Scores,
                  extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """The results document (deterministic: no times, so a resumed run writes the same file)."""
    return {
        "benchmark": benchmark,
        "data": data,
        "model": model,
        "settings": settings,
        "versions": versions(extra_packages),
        "questions": {"total": total, "scored": answered, "skipped": len(skipped)},
        "summary": scores.summary,
        "table": [{"name": name, **metrics} for name, metrics in scores.rows],
        "unparsable": {"count": len(scores.unparsable),
                       "answers": [{"key": k, "answer": a} for k, a in scores.unparsable[:LISTED]]},
        "skipped": [{"file": e.file, "row": e.index, "kind": e.kind, "detail": e.detail} for e in skipped[:LISTED]],
        "notes": scores.notes,
    }


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report: settings, counts, the table and the summary."""
    settings, counts = results["settings"], results["questions"]
    model = results["model"]
    failed = any(s["kind"] == "generation_failed" for s in results["skipped"])
    why = "bad data or failed generation" if failed else "bad data"
    lines = [
        f"# {results['benchmark']}",
        "",
        f"- model: {model.get('model_dir') or model.get('checkpoint') or model.get('config') or 'preset'} "
        f"({model.get('device', '?')}, {model.get('dtype', '?')})",
        f"- data: {results['data']}",
        f"- scored {counts['scored']} of {counts['total']} questions ({counts['skipped']} skipped for {why})",
        f"- prompt: {json.dumps(settings['prompt_template'], ensure_ascii=False)}; system: "
        f"{json.dumps(settings['system_prompt'], ensure_ascii=False)}; greedy, at most "
        f"{settings['max_new_tokens']} new tokens",
        f"- unparsable answers: {results['unparsable']['count']}",
        *(f"- note: {note}" for note in results["notes"]),
        "",
    ]
    table = results["table"]
    if table:
        columns = list(dict.fromkeys(k for row in table for k in row if k != "name"))
        lines += ["| name | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
        lines += ["| " + " | ".join([row["name"], *(_number(row.get(c, "")) for c in columns)]) + " |"
                  for row in table]
        lines.append("")
    lines.append(" · ".join(f"**{k}** {_number(v)}" for k, v in results["summary"].items()))
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Writes results.json and results.md (each atomically) into `out_dir`; returns their paths."""
    paths = out_dir / "results.json", out_dir / "results.md"
    for path, text in zip(paths, (json.dumps(results, indent=2, ensure_ascii=False) + "\n", markdown(results)),
                          strict=True):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json, checked to be one.

    Raises:
        FileNotFoundError / ValueError: no such file, or not a results file (named).
    """
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(results, dict) or not {"benchmark", "model", "questions", "summary", "table"} <= set(results):
        raise ValueError(f"{path}: not a results.json of `minigpt4qwen eval`")
    return results


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """A markdown table of every score of `a` and `b` (summary first, then per row) with the difference B - A.

    Raises:
        ValueError: the two are results of different benchmarks.
    """
    if a["benchmark"] != b["benchmark"]:
        raise ValueError(f"cannot compare {a['benchmark']} results with {b['benchmark']} results")

    def scores(results: dict[str, Any]) -> dict[tuple[str, str], float]:
        found = {("summary", k): v for k, v in results["summary"].items() if k not in COUNTS}
        for row in results["table"]:
            found.update({(row["name"], k): v for k, v in row.items() if k != "name" and k not in COUNTS})
        return found

    left, right = scores(a), scores(b)
    lines = [f"# {a['benchmark']}: {names[0]} vs {names[1]}", "",
             f"- {names[0]}: {a['model'].get('model_dir') or a['model'].get('checkpoint')}, scored "
             f"{a['questions']['scored']} of {a['questions']['total']}",
             f"- {names[1]}: {b['model'].get('model_dir') or b['model'].get('checkpoint')}, scored "
             f"{b['questions']['scored']} of {b['questions']['total']}", "",
             f"| name | metric | {names[0]} | {names[1]} | {names[1]} - {names[0]} |",
             "| --- | --- | ---: | ---: | ---: |"]
    for key in dict.fromkeys([*left, *right]):
        x, y = left.get(key), right.get(key)
        delta = f"{y - x:+.2f}" if x is not None and y is not None else ""
        lines.append(f"| {key[0]} | {key[1]} | {_number(x) if x is not None else '-'} | "
                     f"{_number(y) if y is not None else '-'} | {delta} |")
    return "\n".join(lines) + "\n"
