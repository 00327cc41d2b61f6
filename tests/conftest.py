"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M, float32 on CPU."""
    from entcal import models

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]
