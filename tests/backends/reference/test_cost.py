"""``freecure cost`` on the reference-image backends: identity from step 0, two denoiser calls
a step in the SAME pass (FD's rows, then PD's with the reference tokens), FASA counted."""

from __future__ import annotations

import json

import pytest

from freecure.cli import main

STEPS = 4


@pytest.mark.parametrize("name", ["flux-kontext", "flux2-klein", "flux2"])
def test_cost_counts_two_calls_a_step_from_step_0(name, capsys):
    assert main(["cost", "--backend", name, "--method", "both", "--steps", str(STEPS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["inject_step"] == 0  # the photo is read from the first step
    assert result["plain_pd"] == {"unet_calls": STEPS, "batch_items": STEPS}  # one row per lane
    assert result["engine"]["stages"]["same_pass"]["unet_calls"] == 2 * STEPS  # FD's call, then PD's
    assert result["engine_fasa"]["stages"]["fasa"]["unet_calls"] == 2 * STEPS  # FD lends keys in its own call
