"""`python -m gpt2onnx.bench.serving --smoke` end to end on a tiny model: real servers,
every workload, no failed request, and the prefix cache answering the shared-prefix
workload from stored blocks."""

from __future__ import annotations

import pytest

from tests.bench.helpers import run_smoke


def test_serving_bench_smoke(tmp_path) -> None:
    pytest.importorskip("torch")
    r = run_smoke("gpt2onnx.bench.serving", tmp_path, "serving.json")
    (distinct,) = r["distinct"]["this engine"]
    assert distinct["failed"] == 0 and distinct["completed"] == r["requests"]
    assert distinct["ttft_ms"]["median"] > 0 and distinct["output_tok_s"] > 0
    for variant in ("prefix cache on", "prefix cache off"):
        (row,) = r["shared_prefix"][variant]
        assert row["failed"] == 0, (variant, row["errors"])
    (long,) = r["long_prompt"]["this engine"]
    assert long["long_ok"] and long["rows_ok"] == 15
    text = (tmp_path / "results" / "serving.md").read_text()
    assert "| prefix cache on |" in text and "A 900-token prompt" in text


@pytest.mark.parametrize("bad", ["chunk64", "=--prefill-chunk 64", "chunk64=", "x= "])
def test_a_bad_variant_is_one_line_and_exit_2(bad: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2onnx.bench.serving import main

    with pytest.raises(SystemExit) as exc:
        main(["--variant-flags", bad, "--out", "/nonexistent/never-made"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(bad) in err and "NAME=FLAGS" in err, err


def test_variant_flags_parse() -> None:
    from gpt2onnx.bench.serving import _variant

    assert _variant("chunk64=--prefill-chunk 64") == ("chunk64", ["--prefill-chunk", "64"])
    assert _variant("a=b=c") == ("a", ["b=c"])


def test_baseline_flags_need_a_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2onnx.bench.serving import main

    with pytest.raises(SystemExit) as exc:
        main(["--baseline-flags=--no-spin", "--out", "/nonexistent/never-made"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--baseline GITREF" in err, err


@pytest.mark.parametrize(("argv", "words"), [
    (["--baseline", "HEAD", "--baseline-flags="], "--baseline-flags is empty"),
    (["--variant-flags", "this engine=--no-spin"], "'this engine' is taken"),
    (["--variant-flags", "a=--no-spin", "--variant-flags", "a=--prefill-chunk 16"],
     "'a' is taken"),
])
def test_bad_variant_sets_are_refused(argv: list[str], words: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2onnx.bench.serving import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", "/nonexistent/never-made"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
