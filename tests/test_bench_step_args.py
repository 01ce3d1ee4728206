"""bench/step.py's argument handling (no worker runs: the GPU bench itself is run by hand)."""
from __future__ import annotations

import re

import pytest

from bench import step


def test_precisions_parse_in_order_without_duplicates():
    assert step.parse_precisions("bf16, fp8,bf16,int8-fp8") == ["bf16", "fp8", "int8-fp8"]


@pytest.mark.parametrize("argv, message", [
    (["--precisions", "bf16,fp9"], r"--precisions='bf16,fp9': unknown \['fp9'\]; expected .*'fp8-weights'"),
    (["--precisions", " , "], r"--precisions=' , ': unknown empty"),
    (["--worker", "jax", "--precisions", "bf16,fp8"], "--worker takes exactly one --precisions entry"),
    (["--precisions", "fp8", "--cases", "sd3"], r"--cases: no case matches \['sd3'\]"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        step.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
