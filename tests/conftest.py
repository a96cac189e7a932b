import os
import sys
from pathlib import Path

import pytest

# tests/ itself, so that a test in any folder imports the shared helpers (helpers, fake_openai_server)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

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


@pytest.fixture(scope="session")
def effects_reference(tmp_path_factory, tiny_model, tiny_sae):
    """An uninterrupted in-process run of 01 on the tiny model (``helpers.tiny_run``): its results
    are what every interrupted, restarted or distributed run of the same vectors must merge to."""
    from helpers import tiny_run
    from saets_utils.effects.runner import run_effects

    run = tiny_run(tmp_path_factory.mktemp("reference"))
    return run, run_effects(run, tiny_model, tiny_sae)
