"""The CLIs' progress bar (redrawn on a terminal, a few plain lines in a log) and file names."""

from __future__ import annotations

import io

from impasto.cli_output import PLAIN_LINES_PER_RUN, ProgressPrinter, file_slug


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_the_bar_is_a_plain_line_per_tenth():
    log = io.StringIO()
    progress = ProgressPrinter(log)
    for step in range(1, 301):
        progress.update(step, 300, f"loss {0.1:.4f}")
    progress.message("job 1: succeeded")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 1 + PLAIN_LINES_PER_RUN + 1  # the first step, each tenth, then the message
    assert lines[-2].startswith("[" + "#" * 30 + "] 300/300 loss 0.1000")
    assert lines[-1] == "job 1: succeeded"


def test_without_a_terminal_a_short_run_still_prints_its_last_step():
    log = io.StringIO()
    progress = ProgressPrinter(log)
    for step in (1, 2, 3):
        progress.update(step, 3)
    assert log.getvalue().splitlines()[-1].endswith("3/3")
    progress.restart()  # a resumed job prints its progress again
    progress.update(2, 3)
    assert log.getvalue().splitlines()[-1].endswith("2/3")


def test_on_a_terminal_the_bar_is_redrawn_and_messages_start_a_new_line():
    tty = Terminal()
    progress = ProgressPrinter(tty)
    for step in (1, 2):
        progress.update(step, 2, "eta 0.1s")
    progress.message("wrote out.png")
    progress.message("done")
    assert tty.getvalue().count("\r") == 2
    assert tty.getvalue().endswith("2/2 eta 0.1s \nwrote out.png\ndone\n")


def test_file_slug_is_stable_and_safe():
    assert file_slug("a red <sks> shape, 4k!") == "a-red-sks-shape-4k"
    assert file_slug("../../etc/passwd") == "etc-passwd"
    assert file_slug("???") == "prompt"
    assert len(file_slug("word " * 40)) <= 48


def test_train_reads_prompts_from_flags_and_a_file(tmp_path):
    """--text-prior-prompt / --text-prior-file and --extra-class-prompt / --class-prompt-file."""
    from impasto.training.cli import _prompts

    listing = tmp_path / "prior.txt"
    listing.write_text("# the model's ordinary prompts\na red circle\n\n  a blue square on a white background  \n", encoding="utf-8")
    assert _prompts(["a shape"], str(listing)) == ["a shape", "a red circle", "a blue square on a white background"]
    assert _prompts(None, None) == []
