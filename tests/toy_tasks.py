"""A local multiple-choice lm-eval task written by tests (no hub): arithmetic questions in a JSON-lines file."""
from __future__ import annotations

import json
from pathlib import Path

N_DOCS = 12


def write_task(root: Path, name: str, rows: list[dict] | None, data_file: str = "data.jsonl") -> Path:
    """A multiple-choice lm-eval task whose dataset is a local JSON-lines file (no hub)."""
    root.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        (root / data_file).write_text("\n".join(json.dumps(r) for r in rows))
    (root / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return root


def arithmetic_docs(n: int = N_DOCS) -> list[dict]:
    return [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
             "label": (a + b) % 3} for a, b in ((i % 5, i // 5 + 1) for i in range(n))]
