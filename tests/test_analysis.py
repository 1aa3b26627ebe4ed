"""Spectral comparison: intruder dimensions, subspace drift and update rank on matrices whose answer is known."""

import json

import pytest
import torch
from safetensors.torch import save_file

from petuning.analysis import analyze, compare_state_dicts, compare_weights


def _matrix(m=40, n=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    s = torch.linspace(10, 1, min(m, n), dtype=torch.float64)
    return u[:, : s.numel()] @ torch.diag(s) @ v[:, : s.numel()].T, u, v


def test_rescaled_spectrum_has_no_intruders_and_no_drift():
    w, _u, _v = _matrix()
    tuned = w * 1.5
    report = compare_weights("w", w, tuned, top_k=5)
    assert report.intruders == []
    assert report.left_subspace_drift == pytest.approx(0, abs=1e-10)
    assert report.right_subspace_drift == pytest.approx(0, abs=1e-10)
    assert report.relative_update == pytest.approx(0.5)
    assert report.tuned_singular_values[0] == pytest.approx(15.0)


def test_new_dominant_direction_is_an_intruder():
    w, u, v = _matrix()
    # a unit direction mixing two low-ranked base directions equally: its |cos| with any base vector is 1/sqrt(2)
    x = (u[:, 25] + u[:, 28]) / 2**0.5
    y = (v[:, 26] + v[:, 29]) / 2**0.5
    tuned = w + 30.0 * torch.outer(x, y)
    report = compare_weights("w", w, tuned, top_k=5, threshold=0.8)
    assert report.intruders == [0]  # it became the top singular vector
    assert report.max_intruder_similarity[0] == pytest.approx(2**-0.5, abs=1e-3)
    assert report.update_rank_90 == 1
    assert compare_weights("w", w, tuned, top_k=5, threshold=0.5).intruders == []  # 0.707 > 0.5


def test_subspace_drift_matches_principal_angles():
    w, _, _ = _matrix(seed=1)
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tuned = w + 0.8 * noise
    k = 4
    report = compare_weights("w", w, tuned, top_k=k)
    u0 = torch.linalg.svd(w)[0][:, :k]
    u1 = torch.linalg.svd(tuned)[0][:, :k]
    cosines = torch.linalg.svdvals(u0.T @ u1)  # cosines of the principal angles
    assert report.left_subspace_drift == pytest.approx(float(1 - cosines.square().mean()), abs=1e-10)
    assert 0 < report.left_subspace_drift < 1


def test_state_dict_filtering_and_errors():
    w, _, _ = _matrix()
    base = {"layer.q_proj.weight": w, "embed_tokens.weight": w, "norm.weight": torch.ones(3), "same.weight": w}
    tuned = {
        "layer.q_proj.weight": w + 1e-3,
        "embed_tokens.weight": 2 * w,
        "norm.weight": torch.ones(3) * 2,
        "same.weight": w,
    }
    names = [r.name for r in compare_state_dicts(base, tuned)]
    assert names == ["layer.q_proj.weight"]  # unchanged, 1-D and embedding weights left out
    names = [r.name for r in compare_state_dicts(base, tuned, include_embeddings=True)]
    assert names == ["layer.q_proj.weight", "embed_tokens.weight"]
    with pytest.raises(ValueError, match="No changed 2-D weight"):
        compare_state_dicts(base, base)
    with pytest.raises(ValueError, match="threshold"):
        compare_state_dicts(base, tuned, threshold=1.5)


def test_analyze_writes_summary_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    w, u, v = _matrix()
    x, y = (u[:, 25] + u[:, 28]) / 2**0.5, (v[:, 26] + v[:, 29]) / 2**0.5
    (tmp_path / "base").mkdir()
    (tmp_path / "tuned").mkdir()
    save_file({"a.weight": w.float(), "b.weight": w.float().contiguous()}, tmp_path / "base" / "model.safetensors")
    tuned = {"a.weight": (w + 30 * torch.outer(x, y)).float(), "b.weight": (w * 1.1).float()}
    save_file(tuned, tmp_path / "tuned" / "model.safetensors")
    summary = analyze(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", top_k=3, threshold=0.8)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["layers_compared"] == 2 and saved["layers_with_intruders"] == 1 and saved["intruders_total"] == 1
    for png in ("layers.png", "spectra.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"a": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        analyze(tmp_path, tmp_path, tmp_path / "out")


def test_adapter_folder_is_merged_into_base_first(tmp_path):
    from peft import get_peft_model

    import petuning
    from petuning.testing import build_tiny_model

    build_tiny_model("llama", save_dir=tmp_path / "base")
    torch.manual_seed(0)
    base = build_tiny_model("llama")
    model = get_peft_model(base, petuning.SorsaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    from_adapter = analyze(tmp_path / "base", tmp_path / "adapter", tmp_path / "a", plots=False)
    from_merged = analyze(tmp_path / "base", merged_dir, tmp_path / "b", plots=False)
    assert [x["name"] for x in from_adapter["layers"]] == [x["name"] for x in from_merged["layers"]]
    assert all("q_proj" in x["name"] for x in from_adapter["layers"])
    for a, b in zip(from_adapter["layers"], from_merged["layers"]):
        assert a["relative_update"] == pytest.approx(b["relative_update"], rel=1e-4)
        assert a["update_rank_90"] <= 4  # a rank-2 SORSA delta is B S A - B0 S0 A0: rank <= 4
    with pytest.raises(ValueError, match="is an adapter"):
        analyze(tmp_path / "adapter", tmp_path / "adapter", tmp_path / "c")


def test_cli_analyze(tmp_path, capsys):
    from petuning.cli import main

    w, u, v = _matrix()
    x, y = (u[:, 25] + u[:, 28]) / 2**0.5, (v[:, 26] + v[:, 29]) / 2**0.5
    for name, weight in (("base", w), ("tuned", w + 30 * torch.outer(x, y))):
        (tmp_path / name).mkdir()
        save_file({"a.weight": weight.float()}, tmp_path / name / "model.safetensors")
    out = tmp_path / "out"
    assert (
        main(
            [
                "analyze",
                str(tmp_path / "base"),
                str(tmp_path / "tuned"),
                "--out",
                str(out),
                "--top-k",
                "3",
                "--threshold",
                "0.8",
                "--no-plots",
            ]
        )
        == 0
    )
    assert "1 intruder dimensions in 1 layers" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["intruders_total"] == 1
    assert not (out / "layers.png").exists()
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "No .safetensors files" in capsys.readouterr().err
