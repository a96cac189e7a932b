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
    from saets_utils.models.tiny import tiny_sae

    return tiny_sae(d_in=32, d_sae=64, k=4)
