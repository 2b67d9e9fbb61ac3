"""`python -m benchmarks`: runs each benchmark script, keeps going past a failure, writes one section of results."""

import re
import textwrap

from benchmarks.__main__ import BENCHMARKS, REPO, final_tables, main

TABLES = """\
| system | docs/s |
|---|---|
| xiaolm | 1,000 |

| ratio | median (min–max) |
|---|---|
| xiaolm / other | 1.30x (1.10–1.40x) |
"""
RATIOS = "xiaolm / other: 1.3x docs/s\n"

INTRO = "# Measured results\n\nAll figures below were measured by us.\n\n"
OLD = "## An older section\n\n| a |\n|---|\n| 1 |\n"


def fake_benchmarks(tmp_path):
    ok = tmp_path / "prints_tables.py"
    ok.write_text(textwrap.dedent(f"""\
        import sys
        print("command: python prints_tables.py", sys.argv[1:])
        print("| a progress table | that is not the last |")
        print("round 1: 999 tokens/s")
        print({TABLES + RATIOS!r}, end="")
    """), encoding="utf-8")
    bad = tmp_path / "fails.py"
    bad.write_text("import sys\nprint('about to fail')\nsys.exit('fails.py: no such corpus')\n", encoding="utf-8")
    return {"tables": (str(ok), ["--quick"], ["--big"]), "broken": (str(bad), [], [])}


def test_section_goes_after_the_intro_with_each_table_and_each_failure(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(INTRO + OLD, encoding="utf-8")

    assert main(["--out", str(out)], benchmarks=fake_benchmarks(tmp_path)) == 1  # one benchmark failed

    text = out.read_text(encoding="utf-8")
    assert text.startswith(INTRO + "## make bench, ")
    assert text.endswith("\n\n" + OLD)
    new = text[len(INTRO):-len(OLD)]
    assert re.match(r"## make bench, \d{4}-\d\d-\d\d \(quick\)\n", new)
    assert new.count("\n## ") == 0
    assert re.search(r"^Machine: .+, \d+ cores, .+ RAM", new, re.M)
    assert re.search(r"^Versions: Python \d.+, torch .+, xiaolm commit ", new, re.M)
    assert "Command: `python -m benchmarks --out " in new
    assert "2 benchmarks in " in new and "1 failed (broken)" in new
    # both tables, and the ratio line after them apart from the table (else Markdown makes it a row)
    assert f"prints_tables.py --quick`\n\n{TABLES}\n{RATIOS}\n" in new
    assert "a progress table" not in new and "round 1" not in new
    assert re.search(r"### broken: \*\*failed\*\* \(exit code 1\)", new)
    failure = new[new.index("### broken"):]
    assert "about to fail\n" in failure and "fails.py: no such corpus\n" in failure  # its stdout and stderr


def test_only_and_full_choose_the_benchmarks_and_their_arguments(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    assert main(["--full", "--only", "tables", "--out", str(out)], benchmarks=fake_benchmarks(tmp_path)) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Measured results\n\n## make bench, ")  # a new file gets a title
    assert "(full)" in text and "prints_tables.py --big`" in text and "broken" not in text


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    assert main(["--dry-run", "--out", str(out)], benchmarks=fake_benchmarks(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "prints_tables.py --quick" in printed and "fails.py" in printed
    assert not out.exists()


def test_final_tables_are_none_without_a_table_and_keep_what_follows():
    assert final_tables(["loss 3.2", "done"]) is None
    assert final_tables(["| a |", "|---|", "| 1 |", "", "x: 1.3x", "y: 0.9x", ""]) == [
        "| a |", "|---|", "| 1 |", "", "x: 1.3x", "", "y: 0.9x"]  # each line after the table a paragraph


def test_every_listed_script_exists():
    for script, _, _ in BENCHMARKS.values():
        assert (REPO / script).is_file(), script
