"""bfloat16 and quantized SmolLM2-135M-Instruct against HF transformers' float32 on a fixed text.

Teacher-forced over the first 1,001 tokens of tests/data/precision_text.txt
(1,000 next-token positions): the top-1 token agrees with HF float32's at
>= 99% of positions in bfloat16, >= 97% with int8 weights, >= 93% with int4,
and the perplexity is within 1% / 2% / 5% of HF's. float32 itself must agree
almost everywhere (the fidelity tests check it token by token).
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


@pytest.mark.parametrize("dtype, quantization, min_agreement, max_perplexity_change", [
    ("float32", None, 0.995, 0.001),
    ("bfloat16", None, 0.99, 0.01),
    ("float32", "int8", 0.97, 0.02),
    ("float32", "int4", 0.93, 0.05),
])
def test_next_token_agreement_and_perplexity_against_hf_float32(smollm2_gguf, text_ids, hf_logits, dtype,
                                                                quantization, min_agreement,
                                                                max_perplexity_change):
    logits = engine_logits(smollm2_gguf, text_ids, dtype=dtype, quantization=quantization)
    agreement = top1_agreement(logits[:POSITIONS], hf_logits[:POSITIONS])
    reference = perplexity(hf_logits, text_ids)
    ours = perplexity(logits, text_ids)
    figures = (f"{dtype}/{quantization or 'no quantization'}: top-1 agreement {agreement:.2%}, "
               f"perplexity {ours:.3f} vs HF float32 {reference:.3f} ({ours / reference - 1:+.2%})")
    print(figures)
    assert agreement >= min_agreement, figures
    assert abs(ours / reference - 1) <= max_perplexity_change, figures
