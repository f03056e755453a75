"""``eventmill`` with junk arguments: one clear line on stderr and a non-zero exit,
never a traceback. Each example starts a Python process, so the budget is small."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

UNREACHABLE_DSN = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"

junk_text = st.text(
    st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="\x00"), max_size=12
)
options = st.sampled_from(
    ["--events", "--nodes", "--dsn", "--schema", "--mode", "--node-id", "--json", "--streams"]
)
values = st.one_of(
    junk_text,
    st.sampled_from(["-5", "0", "nan", "1e9", "99999999999999999999", "", "A;B", "$$", "'"]),
    st.just(UNREACHABLE_DSN),
)
# Every command line ends with something that makes it fail, whatever came before.
spoilers = st.sampled_from(
    [
        ["--no-such-option"],
        ["unexpected-positional"],
        ["--dsn", UNREACHABLE_DSN],
        ["--events", "not-a-number"],
    ]
)


@given(
    command=st.sampled_from(["demo", "run", "migrate", "status", "frobnicate", "--dsn", ""]),
    target=st.one_of(junk_text, st.just("no_such_module:attribute"), st.just("os:path")),
    middle=st.lists(st.tuples(options, values), max_size=3),
    spoiler=spoilers,
)
@settings(max_examples=20, deadline=None)
def test_junk_arguments_give_one_line_and_a_failing_exit(
    command: str, target: str, middle: list[tuple[str, str]], spoiler: list[str]
) -> None:
    arguments = [command]
    if command == "run":
        arguments.append(target)
    for option, value in middle:
        arguments += [option, value]
    arguments += spoiler
    finished = subprocess.run(
        [sys.executable, "-m", "eventmill", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode != 0, finished
    assert "Traceback" not in finished.stderr, finished.stderr
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith("eventmill"), finished.stderr
