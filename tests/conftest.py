import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model():
    from saets_utils.models.tiny import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def tiny_sae():
    from helpers import D_MODEL, D_SAE, K
    from saets_utils.models.tiny import tiny_sae

    return tiny_sae(d_in=D_MODEL, d_sae=D_SAE, k=K)
