"""Multiple-choice items from C-Eval's and CMMLU's CSV files or our JSONL, and C-Eval's prompt (zero- or k-shot).

C-Eval: `id,question,A,B,C,D,answer[,explanation]`, one file per subject named `<subject>_<split>.csv` in `val/`,
`dev/`, `test/` (the test split's answers are withheld). CMMLU: a leading unnamed index column, then
`Question,A,B,C,D,Answer`, one file per subject named `<subject>.csv` in `dev/` and `test/`. Our JSONL: `question`,
the options as `A`, `B`, … fields or an `options` list, `answer` (a letter), optionally `subject` and `id`.
A folder given as data is read at its `val/` split when it has one (C-Eval), else at `test/` (CMMLU), else its
own files; k-shot examples come from the first K rows of the same subject's file in the sibling `dev/` folder.
"""

from __future__ import annotations

import csv
import string
from dataclasses import dataclass, field
from pathlib import Path

from xiaolm.errors import XiaolmError
from xiaolm.eval.subjects import subject_info
from xiaolm.records.read import read_records

CEVAL_HINT = "C-Eval files have the header id,question,A,B,C,D,answer[,explanation]"
CMMLU_HINT = "CMMLU files have the header ,Question,A,B,C,D,Answer (a leading unnamed index column)"
SPLIT_SUFFIXES = ("_val", "_dev", "_test")


@dataclass
class ChoiceItem:
    """One question: its options by letter, the answer letter ("" when withheld), where it was read."""

    question: str
    options: dict[str, str]
    answer: str
    subject: str = ""
    benchmark: str = "jsonl"  # ceval, cmmlu or jsonl
    where: str = ""
    id: str = ""
    shots: list[ChoiceItem] = field(default_factory=list)

    @property
    def category(self) -> str:
        """The subject's category in its benchmark's table ("Other" when unknown)."""
        return subject_info(self.benchmark, self.subject)[1] if self.subject else "Other"


def choice_options(item: dict) -> dict[str, str]:
    """An item's options by letter: its `A`, `B`, … fields, or its `options` (a list, or a dict by letter)."""
    options = item.get("options")
    if isinstance(options, list):
        return {letter: str(text) for letter, text in zip(string.ascii_uppercase, options, strict=False)}
    if isinstance(options, dict):
        return {str(letter): str(text) for letter, text in options.items()}
    return {k: str(item[k]) for k in string.ascii_uppercase[:10] if k in item}


def subject_of(path: Path) -> str:
    """`accountant_val.csv` → accountant (C-Eval), `agronomy.csv` → agronomy (CMMLU)."""
    stem = path.stem
    return next((stem[:-len(s)] for s in SPLIT_SUFFIXES if stem.endswith(s)), stem)


def read_choice_csv(path: Path, answers: bool = True) -> list[ChoiceItem]:
    """The rows of one C-Eval or CMMLU file; any row that is not a well-formed question is a clear error."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise XiaolmError("empty file: no header row", where=str(path), hint=f"{CEVAL_HINT}; {CMMLU_HINT}")
        if "question" in header:
            benchmark, q_col, a_col, hint = "ceval", "question", "answer", CEVAL_HINT
        elif "Question" in header:
            benchmark, q_col, a_col, hint = "cmmlu", "Question", "Answer", CMMLU_HINT
        else:
            raise XiaolmError(f"header {','.join(header)!r} names no question column", where=f"{path}:1",
                              hint=f"{CEVAL_HINT}; {CMMLU_HINT}")
        missing = [c for c in (q_col, "A", "B", "C", "D") if c not in header]
        if missing:
            raise XiaolmError(f"missing columns {', '.join(missing)}", where=f"{path}:1", hint=hint)
        col = {name: i for i, name in enumerate(header)}
        letters = [c for c in string.ascii_uppercase if c in col]
        items, line = [], reader.line_num + 1
        for row in reader:
            where, line = f"{path}:{line}", reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise XiaolmError(f"row has {len(row)} fields, the header {len(header)}", where=where, hint=hint)
            answer = row[col[a_col]].strip().upper() if a_col in col else ""
            if answers and answer not in letters:
                what = "no answer" if not answer else f"answer {answer!r} is not one of {', '.join(letters)}"
                raise XiaolmError(what, where=where, hint=_answer_hint(path, hint))
            ident = row[col["id"]] if "id" in col else row[0]
            items.append(ChoiceItem(row[col[q_col]], {k: row[col[k]] for k in letters}, answer,
                                    subject_of(path), benchmark, where, ident))
    if not items:
        raise XiaolmError("no questions: the file has a header only", where=str(path), hint=hint)
    return items


def _answer_hint(path: Path, hint: str) -> str:
    if path.parent.name == "test" and path.stem.endswith("_test"):
        return "C-Eval's test split withholds its answers: evaluate the val split (ceval/val) instead"
    return f"{hint}; the answer is one option letter"


def read_choice_jsonl(path: Path) -> list[ChoiceItem]:
    """Our JSONL items: question, options (A…/options), answer letter; wrong kinds are named by line."""

    items = []
    for record, where in read_records([path]):
        options = choice_options(record)
        if not isinstance(record.get("question"), str) or not options:
            raise XiaolmError("not a multiple-choice item", where=where,
                              hint='choice needs {"question", "A", "B", … or "options": [...], "answer": "A"}')
        answer = str(record.get("answer", "")).strip().upper()
        if answer not in options:
            raise XiaolmError(f"answer {answer!r} is not one of {', '.join(options)}", where=where,
                              hint="the answer is one option letter")
        items.append(ChoiceItem(record["question"], options, answer, str(record.get("subject", "")), "jsonl",
                                where, str(record.get("id", ""))))
    if not items:
        raise XiaolmError("no records", where=str(path), hint="the file is empty")
    return items


def choice_files(data: list[str]) -> list[Path]:
    """The files a `--data` list names: files as given; a folder's val/ (C-Eval) or test/ (CMMLU) split."""
    files: list[Path] = []
    for name in data:
        path = Path(name)
        if path.is_dir():
            split = next((path / s for s in ("val", "test") if (path / s).is_dir()), path)
            found = sorted(p for p in split.iterdir() if p.suffix in (".csv", ".jsonl", ".json"))
            if not found:
                raise XiaolmError("no .csv or .jsonl files", where=str(split),
                                  hint="pass C-Eval's or CMMLU's folder (with val/ or test/) or question files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise XiaolmError("no such file or folder", where=name)
    return files


def dev_file(path: Path) -> Path:
    """The dev split of the same subject: `<root>/dev/<subject>_dev.csv` (C-Eval) or `<root>/dev/<subject>.csv`."""
    dev = path.parent.parent / "dev"
    subject = subject_of(path)
    for candidate in (dev / f"{subject}_dev.csv", dev / f"{subject}.csv"):
        if candidate.is_file():
            return candidate
    raise XiaolmError(f"--shots needs the dev split of subject {subject!r}: no {dev}/{subject}_dev.csv or "
                      f"{subject}.csv", where=str(path), hint="keep C-Eval's or CMMLU's folder layout, or --shots 0")


def read_choice_items(data: list[str], shots: int = 0, limit: int = 0) -> list[ChoiceItem]:
    """Every question of the data files (the first `limit` if given), each with its k-shot examples."""
    items: list[ChoiceItem] = []
    for path in choice_files(data):
        if path.suffix == ".csv":
            file_items = read_choice_csv(path)
            examples = read_choice_csv(dev_file(path))[:shots] if shots else []
        else:
            if shots:
                raise XiaolmError("--shots needs C-Eval or CMMLU CSV files (their dev split)", where=str(path),
                                  hint="use --shots 0 with JSONL items")
            file_items, examples = read_choice_jsonl(path), []
        for item in file_items:
            item.shots = examples
        items += file_items
        if limit and len(items) >= limit:
            return items[:limit]
    return items


def question_block(item: ChoiceItem) -> str:
    """The question, its options one a line ("A. …"), and "答案：" awaiting the letter."""
    return item.question + "\n" + "".join(f"{k}. {v}\n" for k, v in item.options.items()) + "答案："


def ceval_prompt(item: ChoiceItem) -> str:
    """C-Eval's prompt: the subject's header, each k-shot example with its answer, then the question."""
    name = subject_info(item.benchmark, item.subject)[0] if item.subject else ""
    head = f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
    return head + "".join(question_block(s) + s.answer + "\n\n" for s in item.shots) + question_block(item)
