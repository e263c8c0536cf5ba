"""gpu-check's fit stage reuses the static model's side computed beforehand only where it was computed for
the same sources, Triton and model (bench/fit_inputs.py); otherwise it compiles it itself."""

import json

import pytest

from bench import fit_inputs


def _folder(tmp_path, **changed):
    folder = tmp_path / "fit-inputs"
    folder.mkdir()
    for name in fit_inputs.FILES:
        (folder / name).write_text(json.dumps({"from": "before"}))
    (folder / "meta.json").write_text(json.dumps(fit_inputs.meta("tiny") | changed))
    return folder


def test_inputs_computed_for_these_sources_triton_and_model_are_reused(tmp_path):
    assert fit_inputs.reusable(_folder(tmp_path), fit_inputs.meta("tiny")) is None


@pytest.mark.parametrize("changed, named", [
    ({"sources": "0" * 64}, "sources '0000"),
    ({"triton": "3.5.0"}, "triton '3.5.0'"),
    ({"model": "llava-7b"}, "model 'llava-7b' here 'tiny'"),
])
def test_inputs_computed_for_anything_else_are_not_and_the_reason_names_it(tmp_path, changed, named):
    why = fit_inputs.reusable(_folder(tmp_path, **changed), fit_inputs.meta("tiny"))
    assert why is not None and "computed for other inputs" in why and named in why


def test_a_folder_without_its_meta_or_a_file_is_not_reused(tmp_path):
    folder = _folder(tmp_path)
    (folder / "static.json").unlink()
    assert "lacks ['static.json']" in fit_inputs.reusable(folder, fit_inputs.meta("tiny"))
    (folder / "meta.json").unlink()
    assert "no readable" in fit_inputs.reusable(folder, fit_inputs.meta("tiny"))


def test_the_digest_follows_every_library_and_bench_source(tmp_path):
    for name in ("adallava_kernels/ops/k.py", "adallava_kernels/ops/table.json", "bench/static.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "README.md").write_text("not a source\n")
    before = fit_inputs.sources_digest(tmp_path)
    (tmp_path / "README.md").write_text("changed\n")
    assert fit_inputs.sources_digest(tmp_path) == before
    for name in ("adallava_kernels/ops/k.py", "adallava_kernels/ops/table.json", "bench/static.py"):
        (tmp_path / name).write_text("x = 2\n")
        assert fit_inputs.sources_digest(tmp_path) != before, name
        before = fit_inputs.sources_digest(tmp_path)


def test_the_stage_copies_matching_inputs_and_compiles_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compiled = []
    monkeypatch.setattr(fit_inputs, "compute", lambda out, model: compiled.append((out, model)))
    folder = _folder(tmp_path)
    out = tmp_path / "fit"
    assert fit_inputs.main([str(out), "--reuse", str(folder), "--model", "tiny"]) == 0
    assert compiled == []
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "predicted.json", "static.json"]
    assert "reused" in capsys.readouterr().out
    assert fit_inputs.main([str(out), "--reuse", str(folder), "--model", "llava-7b"]) == 0
    assert compiled == [(out, "llava-7b")]
    assert "compiling here: " in capsys.readouterr().out


def test_it_refuses_the_interpreter(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exit_:
        fit_inputs.main([str(tmp_path / "fit")])
    assert exit_.value.code == 2
    assert "TRITON_INTERPRET=1 is set" in capsys.readouterr().err
