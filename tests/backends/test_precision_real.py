"""bfloat16 and quantized SmolLM2-135M-Instruct against HF transformers' float32 on a fixed text.

Teacher-forced over the first 1,001 tokens of tests/data/precision_text.txt
(1,000 next-token positions, one forward): how often the top-1 token agrees with
HF float32's, and the perplexity against HF float32's.

Measured (2-core AVX2 CPU, 2026-12-03): float32 100% and +0.00%; bfloat16 96.9% and
+0.05%, exactly what HF's own bfloat16 gets (96.9%: this text has many near-ties
that bf16 rounding flips), so bf16 is held to HF's bf16, not to a fixed 99%; int8
94.7% and +0.97%; int4 96.3% and +0.39% (the Q4_1 file's own 4-bit codes; what
both quantized modes lose is mostly their bfloat16 activations).
"""

from __future__ import annotations

import pytest
import torch

from precision import TEXT, engine_logits, perplexity, top1_agreement

pytestmark = pytest.mark.real_model

POSITIONS = 1000


@pytest.fixture(scope="module")
def text_ids(hf_smollm2_tokenizer):
    ids = hf_smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > POSITIONS
    return ids[: POSITIONS + 1]


@pytest.fixture(scope="module")
def hf_logits(hf_smollm2_model, text_ids):
    with torch.no_grad():
        return hf_smollm2_model(torch.tensor([text_ids])).logits[0].float()


@pytest.fixture(scope="module")
def hf_bfloat16_agreement(smollm2_gguf, text_ids, hf_logits):
    """HF's own bfloat16 model's top-1 agreement with its float32 one."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits[0].float()
    return top1_agreement(logits[:POSITIONS], hf_logits[:POSITIONS])


def figures(smollm2_gguf, text_ids, hf_logits, **config) -> tuple[float, float, str]:
    logits = engine_logits(smollm2_gguf, text_ids, **config)
    agreement = top1_agreement(logits[:POSITIONS], hf_logits[:POSITIONS])
    reference, ours = perplexity(hf_logits, text_ids), perplexity(logits, text_ids)
    change = ours / reference - 1
    text = (f"{config}: top-1 agreement {agreement:.2%}, perplexity {ours:.3f} vs HF float32 "
            f"{reference:.3f} ({change:+.2%})")
    print(text)
    return agreement, change, text


def test_float32_is_hf_float32(smollm2_gguf, text_ids, hf_logits):
    agreement, change, text = figures(smollm2_gguf, text_ids, hf_logits, dtype="float32")
    assert agreement >= 0.995 and abs(change) <= 0.001, text


def test_bfloat16_is_as_faithful_as_hf_bfloat16(smollm2_gguf, text_ids, hf_logits, hf_bfloat16_agreement):
    agreement, change, text = figures(smollm2_gguf, text_ids, hf_logits, dtype="bfloat16")
    assert agreement >= hf_bfloat16_agreement - 0.01, f"{text}; HF bfloat16: {hf_bfloat16_agreement:.2%}"
    assert abs(change) <= 0.01, text


@pytest.mark.parametrize("quantization, min_agreement, max_perplexity_change", [
    ("int8", 0.93, 0.02),
    ("int4", 0.93, 0.05),
])
def test_quantized_weights_track_hf_float32(smollm2_gguf, text_ids, hf_logits, quantization, min_agreement,
                                            max_perplexity_change):
    agreement, change, text = figures(smollm2_gguf, text_ids, hf_logits, dtype="float32",
                                      quantization=quantization)
    assert agreement >= min_agreement, text
    assert abs(change) <= max_perplexity_change, text


def test_the_shipped_q4_1_file_is_served_with_its_own_int4_weights_by_default(smollm2_gguf, text_ids, hf_logits):
    """--quantization auto on the CPU (the default): int4, with the file's own 4-bit codes;
    in the default server dtype on this CPU, as the server runs it."""
    from lmserve.backends.torch.quantization_choice import choose_quantization

    assert choose_quantization("auto", smollm2_gguf, torch.device("cpu")) == (
        "int4", "auto: the file's projections are Q4_1")
    agreement, change, text = figures(smollm2_gguf, text_ids, hf_logits, dtype="auto", quantization="auto")
    assert agreement >= 0.93 and abs(change) <= 0.05, text
