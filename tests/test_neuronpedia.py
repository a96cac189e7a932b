"""Neuronpedia links (saets_utils/report/neuronpedia.py): the URL shape on the reference params, none
for SAEs Neuronpedia does not host."""

from __future__ import annotations

from saets_utils.config import load_config
from saets_utils.report.neuronpedia import neuronpedia_url
from tests.helpers import build_run_cfg


def test_gemma_scope_ids_link_to_neuronpedia():
    assert (
        neuronpedia_url(load_config("params/gemma-2-2b.yaml"), 4111)
        == "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/4111"
    )
    assert (
        neuronpedia_url(load_config("params/gemma-2-9b.yaml"), 441)
        == "https://www.neuronpedia.org/gemma-2-9b/12-gemmascope-res-16k/441"
    )
    l0 = {"sae": {"sae_id": "layer_12/width_16k/average_l0_82", "release": "gemma-scope-2b-pt-res"}}
    assert neuronpedia_url(load_config("params/gemma-2-2b.yaml", l0), 7) == (
        "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/7"
    )


def test_no_link_where_neuronpedia_does_not_host_the_sae(tmp_path):
    assert neuronpedia_url(load_config("params/demo.yaml"), 3) is None  # the embedded SAE
    assert neuronpedia_url(load_config("params/gemma-ci.yaml"), 3) is None  # random SAEs in Gemma Scope's format
    assert neuronpedia_url(build_run_cfg(tmp_path), 3) is None  # tiny
    other_l0 = {"sae": {"sae_id": "layer_12/width_16k/average_l0_41", "release": "gemma-scope-2b-pt-res"}}
    assert neuronpedia_url(load_config("params/gemma-2-2b.yaml", other_l0), 3) is None
    other_model = {"model": {"name": "gemma-2-9b"}}  # the 2B SAE on another model
    assert neuronpedia_url(load_config("params/gemma-2-2b.yaml", other_model), 3) is None
